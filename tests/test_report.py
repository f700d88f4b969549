"""Report: every figure exists as PNG + SVG + CSV, the CSVs hold the plotted numbers, index.html links them."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from certattr.campaign.store import Store
from certattr.cli import main

CK = "b" * 64
EPS = (0.01, 0.05, 0.1)
N = 12


def synthetic_store(path: Path, seed: int = 0) -> dict:
    """A store with 2 attacks and 3 bounds over 3 eps values; returns the numbers it holds."""
    rng = np.random.default_rng(seed)
    truth = {}
    with Store(path) as st:
        st.add_checkpoint(CK, "/m/cnn", "runs/cnn", {})
        for eps in EPS:
            base = rng.uniform(0.5, 1.5, N) * eps * 10
            correct = rng.random(N) < 0.9
            for method, kind, scale in (("ifia-topk", "ifia", 0.6), ("deviation-euclidean", "deviation", 1.0)):
                e = base * scale
                cos = 1 - e / 4
                kept = rng.random(N) < 0.95
                st.write_unit([{"ckpt": CK, "attribution": "saliency", "norm": "inf", "eps": eps, "method": method,
                                "restart": 0, "sample": s, "family": "attack", "kind": kind, "euclidean": e[s],
                                "cosine": cos[s], "topk_intersection": 1 - eps * 3 * scale,
                                "kendall": 1 - eps * 2 * scale, "label_kept": kept[s], "correct": correct[s],
                                "time": 0.1} for s in range(N)])
                truth[(method, eps)] = (e, cos, kept)
            for method, factor in (("certified", 3.0), ("practical", 1.2), ("smoothed", 2.0)):
                e = base * factor
                cos = np.clip(1 - e / 2, -1, 1)
                lc = rng.random(N) < 0.8
                st.write_unit([{"ckpt": CK, "attribution": "saliency", "norm": "inf", "eps": eps, "method": method,
                                "restart": 0, "sample": s, "family": "bound", "kind": method, "euclidean": e[s],
                                "cosine": cos[s], "label_certified": lc[s], "correct": correct[s], "time": 0.2}
                               for s in range(N)])
                truth[(method, eps)] = (e, cos, lc, correct)
    return truth


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_report_files_and_csv_numbers(tmp_path):
    store = tmp_path / "r.sqlite"
    truth = synthetic_store(store)
    out = tmp_path / "report"
    assert main(["report", str(store), "--out", str(out), "--cos", "0.5", "0.9"]) == 0
    index = out / "index.html"
    html = index.read_text()
    stems = ["certified_fraction__runs-cnn__saliency__inf", "robust_accuracy__runs-cnn__saliency__inf",
             "bound_vs_attack__runs-cnn__saliency__inf", "attack_strength__runs-cnn__saliency__inf"]
    stems = [s.replace("runs-cnn", "cnn") for s in stems]
    for stem in stems:
        for ext in ("png", "svg", "csv"):
            f = out / f"{stem}.{ext}"
            assert f.is_file() and f.stat().st_size > 200, f
        assert f"{stem}.png" in html and f"{stem}.svg" in html and f"{stem}.csv" in html
    assert (out / "compare.tsv").is_file() and "compare.tsv" in html
    assert "<table>" in html and "certified" in html

    # certified fraction: share of samples with cosine bound >= c, sound certificates only (SPEC 9.3)
    rows = _csv(out / f"{stems[0]}.csv")
    assert len(rows) == 2 * 3 * 2  # (certified, smoothed) x eps x c: the practical bound is an estimate
    assert {r["bound"] for r in rows} == {"certified", "smoothed"}
    for r in rows:
        _e, cos, _lc, _corr = truth[(r["bound"], float(r["eps"]))]
        assert float(r["fraction"]) == pytest.approx(np.mean(cos >= float(r["c"])))
        assert int(r["n"]) == N
    # robust accuracy: correct AND label certified AND cosine >= c (c = -1: label only)
    rows = _csv(out / f"{stems[1]}.csv")
    assert {float(r["c"]) for r in rows} == {-1.0, 0.5, 0.9}
    assert {r["bound"] for r in rows} == {"certified"}  # smoothed does not certify labels, practical is not sound
    for r in rows:
        _e, cos, lc, corr = truth[(r["bound"], float(r["eps"]))]
        assert float(r["accuracy"]) == pytest.approx(np.mean(corr & lc & (cos >= float(r["c"]))))
    # the practical bound: its own "estimated" curves, with its measured violation rate
    est = _csv(out / "estimated_fraction__cnn__saliency__inf.csv")
    assert {r["bound"] for r in est} == {"practical"} and len(est) == 3 * 2
    for r in est:
        _e, cos, _lc, _corr = truth[("practical", float(r["eps"]))]
        assert float(r["fraction"]) == pytest.approx(np.mean(cos >= float(r["c"])))
        assert 0.0 <= float(r["violation_rate"]) <= 1.0
    assert "estimated_fraction__cnn__saliency__inf.png" in html and "estimated_accuracy" in html
    # bound vs attack: the best label-keeping attack per sample
    rows = _csv(out / f"{stems[2]}.csv")
    eligible = sum(int((truth[("ifia-topk", eps)][2] | truth[("deviation-euclidean", eps)][2]).sum()) for eps in EPS)
    assert len(rows) == 3 * eligible  # samples where no attack kept the label have no best attack
    for r in rows:
        eps, s = float(r["eps"]), int(r["sample"])
        cands = [truth[(m, eps)] for m in ("ifia-topk", "deviation-euclidean")]
        best = max(e[s] for e, _c, k in cands if k[s])
        assert float(r["attack_euclidean"]) == pytest.approx(best)
        assert float(r["bound_euclidean"]) == pytest.approx(truth[(r["bound"], eps)][0][s])
    # attack strength: means over samples (label-keeping runs)
    rows = _csv(out / f"{stems[3]}.csv")
    assert len(rows) == 2 * 3
    for r in rows:
        _e, cos, kept = truth[(r["attack"], float(r["eps"]))]
        assert float(r["cosine"]) == pytest.approx(cos[kept].mean())
        assert int(r["n"]) == kept.sum()


def test_report_of_empty_store_and_errors(tmp_path, capsys):
    with Store(tmp_path / "e.sqlite"):
        pass
    assert main(["report", str(tmp_path / "e.sqlite"), "--out", str(tmp_path / "o")]) == 0
    assert "No figures" in (tmp_path / "o" / "index.html").read_text()
    assert main(["report", str(tmp_path / "missing.sqlite"), "--out", str(tmp_path / "o")]) == 1
    assert main(["report", str(tmp_path / "e.sqlite"), "--out", str(tmp_path / "o"), "--cos", "2"]) == 1
    assert "--cos" in capsys.readouterr().err
