"""Branch-and-bound (bounds.complete_bound) against the exact oracle, witness checks, bad input."""

from __future__ import annotations

import inspect

import pytest
import torch
from exact_oracle import exact_saliency_range
from torch import nn

from bounds import complete_bound
from bounds.attribution import logit_gradient
from bounds.checks import PhaseBranchingUnsupported


def _mlp(n: int, hidden: tuple[int, ...], seed: int, classes: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = n
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers).eval()


def _deviation(model, pt, x, target) -> float:
    t = torch.tensor([target])
    g1 = logit_gradient(model, pt.unsqueeze(0), t).double()
    g0 = logit_gradient(model, x, t).double()
    return float((g1 - g0).norm())


CASES = [  # (n, hidden, eps, seed)
    (8, (16, 16), 0.05, 0),
    (12, (24, 24), 0.04, 1),
    (16, (16, 16), 0.05, 2),
    (8, (12, 12, 12), 0.05, 3),
]


@pytest.mark.parametrize("n,hidden,eps,seed", CASES)
def test_oracle_agreement_and_witness(n, hidden, eps, seed):
    exact_range = exact_saliency_range
    net = _mlp(n, hidden, seed)
    torch.manual_seed(100 + seed)
    x = torch.rand(1, n)
    tol = 0.01
    r = complete_bound(net, x, eps, budget_s=20.0, tol=tol, seed=seed)
    ex = float(exact_range(net, x[0], eps, int(r.target[0]))["max_euclidean"])
    lo, up = float(r.lower[0]), float(r.upper[0])
    assert lo <= ex + 1e-6 <= up + 1e-6
    assert ex <= up
    assert r.stop_reason[0] == "gap closed"
    assert up - lo <= max(tol * up, 2 * r.details["per_sample"][0]["float_widening"]) + 1e-12
    assert up <= ex * (1 + tol) + 2 * r.details["per_sample"][0]["float_widening"]
    # the witness is a real point of the ball ∩ domain, and its deviation is the reported lower
    w = r.witness[0]
    assert w.dtype == x.dtype
    assert float((w.double() - x[0].double()).abs().max()) <= eps
    assert float(w.min()) >= 0.0 and float(w.max()) <= 1.0
    assert _deviation(net, w, x, int(r.target[0])) == pytest.approx(lo, rel=0, abs=1e-12)
    assert float(r.gap[0]) == pytest.approx(up - lo)
    assert float(r.euclidean[0]) == up


def test_node_lp_option_agrees_with_oracle(monkeypatch):
    import bounds.complete_phase as phase_module

    exact_range = exact_saliency_range
    monkeypatch.setattr(phase_module, "NODE_LP", True)
    monkeypatch.setattr(phase_module, "BETA_ITERS", 5)
    net = _mlp(12, (24, 24), 1)
    torch.manual_seed(101)
    x = torch.rand(1, 12)
    r = complete_bound(net, x, 0.04, budget_s=20.0)
    ex = float(exact_range(net, x[0], 0.04, int(r.target[0]))["max_euclidean"])
    assert float(r.lower[0]) <= ex + 1e-6 and ex <= float(r.upper[0]) <= ex * 1.01 + 1e-6
    assert r.stop_reason == ["gap closed"]


def test_sound_under_sampling_and_batch():
    net = _mlp(10, (20, 20), 7)
    torch.manual_seed(8)
    x = torch.rand(2, 10)
    eps = 0.05
    r = complete_bound(net, x, eps, budget_s=10.0)
    assert r.lower.shape == (2,) and r.upper.shape == (2,) and r.witness.shape == x.shape
    assert len(r.stop_reason) == 2 and r.subdomains.shape == (2,)
    gen = torch.Generator().manual_seed(0)
    for i in range(2):
        lo_b = (x[i] - eps).clamp_min(0)
        hi_b = (x[i] + eps).clamp_max(1)
        u = torch.rand(2000, 10, generator=gen)
        corner = (torch.rand(2000, 10, generator=gen) > 0.5).float()
        pts = torch.cat([lo_b + u * (hi_b - lo_b), lo_b + corner * (hi_b - lo_b)])
        t = torch.full((pts.shape[0],), int(r.target[i]))
        g = logit_gradient(net, pts, t).double()
        g0 = logit_gradient(net, x[i : i + 1], t[:1]).double()
        dev = (g - g0).norm(dim=1)
        assert float(dev.max()) <= float(r.upper[i])
        assert float(r.lower[i]) <= float(r.upper[i])
    rows = r.rows()
    assert rows[0]["kind"] == "complete" and {"lower", "upper", "gap", "stop_reason"} <= set(rows[0])


