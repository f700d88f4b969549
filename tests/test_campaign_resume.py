"""A real campaign killed with SIGKILL mid-way resumes with nothing lost and nothing counted twice."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from certattr import checkpoint
from certattr.campaign import Store, load_spec, run_campaign
from certattr.campaign.units import total_rows
from certattr.models import build_model

SPEC = """
name = "resume"
seed = 1
batch_size = 2
checkpoints = ["net"]

[data]
dataset = "mnist"
n = 12

[grid]
attributions = ["saliency"]
norms = ["inf", 2]
eps = {{inf = [0.01, 0.03], 2 = [0.5]}}

[[attacks]]
name = "ifia"
restarts = 2
params = {{ kind = "topk", k = 50, steps = {steps}, step_size = 0.01 }}

[[attacks]]
name = "pgd"
params = {{ steps = 5, step_size = 0.01 }}
"""


def make_campaign(folder: Path, steps: int = 8) -> Path:
    torch.manual_seed(0)
    model = build_model("mlp", hidden=(64,))
    checkpoint.save(model, folder / "net", dataset="mnist")
    spec = folder / "spec.toml"
    spec.write_text(SPEC.format(steps=steps))
    return spec


def _count(store: Path) -> int:
    if not store.exists():
        return 0
    try:
        conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=1)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM results").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.OperationalError:  # tables not created yet
        return 0


def test_sigkill_mid_campaign_then_resume(tmp_path, mnist_test):
    spec_path = make_campaign(tmp_path)
    store = tmp_path / "results.sqlite"
    spec = load_spec(spec_path)
    expected = total_rows(spec)
    assert expected == 12 * 3 * 3  # samples x (norm, eps) x (2 ifia restarts + pgd)

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "certattr", "campaign", str(spec_path), "--store", str(store),
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while _count(store) == 0 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, f"campaign ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process group we started, at once
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = _count(store)
    assert 0 < killed_at < expected, "the kill must land mid-way"
    assert killed_at % 2 == 0  # whole units only (2 samples per unit)
    with Store(store) as st:
        before = {(r["method"], r["restart"], r["norm"], r["eps"], r["sample"]): r["euclidean"] for r in st.rows()}

    summary = run_campaign(load_spec(spec_path), store, workers=2, progress=False)
    assert summary.rows_before == killed_at
    assert summary.rows_written == expected - killed_at
    assert summary.complete
    with Store(store) as st:
        assert st.count() == expected
        assert st.duplicates() == 0
        after = {(r["method"], r["restart"], r["norm"], r["eps"], r["sample"]): r["euclidean"] for r in st.rows()}
        assert len(after) == expected
        assert all(after[k] == v for k, v in before.items())  # nothing rewritten
        assert {r["restart"] for r in st.rows(method="ifia-topk")} == {0, 1}
        assert len(st.runs()) == 2 and st.runs()[1]["rows_written"] == expected - killed_at
        assert "resume" in st.runs()[0]["spec"]
    # a third run has nothing left to do
    again = run_campaign(load_spec(spec_path), store, workers=1, threads=1, progress=False)
    assert again.rows_written == 0 and again.units_run == 0 and again.rows_before == expected


def test_rows_hold_attack_values(tmp_path, mnist_test):
    spec_path = make_campaign(tmp_path, steps=3)
    store = tmp_path / "s.sqlite"
    run_campaign(load_spec(spec_path), store, workers=1, threads=1, progress=False, max_units=4)
    with Store(store) as st:
        rows = list(st.rows())
        assert len(rows) == 8
        ifia = [r for r in rows if r["method"] == "ifia-topk"]
        assert ifia and all(r["kind"] == "ifia" and r["family"] == "attack" for r in ifia)
        for r in ifia:
            assert r["label_kept"] in (0, 1) and r["correct"] in (0, 1)
            assert r["euclidean"] >= 0 and -1 <= r["cosine"] <= 1 + 1e-6 and 0 <= r["topk_intersection"] <= 1
        # which network the attack's gradients came from: stored once per (ckpt, method, restart)
        info = st.unit_info()
        assert info[(ifia[0]["ckpt"], "ifia-topk", 0)]["network"].startswith("softplus-surrogate")
        # `correct` is the clean prediction against the label
        x, y = mnist_test
        model = checkpoint.load(tmp_path / "net")
        with torch.no_grad():
            pred = model(x[:12]).argmax(1)
        for r in rows:
            assert r["correct"] == int(pred[r["sample"]] == y[r["sample"]])
        assert st.checkpoints()[checkpoint.info(tmp_path / "net")["sha256"]]["ref"] == "net"
        assert set(st.methods()) == {"ifia-topk", "pgd"}


def test_bad_settings_fail_before_running(tmp_path):
    spec_path = make_campaign(tmp_path)
    from certattr.errors import CertattrError

    with pytest.raises(CertattrError, match="unknown backend"):
        run_campaign(load_spec(spec_path), tmp_path / "s.sqlite", backend="dask")
    with pytest.raises(CertattrError, match="workers must be >= 1"):
        run_campaign(load_spec(spec_path), tmp_path / "s.sqlite", workers=0)
    text = spec_path.read_text().replace("n = 12", "start = 9995\nn = 12")
    spec_path.write_text(text)
    with pytest.raises(CertattrError, match="exceeds"):
        run_campaign(load_spec(spec_path), tmp_path / "s.sqlite")
