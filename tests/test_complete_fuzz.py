"""``complete_bound`` in the soundness fuzz: random ReLU MLPs whose phases flip inside the ball, inputs with
exact 0 and 1, eps from 1e-3 to 0.2, attacked by sampling (uniform, vertices, sparse corners) and PGD on the
real deviation through the ReLU net and through softplus surrogates (the real deviation is what is scored).

Checks, at zero tolerance: every attacked deviation ||g(x') - g(x)||_2 (torch, float32) <= upper; lower is
the deviation at the returned witness, which lies in the ball ∩ domain; lower <= upper.  A violation prints
the configuration.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from soundness_fuzz import pgd, project, sample_points, smooth_surrogate
from torch import nn

from bounds import complete_bound
from bounds.attribution import logit_gradient


def _config(seed: int) -> dict:
    rng = random.Random(seed)
    depth = rng.choice([1, 2, 3])
    return {
        "seed": seed,
        "n": rng.choice([3, 5, 8, 12]),
        "hidden": tuple(rng.choice([4, 8, 12, 16, 24]) for _ in range(depth)),
        "classes": rng.choice([2, 3]),
        "scale": rng.choice([1.0, 2.0, 4.0]),
        "eps": 10 ** rng.uniform(-3, -0.7),
        "batch": rng.choice([1, 2]),
    }


def _build(cfg: dict) -> tuple[nn.Sequential, torch.Tensor]:
    torch.manual_seed(cfg["seed"])
    widths = (cfg["n"],) + cfg["hidden"]
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], cfg["classes"]))
    net = nn.Sequential(*layers).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(cfg["scale"])
    x = torch.rand(cfg["batch"], cfg["n"])
    x[:, 0] = 0.0  # exact zeros and ones at the domain's edge
    x[:, -1] = 1.0
    return net, x


def _deviations(net, pts, x, target) -> torch.Tensor:
    """(P, B) ||g(x') - g(x)||_2 on the real net, float32 as torch computes it, in float64 for the norm."""
    p, b = pts.shape[:2]
    rows = pts.reshape(p * b, -1)
    g = logit_gradient(net, rows, target.repeat(p)).detach().double().view(p, b, -1)
    g0 = logit_gradient(net, x, target).detach().double()
    return (g - g0.unsqueeze(0)).norm(dim=2)


def _attack(net, x, eps, target, gen) -> torch.Tensor:
    dom = (0.0, 1.0)
    pts = [sample_points(x, eps, "inf", dom, 96, gen)]
    g0 = logit_gradient(net, x, target).detach()
    for model in (net, smooth_surrogate(net, 10.0, 0.1), smooth_surrogate(net, 50.0, 0.1)):
        def loss(xp, model=model):
            g = logit_gradient(model, xp, target, create_graph=True)
            return (g - g0).flatten(1).norm(dim=1)

        start = project(x + eps * (2 * torch.rand(x.shape, generator=gen) - 1), x, eps, "inf", dom)
        pts.append(torch.stack(pgd(loss, x, eps, "inf", dom, 12, start)))
    return torch.cat(pts)


def _check(seed: int, budget_s: float) -> dict:
    cfg = _config(seed)
    net, x = _build(cfg)
    res = complete_bound(net, x, cfg["eps"], budget_s=budget_s, tol=0.01, seed=seed)
    gen = torch.Generator().manual_seed(40_000 + seed)
    pts = _attack(net, x, cfg["eps"], res.target, gen)
    dev = _deviations(net, pts, x, res.target)
    upper = res.upper.double()
    worst = dev.max(dim=0).values
    assert (worst <= upper).all(), f"complete upper beaten: {cfg} attack {worst.tolist()} > upper {upper.tolist()}"
    assert (res.lower <= res.upper).all(), cfg
    wit = res.witness.to(x.dtype)
    assert ((wit - x).abs().amax(dim=1) <= cfg["eps"]).all() and ((wit >= 0) & (wit <= 1)).all(), cfg
    reached = _deviations(net, wit.unsqueeze(0), x, res.target)[0]
    assert torch.allclose(reached, res.lower.double(), rtol=1e-6, atol=1e-9), (cfg, reached, res.lower)
    return {"points": int(dev.numel()), "closed": sum(r == "gap closed" for r in res.stop_reason)}


@pytest.mark.parametrize("seeds", [range(12), range(12, 24)])
def test_complete_bound_fuzz(seeds):
    total = {"points": 0, "closed": 0}
    for seed in seeds:
        out = _check(seed, budget_s=0.5)
        total = {k: total[k] + out[k] for k in total}
    assert total["points"] > 0


@pytest.mark.slow
def test_complete_bound_fuzz_slow():
    for seed in range(100, 340):
        _check(seed, budget_s=1.0)