def test_eps_zero_and_single_pattern():
    net = _mlp(8, (16, 16), 0)
    x = torch.rand(1, 8)
    r = complete_bound(net, x, 0.0)
    assert float(r.lower[0]) == 0.0 and float(r.upper[0]) == 0.0 and r.stop_reason == ["gap closed"]
    r = complete_bound(net, x, 1e-6)  # one activation pattern: only the float widening remains
    assert float(r.lower[0]) == 0.0 and 0.0 < float(r.upper[0]) < 1e-3
    assert r.stop_reason == ["gap closed"]


def test_flattened_images_and_float64_models():
    exact_range = exact_saliency_range
    torch.manual_seed(21)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(9, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)
    )
    net = net.eval()
    x = torch.rand(1, 1, 3, 3)
    r = complete_bound(net, x, 0.06, budget_s=10.0)
    assert r.witness.shape == x.shape and r.stop_reason == ["gap closed"]
    ex = float(exact_range(net, x.flatten(1)[0], 0.06, int(r.target[0]))["max_euclidean"])
    assert float(r.lower[0]) <= ex + 1e-6 and ex <= float(r.upper[0])
    net64 = _mlp(8, (16, 16), 4).double()
    x64 = torch.rand(1, 8, dtype=torch.float64)
    r64 = complete_bound(net64, x64, 0.05, budget_s=10.0)
    assert r64.witness.dtype == torch.float64
    ex64 = float(exact_range(net64, x64[0], 0.05, int(r64.target[0]))["max_euclidean"])
    assert float(r64.lower[0]) <= ex64 + 1e-9 and ex64 <= float(r64.upper[0]) <= ex64 * 1.01 + 1e-9


def test_budget_stop_is_still_sound():
    net = _mlp(16, (32, 32), 11)
    torch.manual_seed(12)
    x = torch.rand(1, 16)
    r = complete_bound(net, x, 0.1, budget_s=0.05)
    assert r.stop_reason[0] in ("budget", "gap closed")
    assert float(r.lower[0]) <= float(r.upper[0])
    full = complete_bound(net, x, 0.1, budget_s=3.0)
    assert float(full.upper[0]) <= float(r.upper[0]) + 1e-12
    assert float(full.lower[0]) <= float(r.upper[0])


def test_bad_input():
    net = _mlp(4, (8,), 0)
    x = torch.rand(1, 4)
    with pytest.raises(ValueError, match="budget_s"):
        complete_bound(net, x, 0.1, budget_s=0)
    with pytest.raises(ValueError, match="budget_s"):
        complete_bound(net, x, 0.1, budget_s=-1)
    with pytest.raises(ValueError, match="tol"):
        complete_bound(net, x, 0.1, tol=-0.01)
    with pytest.raises(ValueError, match="objective"):
        complete_bound(net, x, 0.1, objective="kendall")
    with pytest.raises(ValueError, match="norm"):
        complete_bound(net, x, 0.1, norm=3)
    with pytest.raises(ValueError, match="eps"):
        complete_bound(net, x, -0.1)
    # the phase mode's limits are PhaseBranchingUnsupported (a ValueError: "auto" falls back on it)
    phases = {"branching": "phases"} if "branching" in inspect.signature(complete_bound).parameters else {}
    with pytest.raises(PhaseBranchingUnsupported, match="saliency"):
        complete_bound(net, x, 0.1, attribution="ig", **phases)
    smooth = nn.Sequential(nn.Linear(4, 8), nn.Softplus(), nn.Linear(8, 3)).eval()
    with pytest.raises(PhaseBranchingUnsupported, match="softplus"):
        complete_bound(smooth, x, 0.1, **phases)
    # max-pooling of ReLU outputs is supported (tests/test_complete_maxpool.py); of possibly negative
    # values it is refused by name
    pooled = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2, 3)
    ).eval()
    with pytest.raises(PhaseBranchingUnsupported, match="max-pooling"):
        complete_bound(pooled, torch.rand(1, 1, 4, 4), 0.1, **phases)
    linear = nn.Sequential(nn.Linear(4, 3)).eval()
    with pytest.raises(PhaseBranchingUnsupported, match="ReLU"):
        complete_bound(linear, x, 0.1, **phases)
    with pytest.raises(ValueError, match="target"):
        complete_bound(net, x, 0.1, target=5)
    with pytest.raises(ValueError, match="gradient_bound"):
        complete_bound(net, x, 0.1, gradient_bound="alpha")
    with pytest.raises(ValueError, match="max_memory_mb"):
        complete_bound(net, x, 0.1, max_memory_mb=0)


