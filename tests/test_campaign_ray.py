"""The Ray backend computes the same rows as the local one (same seeds, same code path)."""
from __future__ import annotations

import math

import pytest
from test_campaign_resume import make_campaign

from certattr.campaign import Store, load_spec, run_campaign
from certattr.campaign.store import METRIC_COLUMNS

ray = pytest.importorskip("ray")


def _rows(path):
    with Store(path) as st:
        return {(r["ckpt"], r["attribution"], r["norm"], r["eps"], r["method"], r["restart"], r["sample"]): r
                for r in st.rows()}


def test_ray_rows_match_local(tmp_path, mnist_test):
    spec_path = make_campaign(tmp_path, steps=3)
    text = spec_path.read_text().replace("n = 12", "n = 6")
    spec_path.write_text(text)
    spec = load_spec(spec_path)
    local = run_campaign(spec, tmp_path / "local.sqlite", workers=1, threads=1, progress=False)
    remote = run_campaign(spec, tmp_path / "ray.sqlite", workers=2, backend="ray", progress=False)
    assert not ray.is_initialized()  # the private local Ray was shut down
    assert local.rows_written == remote.rows_written == 6 * 3 * 3
    a, b = _rows(tmp_path / "local.sqlite"), _rows(tmp_path / "ray.sqlite")
    assert a.keys() == b.keys()
    for key, ra in a.items():
        rb = b[key]
        assert (ra["label_kept"], ra["correct"], ra["kind"]) == (rb["label_kept"], rb["correct"], rb["kind"]), key
        for col in METRIC_COLUMNS:
            if ra[col] is None or rb[col] is None:
                assert ra[col] is rb[col] is None, (key, col)
            else:  # threads differ (2 vs 1 per worker): float summation order only
                assert math.isclose(ra[col], rb[col], rel_tol=1e-4, abs_tol=1e-5), (key, col, ra[col], rb[col])
