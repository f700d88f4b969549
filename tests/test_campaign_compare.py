"""The results store (atomic units, primary keys) and compare's violation logic on hand-made stores."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from certattr.campaign.compare import compare, to_tsv
from certattr.campaign.store import Store
from certattr.cli import main
from certattr.errors import CertattrError

CK = "a" * 64


def _row(method, kind, family, sample, restart=0, eps=0.1, **values):
    row = {"ckpt": CK, "attribution": "saliency", "norm": "inf", "eps": eps, "method": method,
           "restart": restart, "sample": sample, "family": family, "kind": kind, "correct": True, "time": 0.01}
    row.update(values)
    return row


def _attack_unit(method, kind, restart, euclid, cosine, kept, eps=0.1):
    return [_row(method, kind, "attack", s, restart, eps, euclidean=e, cosine=c, label_kept=k, topk_intersection=0.5,
                 kendall=0.4) for s, (e, c, k) in enumerate(zip(euclid, cosine, kept))]


def _bound_unit(method, kind, euclid, cosine, certified=(True,) * 4, eps=0.1):
    return [_row(method, kind, "bound", s, 0, eps, euclidean=e, cosine=c, label_certified=lc)
            for s, (e, c, lc) in enumerate(zip(euclid, cosine, certified))]


def make_store(path: Path, *, certified_euclid=(2.0, 2.5, 1.0, 4.0), pgd_kept=(True,) * 4) -> Path:
    with Store(path) as st:
        st.add_checkpoint(CK, "/models/net", "runs/net", {"sha256": CK})
        # best label-keeping attack per sample: euclid (1.5, 2.5, 0.5, 3.0), cosine (0.8, 0.6, 0.9, 0.5)
        st.write_unit(_attack_unit("ifia-topk", "ifia", 0, [1.0, 2.0, 0.5, 3.0], [0.9, 0.8, 0.95, 0.5], [1, 1, 1, 1]))
        st.write_unit(_attack_unit("deviation-euclidean", "deviation", 0, [1.5, 1.0, 0.4, 9.0],
                                   [0.8, 0.9, 0.9, -0.9], [1, 1, 1, 0]))  # sample 3 flipped: not eligible
        st.write_unit(_attack_unit("deviation-euclidean", "deviation", 1, [1.2, 2.5, 0.3, 2.0],
                                   [0.85, 0.6, 0.99, 0.7], [1, 1, 1, 1]))
        st.write_unit([_row("pgd", "pgd", "attack", s, label_kept=k) for s, k in enumerate(pgd_kept)])
        st.write_unit(_bound_unit("certified", "certified", certified_euclid, [0.4, 0.5, 0.5, 0.1]))
        # practical: sample 0 beaten (1.5 > 1.0), sample 2 within the 1e-6 relative tolerance, sample 3 beaten
        # on cosine only (0.5 < 0.6)
        st.write_unit(_bound_unit("practical", "practical", [1.0, 3.0, 0.5 * (1 - 5e-7), 3.5], [0.5, 0.5, 0.5, 0.6],
                                  certified=(True, True, False, True)))
    return path


def test_store_roundtrip_and_primary_key(tmp_path):
    path = make_store(tmp_path / "s.sqlite")
    with Store(path) as st:
        assert st.count() == 4 * 6
        assert st.count(family="bound") == 8
        assert st.done_samples(CK, "saliency", "inf", 0.1, "deviation-euclidean", 1) == {0, 1, 2, 3}
        assert st.done_samples(CK, "saliency", "inf", 0.2, "deviation-euclidean", 1) == set()
        assert st.duplicates() == 0
        row = next(st.rows(method="ifia-topk", sample=3))
        assert row["euclidean"] == 3.0 and row["label_kept"] == 1 and row["correct"] == 1
        # a unit is all or nothing: a duplicate key in the middle rolls the whole unit back
        unit = [_row("new", "ifia", "attack", 7), _row("ifia-topk", "ifia", "attack", 0)]
        with pytest.raises(sqlite3.IntegrityError):
            st.write_unit(unit)
        assert st.count(method="new") == 0
        assert st.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        st.add_method("m", "attack", "ifia", 1, {"k": 1})
        st.add_method("m", "attack", "ifia", 2, {"k": 1})  # restarts may grow
        with pytest.raises(CertattrError, match="already holds method 'm'"):
            st.add_method("m", "attack", "ifia", 1, {"k": 2})
        with pytest.raises(CertattrError, match="lacks"):
            st.write_unit([{"ckpt": CK}])
    with pytest.raises(CertattrError, match="not found"):
        Store(tmp_path / "none.sqlite", readonly=True)
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(CertattrError, match="not a certattr results store"):
        Store(tmp_path / "junk.sqlite", readonly=True)


def test_compare_values_and_practical_warning(tmp_path, capsys):
    path = make_store(tmp_path / "s.sqlite")
    comp = compare(path)
    rows = {r["bound"]: r for r in comp.rows}
    assert set(rows) == {"certified", "practical"}
    cert, prac = rows["certified"], rows["practical"]
    assert cert["samples"] == 4 and cert["attacks"] == 4 * 4  # ifia + 2 deviation restarts + pgd
    best = np.array([1.5, 2.5, 0.5, 3.0])
    assert cert["attack_euclidean"] == pytest.approx(np.median(best))
    assert cert["attack_cosine"] == pytest.approx(np.median([0.8, 0.6, 0.9, 0.5]))
    ratio = np.array([2.0, 2.5, 1.0, 4.0]) / best
    assert (cert["tightness_p10"], cert["tightness_median"], cert["tightness_p90"]) == pytest.approx(
        tuple(np.quantile(ratio, [0.1, 0.5, 0.9])))
    assert cert["violations"] == 0 and cert["label_violations"] == 0  # sample 1: attack == bound exactly
    assert prac["violations"] == 2 and prac["violations_euclidean"] == 1 and prac["violations_cosine"] == 1
    assert prac["label_certified"] == 0.75
    assert {(v.sample, v.what) for v in comp.violations} == {(0, "euclidean"), (3, "cosine")}
    assert not comp.certified_violated

    out = tmp_path / "cmp.tsv"
    assert main(["compare", str(path), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "warning: practical bound exceeded on 2 of 4 tested" in captured.err
    assert "certified bound: 0 violations on 4 tested" in captured.err
    assert "ERROR" not in captured.err
    lines = out.read_text().splitlines()
    header = lines[0].split("\t")
    assert len(lines) == 3 and header[:5] == ["checkpoint", "attribution", "norm", "eps", "bound"]
    first = dict(zip(header, lines[1].split("\t")))
    assert first["bound"] == "certified" and first["checkpoint"] == "net" and float(first["eps"]) == 0.1
    assert to_tsv(comp) == out.read_text()


def test_certified_violation_exits_3(tmp_path, capsys):
    # sample 3: certified Euclidean bound 2.9 below the best label-keeping attack 3.0
    path = make_store(tmp_path / "bad.sqlite", certified_euclid=(2.0, 2.5, 1.0, 2.9))
    comp = compare(path)
    assert comp.certified_violated and comp.count("certified") == 1
    assert main(["compare", str(path)]) == 3
    err = capsys.readouterr().err
    assert "ERROR: certified bound violated" in err and "sample 3" in err


def test_certified_label_violation_exits_3(tmp_path, capsys):
    # PGD flips sample 2, whose label the certified bound claimed constant on the ball
    path = make_store(tmp_path / "lbl.sqlite", pgd_kept=(True, True, False, True))
    comp = compare(path)
    assert [(v.sample, v.what, v.kind) for v in comp.violations if v.what == "label"] == [(2, "label", "certified")]
    assert main(["compare", str(path)]) == 3


def test_compare_cli_errors(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "missing.sqlite")]) == 1
    assert "not found" in capsys.readouterr().err
    with Store(tmp_path / "empty.sqlite"):
        pass
    assert main(["compare", str(tmp_path / "empty.sqlite")]) == 0
    assert "nothing to compare" in capsys.readouterr().err