@pytest.mark.parametrize("n,hidden,eps,seed", CASES[:2])
def test_cosine_objective_against_oracle(n, hidden, eps, seed):
    import numpy as np

    exact_range = exact_saliency_range
    net = _mlp(n, hidden, seed)
    torch.manual_seed(100 + seed)
    x = torch.rand(1, n)
    tol = 0.01
    r = complete_bound(net, x, eps, objective="cosine", budget_s=20.0, tol=tol, seed=seed)
    o = exact_range(net, x[0], eps, int(r.target[0]))
    grads, g0 = o["gradients"], o["g_x"]
    exact = float(((grads @ g0) / (np.linalg.norm(grads, axis=1) * np.linalg.norm(g0))).min())
    lo, up = float(r.lower[0]), float(r.upper[0])  # certified lower bound on min cos, cos reached
    assert lo <= exact + 1e-6 and exact <= up + 1e-6
    assert r.stop_reason[0] == "gap closed" and up - lo <= tol + 1e-12
    assert float(r.cosine[0]) == lo
    w = r.witness[0]
    t = torch.tensor([int(r.target[0])])
    cos = torch.nn.functional.cosine_similarity(
        logit_gradient(net, w.unsqueeze(0), t).double(), logit_gradient(net, x, t).double()
    )
    assert float(cos[0]) == pytest.approx(up, abs=1e-9)
    assert float((w.double() - x[0].double()).abs().max()) <= eps


def test_linear_gradient_bound_is_sound_and_tighter():
    from bounds.complete_mlp import (
        gradient_box,
        gradient_box_linear,
        margins,
        phases,
        preact_bounds,
        relu_mlp_from_chain,
    )
    from bounds.gradgraph import parse_chain

    net = _mlp(12, (24, 24), 5)
    torch.manual_seed(6)
    x = torch.rand(1, 12)
    eps = 0.08
    mlp = relu_mlp_from_chain(parse_chain(net, (12,)), torch.float32)
    x64 = x[0].double()
    xl, xu = (x64 - eps).clamp_min(0), (x64 + eps).clamp_max(1)
    marg = margins(mlp, xl, xu)
    root = torch.zeros(1, mlp.units, dtype=torch.int8)
    lo, hi, empty = preact_bounds(mlp, root, xl, xu, marg)
    assert not bool(empty.any())
    ph = phases(mlp, root, lo, hi, marg)
    target = int(net(x).argmax())
    rec: list = []
    gl, gu = gradient_box(mlp, ph, target, rec)
    ll, lu = gradient_box_linear(mlp, ph, target, rec)
    assert float((lu - ll).mean()) < float((gu - gl).mean())
    gen = torch.Generator().manual_seed(0)
    pts = (xl + torch.rand(4000, 12, generator=gen, dtype=torch.float64) * (xu - xl)).float()
    g = logit_gradient(net, pts, torch.full((4000,), target)).double()
    assert bool((g <= lu + 1e-6).all()) and bool((g >= ll - 1e-6).all())
    a = complete_bound(net, x, eps, gradient_bound="interval", budget_s=2.0)
    b = complete_bound(net, x, eps, gradient_bound="linear", budget_s=2.0)
    assert float(a.lower[0]) <= float(b.upper[0]) and float(b.lower[0]) <= float(a.upper[0])


def test_mixed_mccormick_product_is_sound_and_not_wider():
    from bounds import certified_bound
    from bounds.lirpa_compat import custom_ops

    product = custom_ops()["certattr::Product"]
    net = _mlp(10, (16, 16), 9, classes=4)
    torch.manual_seed(10)
    x = torch.rand(3, 10)
    eps = 0.05
    saved = product.MIX
    try:
        product.MIX = False
        fixed = certified_bound(net, x, eps, norm="inf", method="crown")
        product.MIX = True
        mixed = certified_bound(net, x, eps, norm="inf", method="crown")
    finally:
        product.MIX = saved
    assert bool((mixed.upper - mixed.lower <= fixed.upper - fixed.lower + 1e-9).all())
    assert float((mixed.upper - mixed.lower).mean()) < float((fixed.upper - fixed.lower).mean())
    gen = torch.Generator().manual_seed(1)
    for i in range(3):
        lo_b, hi_b = (x[i] - eps).clamp_min(0), (x[i] + eps).clamp_max(1)
        pts = lo_b + torch.rand(3000, 10, generator=gen) * (hi_b - lo_b)
        g = logit_gradient(net, pts, mixed.target[i].repeat(3000))
        assert bool((g >= mixed.lower[i] - 1e-6).all()) and bool((g <= mixed.upper[i] + 1e-6).all())


@pytest.mark.slow
def test_oracle_agreement_sweep():
    exact_range = exact_saliency_range
    for seed in range(12):
        n = (8, 12, 16)[seed % 3]
        net = _mlp(n, (16 + 8 * (seed % 3),) * 2, 50 + seed)
        torch.manual_seed(200 + seed)
        x = torch.rand(1, n)
        eps = (0.02, 0.035, 0.05)[seed % 3]
        r = complete_bound(net, x, eps, budget_s=30.0)
        ex = float(exact_range(net, x[0], eps, int(r.target[0]))["max_euclidean"])
        assert float(r.lower[0]) <= ex + 1e-6 and ex <= float(r.upper[0])
        if r.stop_reason[0] == "gap closed":
            assert float(r.upper[0]) <= ex * 1.01 + 2 * r.details["per_sample"][0]["float_widening"]
