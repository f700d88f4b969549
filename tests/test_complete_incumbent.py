"""Incumbents and caps of the phase branch-and-bound: PGD inside subdomains (complete_attack.subdomain_attack,
its split hinge) and the certified_bound cap on ``upper`` / floor on the certified cosine."""

from __future__ import annotations

import pytest
import torch
from exact_oracle import exact_saliency_range
from torch import nn

from bounds import certified_bound, complete, complete_bound
from bounds.attribution import logit_gradient
from bounds.complete_attack import _hinge, project, real_badness, subdomain_attack
from bounds.complete_mlp import DT
from bounds.complete_net import relu_mlp_from_chain
from bounds.complete_objective import Objective
from bounds.gradgraph import parse_chain


def _mlp(n: int, hidden: tuple[int, ...], seed: int, scale: float = 1.0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = n
    for h in hidden:
        lin = nn.Linear(width, h)
        with torch.no_grad():
            lin.weight.mul_(scale)
        layers += [lin, nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 3))
    return nn.Sequential(*layers).eval()


def _setup(net, x, eps):
    mlp = relu_mlp_from_chain(parse_chain(net, tuple(x.shape[1:])), x.dtype)
    target = int(net(x).argmax())
    g0 = logit_gradient(net, x, torch.tensor([target])).reshape(-1).to(DT)
    obj = Objective("euclidean", g0, torch.zeros_like(g0))
    x64 = x.reshape(-1).to(DT)
    return mlp, target, obj, x64, (x64 - eps).clamp_min(0), (x64 + eps).clamp_max(1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hinge_is_zero_exactly_on_the_split_phases(seed):
    net = _mlp(6, (10, 8), seed, scale=3.0)
    x = torch.rand(1, 6, generator=torch.Generator().manual_seed(seed))
    mlp, *_ = _setup(net, x, 0.1)
    pts = torch.rand(200, 6, generator=torch.Generator().manual_seed(10 + seed), dtype=DT)
    h, signs = pts, []
    for k in range(len(mlp.widths)):
        z = h @ mlp.weights[k].t() + mlp.biases[k]
        signs.append(torch.where(z > 0, 1, -1))
        h = torch.relu(z)
    own = torch.cat(signs, dim=1).to(torch.int8)
    assert float(_hinge(mlp, pts, own).abs().max()) == 0.0
    flipped = own.clone()
    flipped[:, 3] = -flipped[:, 3]  # a first-layer unit with the wrong sign: positive hinge (z != 0 a.s.)
    assert bool((_hinge(mlp, pts, flipped) > 0).all())
    free = torch.zeros_like(own)
    assert float(_hinge(mlp, pts, free).abs().max()) == 0.0


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_subdomain_attack_returns_a_reached_point(norm):
    net = _mlp(8, (16, 16), 4, scale=2.0)
    x = torch.rand(1, 8, generator=torch.Generator().manual_seed(4))
    eps = 0.1
    mlp, target, obj, x64, xl, xu = _setup(net, x, eps)
    ball = (x64, eps * 0.999) if norm == "2" else None
    starts = xl + torch.rand(6, 8, generator=torch.Generator().manual_seed(5), dtype=DT) * (xu - xl)
    if ball is not None:
        starts = project(starts, xl, xu, DT, ball)
    splits = torch.randint(-1, 2, (6, mlp.units), generator=torch.Generator().manual_seed(6)).to(torch.int8)
    val, pt = subdomain_attack(net, mlp, starts, splits, xl, xu, target, obj, (8,), torch.float32, ball=ball)
    assert pt is not None and pt.dtype == torch.float32
    p64 = pt.to(DT)
    assert bool((p64 >= xl).all() and (p64 <= xu).all())
    if norm == "2":
        assert float((p64 - x64).norm()) <= eps
    # scored in a batch (float32 GEMMs may block differently): complete_bound recomputes its final
    # witness alone; here the value agrees to float32 rounding
    again, _ = real_badness(net, pt.unsqueeze(0), target, obj, (8,))
    assert float(again[0]) == pytest.approx(val, rel=1e-5, abs=1e-6)
    # it is a real deviation: at most the exact worst case
    ex = exact_saliency_range(net, x[0], eps, target, norm=norm)["max_euclidean"]
    assert val <= float(ex) + 1e-6


def test_upper_never_above_certified_bound_and_cosine_floor(monkeypatch):
    net = _mlp(8, (16, 16), 7, scale=2.0)
    x = torch.rand(2, 8, generator=torch.Generator().manual_seed(7))
    eps = 0.08
    cert = certified_bound(net, x, eps, "inf", method="crown")
    r = complete_bound(net, x, eps, "inf", budget_s=0.3, tol=0.0)
    assert bool((r.upper <= cert.euclidean.to(DT)).all())
    assert bool((r.lower <= r.upper).all())
    assert all(d["upper_from"] in ("certified_bound", "branch-and-bound") for d in r.details["per_sample"])
    rc = complete_bound(net, x, eps, "inf", objective="cosine", budget_s=0.3, tol=0.0)
    assert bool((rc.lower >= cert.cosine.to(DT)).all())
    # with an uninformative cap (inf) the branch-and-bound's own numbers come back
    monkeypatch.setattr(complete, "_certified_caps", lambda *a: torch.full((2,), float("inf"), dtype=DT))
    r2 = complete_bound(net, x, eps, "inf", budget_s=0.3, tol=0.0)
    assert all(d["upper_from"] == "branch-and-bound" for d in r2.details["per_sample"])


def test_nan_cap_is_ignored(monkeypatch):
    net = _mlp(6, (8, 8), 8, scale=2.0)
    x = torch.rand(1, 6, generator=torch.Generator().manual_seed(8))
    monkeypatch.setattr(complete, "_certified_caps", lambda *a: torch.full((1,), float("nan"), dtype=DT))
    r = complete_bound(net, x, 0.05, "inf", budget_s=1.0)
    assert bool(torch.isfinite(r.upper).all()) and float(r.lower[0]) <= float(r.upper[0])
    ex = exact_saliency_range(net, x[0], 0.05, int(r.target[0]))["max_euclidean"]
    assert float(r.upper[0]) >= float(ex) - 1e-9


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_chord_node_bound_covers_every_compatible_pattern(seed):
    """euclid_chord over a subdomain >= ||g_D - g0|| for every pattern D its phases allow (brute force
    over the free units of a tiny MLP)."""
    import itertools

    from bounds.complete_mlp import (
        gradient_box,
        gradient_box_linear,
        leaf_gradient,
        margins,
        phases,
        preact_bounds,
    )
    from bounds.complete_objective import euclid_chord

    net = _mlp(4, (6, 5), seed, scale=2.5)
    x = torch.rand(1, 4, generator=torch.Generator().manual_seed(seed))
    mlp, target, obj, _, xl, xu = _setup(net, x, 0.3)
    marg = margins(mlp, xl, xu)
    splits = torch.zeros(3, mlp.units, dtype=torch.int8)
    splits[1, 0], splits[2, 7] = 1, -1
    lo, hi, _ = preact_bounds(mlp, splits, xl, xu, marg)
    ph = phases(mlp, splits, lo, hi, marg)
    rec: list = []
    gl, gu = gradient_box(mlp, ph, target, rec)
    ll, lu = gradient_box_linear(mlp, ph, target, rec)
    gl, gu = torch.maximum(gl, ll), torch.minimum(gu, lu)
    ucg = gradient_box_linear(mlp, ph, target, rec, (gl + gu - 2 * obj.g0).unsqueeze(1))[:, 0]
    chord = euclid_chord(ucg, gl, gu, obj.g0)
    for s in range(3):
        free = torch.nonzero(ph[s] == 0).flatten().tolist()
        worst = 0.0
        for bits in itertools.product([1, -1], repeat=len(free)):
            p = ph[s].clone()
            p[free] = torch.tensor(bits, dtype=p.dtype)
            worst = max(worst, float((leaf_gradient(mlp, p.unsqueeze(0), target)[0] - obj.g0).norm()))
        assert worst <= float(chord[s]) + 1e-12
