"""`certattr demo` end to end with tiny settings: train, campaign (attacks + 3 bound kinds), compare, report."""
from __future__ import annotations

import csv
import sqlite3

from certattr.cli import main

TINY = ["--n", "3", "--eps", "0.01", "--steps", "2", "--restarts", "1", "--smoothed-samples", "16",
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
    assert (out / "model" / "certattr.json").is_file()
    html = index.read_text()
    for kind in ("certified_fraction", "robust_accuracy", "bound_vs_attack", "attack_strength"):
        assert f"{kind}__model__saliency__2.png" in html
        assert (out / "report" / f"{kind}__model__saliency__2.png").is_file()
    # every method ran on every sample: 3 samples x 1 eps x (IFIA + 1 deviation restart + PGD + 3 bounds)
    conn = sqlite3.connect(out / "results.sqlite")
    methods = dict(conn.execute("SELECT method, COUNT(*) FROM results GROUP BY method").fetchall())
    conn.close()
    assert methods == {"ifia-topk": 3, "deviation-euclidean": 3, "pgd": 3, "practical": 3, "certified": 3,
                       "smoothed": 3}
    with open(out / "compare.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert sorted(r["kind"] for r in rows) == ["certified", "practical", "smoothed"]
    cert = next(r for r in rows if r["kind"] == "certified")
    assert cert["violations"] == "0" and int(cert["samples"]) == 3 and int(cert["attacks"]) == 9
    assert "CROWN" in captured.err and "smoothed" in captured.err  # it says what ran

    # a rerun reuses the model and every stored row
    assert main(["demo", "--out", str(out)] + TINY) == 0
    err = capsys.readouterr().err
    assert "reusing" in err and "0 rows written" in err
