"""Tests for ``certattr attack``: a tiny run writes the TSV (header comments, columns, one line per
sample), pgd has its own columns, --save-adv keeps x_adv, user errors exit 1 with one line."""
from __future__ import annotations

import numpy as np
import pytest

from certattr import checkpoint
from certattr.cli import main
from certattr.commands.attack import ATTRIBUTION_COLUMNS, PGD_COLUMNS


@pytest.fixture(scope="module")
def ckpt(trained_cnn_small, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "cnn"
    checkpoint.save(trained_cnn_small, path, dataset="mnist")
    return path


def _read(path):
    lines = path.read_text().splitlines()
    comments = [line for line in lines if line.startswith("#")]
    table = [line.split("\t") for line in lines if not line.startswith("#")]
    return comments, table[0], table[1:]


def test_cli_attack_ifia_writes_tsv_and_adv(ckpt, tmp_path, capsys, mnist_test):
    out, adv = tmp_path / "a.tsv", tmp_path / "adv.npz"
    rc = main(["attack", str(ckpt), "--n", "4", "--start", "2", "--attack", "ifia-topk", "--eps", "0.1",
               "--steps", "3", "--batch-size", "3", "--out", str(out), "--save-adv", str(adv), "--no-progress"])
    assert rc == 0
    comments, header, rows = _read(out)
    assert header == ATTRIBUTION_COLUMNS
    assert len(rows) == 4 and [int(r[0]) for r in rows] == [2, 3, 4, 5]
    sha = checkpoint.info(ckpt)["sha256"]
    assert any(sha in c for c in comments) and any("seed 0" in c for c in comments)
    labels = mnist_test[1][2:6].tolist()
    assert [int(r[1]) for r in rows] == labels
    for r in rows:
        rec = dict(zip(header, r))
        assert rec["attack"] == "ifia-topk" and rec["norm"] == "inf" and float(rec["eps"]) == 0.1
        assert rec["label_kept"] in ("0", "1") and 0.0 <= float(rec["topk_intersection"]) <= 1.0
        assert -1.0 <= float(rec["cosine"]) <= 1.0 and float(rec["euclidean"]) >= 0
    saved = np.load(adv)
    assert saved["x_adv"].shape == (4, 1, 28, 28)
    x = mnist_test[0][2:6].numpy()
    assert np.abs(saved["x_adv"] - x).max() <= 0.1 + 1e-6
    assert "ifia-topk: 4 images" in capsys.readouterr().err


def test_cli_attack_pgd_columns(ckpt, tmp_path):
    out = tmp_path / "p.tsv"
    rc = main(["attack", str(ckpt), "--n", "4", "--attack", "pgd", "--eps", "0.3", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    _, header, rows = _read(out)
    assert header == PGD_COLUMNS and len(rows) == 4
    for r in rows:
        rec = dict(zip(header, r))
        assert rec["success"] == str(int(rec["correct"] == "1" and rec["adv_predict"] != rec["label"]))


def test_cli_attack_deviation_and_errors(ckpt, tmp_path, capsys):
    out = tmp_path / "d.tsv"
    assert main(["attack", str(ckpt), "--n", "2", "--attack", "deviation-cos", "--norm", "2", "--eps", "0.5",
                 "--steps", "2", "--restarts", "2", "--out", str(out), "--no-progress"]) == 0
    _, header, rows = _read(out)
    assert len(rows) == 2 and all(float(dict(zip(header, r))["cosine"]) <= 1 for r in rows)
    capsys.readouterr()
    assert main(["attack", str(ckpt), "--n", "2", "--attack", "pgd", "--eps", "-1", "--out", str(out)]) == 1
    assert main(["attack", str(ckpt), "--n", "2", "--attack", "ifia-topk", "--eps", "0.1", "--k", "1000",
                 "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("certattr attack: error:") and "eps" in err[0]
    assert "k=1000" in err[-1]
