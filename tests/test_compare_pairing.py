"""compare pairs each bound with the attacks on the function it bounds (SPEC 9.3): campaigns on a
ReLU and a softplus tabular MLP (breast-cancer), and the report's honest curves."""
from __future__ import annotations

import math

import pytest

pytest.importorskip("sklearn")

from test_tabular import train_tabular

from certattr.campaign import Store, load_spec, run_campaign
from certattr.campaign.compare import compare, to_text
from certattr.cli import main

SPEC = """
name = "pairing"
seed = 0
batch_size = 24
checkpoints = ["relu", "softplus"]

[data]
dataset = "breast-cancer"
n = 24

[grid]
attributions = ["saliency"]
norms = [2]
eps = [0.1]

[[attacks]]
name = "deviation"
restarts = 2
params = {{ steps = 15 }}

[[attacks]]
name = "deviation"
params = {{ steps = 15, measure = "surrogate", measure_beta = 10.0 }}

[[attacks]]
name = "smoothed"
params = {{ radius = 0.5, steps = 4, noise_samples = 4, eval_samples = 512 }}

[[attacks]]
name = "pgd"
params = {{ steps = 10, step_size_rel = 0.25 }}

[[bounds]]
kind = "practical"
params = {{ linf_method = "columns" }}

[[bounds]]
kind = "certified"

[[bounds]]
kind = "smoothed"
params = {{ radius = 0.5, n_samples = 512, alpha = {alpha} }}
"""


@pytest.fixture(scope="module")
def campaign_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairing")
    train_tabular("relu", out=root / "relu")
    train_tabular("softplus", out=root / "softplus")
    (root / "spec.toml").write_text(SPEC.format(alpha=0.001), encoding="utf-8")
    store = root / "results.sqlite"
    run_campaign(load_spec(root / "spec.toml"), store, workers=1, threads=1, progress=False)
    return store


def _rows(comp, checkpoint):
    return [r for r in comp.rows if r["checkpoint"] == checkpoint]


def test_each_bound_pairs_with_its_own_function(campaign_store):
    comp = compare(campaign_store)
    with Store(campaign_store, readonly=True) as st:
        on = {m: info.get("measured_on") for (_ck, m, _r), info in st.unit_info().items()}
    assert on["deviation-euclidean"] == "real"
    assert on["smoothed-euclidean"] == "smoothed(r=0.5,normalized)"
    relu, soft = _rows(comp, "relu"), _rows(comp, "softplus")
    assert len(relu) == len(soft) == 3
    for r in relu + soft:
        assert r["tested"] == r["samples"] == 24, r  # every bound met attacks on its own function
        if r["kind"] == "certified":
            assert r["paired_with"] == "real" and r["violations"] == 0 and r["label_violations"] == 0
        if r["kind"] == "smoothed":
            assert r["paired_with"] == "smoothed(r=0.5,normalized)"
            assert "alpha=0.001" in r["meaning"] and r["violations"] == 0
    # ReLU net: the practical bound is about the surrogate, and the real-net deviations are reported apart
    prac_relu = [r for r in relu if r["kind"] == "practical"]
    assert all(r["paired_with"] == "softplus-surrogate(beta=10)" for r in prac_relu)
    assert all(not math.isnan(r["other_exceed_rate"]) for r in prac_relu)
    # softplus net: no surrogate; the practical bound pairs with the real-network deviations
    prac_soft = [r for r in soft if r["kind"] == "practical"]
    assert all(r["paired_with"] == "real" for r in prac_soft)
    assert all(0.0 <= r["violation_rate"] <= 1.0 for r in prac_soft + prac_relu)
    assert not comp.certified_violated
    text = to_text(comp)
    assert "sound bound: any violation is a bug" in text and "measured violation rate on" in text


def test_compare_cli_and_report_are_honest(campaign_store, tmp_path, capsys):
    assert main(["compare", str(campaign_store)]) == 0
    err = capsys.readouterr().err
    assert "certified bound: 0 violations on 48 tested" in err
    assert "by attacks on the network it describes" in err and "expected <= alpha = 0.001" in err
    import matplotlib

    from certattr.report.curves import plot_certified_fraction, plot_estimated
    from certattr.report.html import write_index

    matplotlib.use("Agg")
    out = tmp_path / "report"
    out.mkdir()
    with Store(campaign_store, readonly=True) as st:  # the two figure kinds at stake (the full report: slow)
        figs = plot_certified_fraction(st, out) + plot_estimated(st, campaign_store, out)
    html = write_index(out, figs, compare(campaign_store)).read_text(encoding="utf-8")
    assert "violation rate" in html and "estimated" in html
    cert_csv = next(out.glob("certified_fraction__relu*.csv")).read_text()
    assert "practical" not in cert_csv  # certified curves come from sound certificates only
    est_csv = next(out.glob("estimated_fraction__relu*.csv")).read_text()
    assert "practical" in est_csv and "violation_rate" in est_csv.splitlines()[0]


def test_certify_summary_line_says_what_the_numbers_are():
    from types import SimpleNamespace

    from certattr.commands.certify import summary_line

    def line(bound):
        args = SimpleNamespace(bound=bound, out="o.tsv", radius=0.5, alpha=0.001)
        return summary_line(args, bound, 8, 1.0, 0.5, 0.4, 0.75, 0.5, "softplus-surrogate(beta=10)", 1.0)

    assert "SOUND over the whole ball" in line("certified") and "label certified 0.750" in line("certified")
    prac = line("practical")
    assert "ESTIMATE, NOT sound" in prac and "certified" not in prac and "softplus-surrogate(beta=10)" in prac
    smooth = line("smoothed")
    assert "SMOOTHED attribution h" in smooth and "0.999" in smooth and "label not assessed" in smooth


def test_complete_bound_pairs_with_the_real_network(tmp_path):
    pytest.importorskip("bounds.complete")
    train_tabular("relu", out=tmp_path / "relu")
    spec = """
checkpoints = ["relu"]
batch_size = 4
[data]
dataset = "breast-cancer"
n = 4
[grid]
attributions = ["saliency"]
norms = ["inf"]
eps = [0.01]
[[attacks]]
name = "deviation"
params = { steps = 10 }
[[attacks]]
name = "deviation"
params = { steps = 10, measure = "surrogate" }
[[bounds]]
kind = "complete"
params = { budget_s = 0.5 }
"""
    (tmp_path / "spec.toml").write_text(spec, encoding="utf-8")
    run_campaign(load_spec(tmp_path / "spec.toml"), tmp_path / "s.sqlite", workers=1, threads=1, progress=False)
    (row,) = compare(tmp_path / "s.sqlite").rows
    assert row["kind"] == "complete" and row["paired_with"] == "real" and row["tested"] == 4
    assert row["attacks"] == 4 and row["violations"] == 0 and "bug" in row["meaning"]
