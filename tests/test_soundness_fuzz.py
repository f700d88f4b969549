"""The soundness fuzz suite of ``certified_bound`` (tests/soundness_fuzz.py), default and slow jobs.

Default: 60 seeded configurations (every first-op kind, both norms, every attribution, every method)
with the default attack budget.  Slow (``-m slow``): 600 further configurations (seeds 1000-1599, 10x)
with a stronger budget (2x the samples, 1.5x the PGD steps, two restarts, a second sharper
surrogate, 3 coordinates per side).  Any
violation or exception fails with the reproducer.  The totals (configurations, certificates, attack
points) are printed and written to tests/.cache/soundness_fuzz_summary.json.

Two meta-tests keep the suite honest: the generator really covers what the docstring promises, and the
attacks do find the violations of planted wrong certificates (a box frozen at g(x), a box shrunk by
10% of its width).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import soundness_fuzz as sf
import torch

from bounds import certified_bound

DEFAULT_SEEDS = list(range(60))
SLOW_SEEDS = list(range(1000, 1600))
CHUNK = 10
SUMMARY: dict = {}


def _chunks(seeds: list[int], size: int) -> list[tuple[int, ...]]:
    return [tuple(seeds[i : i + size]) for i in range(0, len(seeds), size)]


def _record(job: str, out: dict) -> None:
    tot = SUMMARY.setdefault(job, {})
    for k, v in out["totals"].items():
        tot[k] = tot.get(k, 0) + v
    path = Path(__file__).parent / ".cache" / "soundness_fuzz_summary.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(SUMMARY, indent=1))
    print(f"\nsoundness fuzz [{job}] so far: {json.dumps(tot)}")


def _run(job: str, seeds, budget) -> None:
    out = sf.run_sweep(seeds, budget)
    _record(job, out)
    if out["failing"]:
        msg = "\n".join(sf.format_report(r) for r in out["failing"])
        pytest.fail(f"{len(out['failing'])} of {len(seeds)} configurations violated:\n{msg}", pytrace=False)


@pytest.mark.parametrize("seeds", _chunks(DEFAULT_SEEDS, CHUNK), ids=lambda s: f"seeds{s[0]}-{s[-1]}")
def test_fuzz_default(seeds):
    _run("default", seeds, sf.DEFAULT_BUDGET)


@pytest.mark.slow
@pytest.mark.parametrize("seeds", _chunks(SLOW_SEEDS, 50), ids=lambda s: f"seeds{s[0]}-{s[-1]}")
def test_fuzz_slow(seeds):
    _run("slow", seeds, sf.SLOW_BUDGET)


# ----------------------------------------------------------------------------------------------
# the generator covers what it promises
# ----------------------------------------------------------------------------------------------
def test_generator_coverage():
    cfgs = [sf.random_config(s) for s in DEFAULT_SEEDS]
    firsts = {c.layers[0][0] for c in cfgs}
    assert {"conv", "linear", "relu", "softplus", "sigmoid", "tanh", "maxpool", "avgpool", "flatten",
            "dropout"} <= firsts | {"bn"} and ({"bn2d", "bn1d"} & firsts), firsts
    assert {c.norm for c in cfgs} == {"2", "inf"}
    assert {c.attribution for c in cfgs} == set(sf.ATTRS)
    assert None in {c.domain for c in cfgs}
    pools = {(n, kw["k"] > kw["s"]) for c in cfgs for n, kw in c.layers if n == "maxpool"}
    assert ("maxpool", True) in pools and ("maxpool", False) in pools, pools
    eps = sorted(c.eps for c in cfgs)
    assert eps[0] < 1e-3 and eps[-1] > 0.1
    mixed = [c for c in cfgs if len({n for n, _ in c.layers} & {"relu", "softplus", "sigmoid", "tanh"}) >= 2]
    assert len(mixed) >= 10
    for c in cfgs[:8]:
        x = sf.make_input(c)
        assert (x == 0).any()
        assert c.domain is None or (x == 1).any() or x.numel() < 12
    net = sf.build_model(next(c for c in cfgs if any(n == "bn2d" for n, _ in c.layers)))
    bn = next(m for m in net if isinstance(m, torch.nn.BatchNorm2d))
    assert not bn.training and float(bn.running_var.min()) < 0.5


# ----------------------------------------------------------------------------------------------
# the attacks find planted violations
# ----------------------------------------------------------------------------------------------
def _planted(cfg_seed: int, norm: str, eps: float, attr: str = "saliency"):
    cfg = dataclasses.replace(sf.random_config(cfg_seed), norm=norm, eps=eps, attribution=attr, domain=(0.0, 1.0))
    net, x = sf.build_model(cfg), sf.make_input(cfg)
    res = certified_bound(net, x, eps, norm, attr, method="crown", ig_steps=cfg.ig_steps)
    return cfg, net, x, res


def _violations_of(cfg, net, x, res) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    blocks = sf.attack_points(net, x, cfg, res.target, {"crown": res}, sf.DEFAULT_BUDGET, gen)
    pts = torch.cat([p for _, p in blocks])
    src = [name for name, p in blocks for _ in range(p.shape[0])]
    gs = sf.attr_fn(net, pts.flatten(0, 1), res.target.repeat(pts.shape[0]), cfg.attribution,
                    steps=cfg.ig_steps).detach()
    return sf.check_certificate(res, gs.view(pts.shape), None, src)


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_attacks_find_a_frozen_box(norm):
    """The family-1 symptom: a box equal to g(x) (euclidean 0) on a ReLU net with a real ball."""
    cfg, net, x, res = _planted(11, norm, 0.1 if norm == "inf" else 0.5)
    frozen = dataclasses.replace(res, lower=res.attribution_at_x.clone(), upper=res.attribution_at_x.clone(),
                                 euclidean=torch.zeros_like(res.euclidean), cosine=torch.ones_like(res.cosine))
    found = {v["check"] for v in _violations_of(cfg, net, x, frozen)}
    assert {"box-upper", "box-lower", "euclidean"} <= found, found


def test_attacks_find_a_shrunk_box():
    """Each box entry pulled in by 10% of its width towards g(x): a sound box with a little too little
    room must be caught (coordinate-targeted PGD and sampling)."""
    cfg, net, x, res = _planted(25, "inf", 0.05)
    g0 = res.attribution_at_x
    shrunk = dataclasses.replace(res, upper=res.upper - 0.1 * (res.upper - g0), lower=res.lower + 0.1 * (g0 - res.lower))
    found = _violations_of(cfg, net, x, shrunk)
    assert {"box-upper", "box-lower"} <= {v["check"] for v in found}, found
