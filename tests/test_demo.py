"""`certattr demo` end to end with tiny settings: train, campaign (attacks + 3 bound kinds), compare, report."""
from __future__ import annotations

import csv
import sqlite3

from certattr.cli import main

# the ReLU net on l_2 only (the softplus net and l_inf: tests/test_compare_pairing.py, on a tabular MLP)
TINY = ["--n", "3", "--networks", "relu", "--eps-inf", "--eps-l2", "0.03", "--steps", "2", "--restarts", "1",
        "--smoothed-samples", "16", "--smoothed-eval-samples", "32", "--smoothed-steps", "1",
        "--train-steps", "10", "--train-subset", "1280", "--batch-size", "3", "--no-progress"]


def test_demo_tiny_run(tmp_path, capsys, mnist_test):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out)] + TINY)
    captured = capsys.readouterr()
    assert code in (0, 3), captured.err  # 3 would flag a certified-bound violation: fail below with details
    assert "ERROR" not in captured.err, captured.err
    assert code == 0
    index = out / "report" / "index.html"
    assert f"report: {index.resolve()}" in captured.out
    assert (out / "relu" / "certattr.json").is_file()
    html = index.read_text()
    for kind in ("certified_fraction", "robust_accuracy", "estimated_fraction", "bound_vs_attack",
                 "attack_strength"):
        assert f"{kind}__relu__saliency__2.png" in html
        assert (out / "report" / f"{kind}__relu__saliency__2.png").is_file()
    # every method ran on every sample: 3 samples x 1 eps x (IFIA + deviation on the real net and on the
    # surrogate + PGD + the smoothed attack + 3 bounds)
    conn = sqlite3.connect(out / "results.sqlite")
    methods = dict(conn.execute("SELECT method, COUNT(*) FROM results GROUP BY method").fetchall())
    conn.close()
    assert methods == {"ifia-topk": 3, "deviation-euclidean": 3, "deviation-euclidean-surrogate": 3, "pgd": 3,
                       "smoothed-euclidean": 3, "practical": 3, "certified": 3, "smoothed": 3}
    with open(out / "compare.tsv", newline="") as fh:
        rows = {r["kind"]: r for r in csv.DictReader(fh, delimiter="\t")}
    assert sorted(rows) == ["certified", "practical", "smoothed"]
    cert, prac, smooth = rows["certified"], rows["practical"], rows["smoothed"]
    assert cert["violations"] == "0" and int(cert["samples"]) == 3 and int(cert["attacks"]) == 9
    assert cert["paired_with"] == "real" and prac["paired_with"] == "softplus-surrogate(beta=10)"
    assert smooth["paired_with"] == "smoothed(r=2,normalized)" and int(smooth["tested"]) == 3
    assert "CROWN" in captured.err and "smoothed" in captured.err  # it says what ran

    # a rerun reuses the model and every stored row
    assert main(["demo", "--out", str(out)] + TINY) == 0
    err = capsys.readouterr().err
    assert "reusing" in err and "0 rows written" in err
