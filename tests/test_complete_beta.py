"""alpha-beta-CROWN subdomain bounds (bounds.complete_beta) and complete_bound(subdomain_bound="alpha-beta").

* Soundness of the split-constrained pre-activation bounds on random ReLU MLPs (2-3 hidden layers, weights
  scaled so phases flip inside the region, inputs with exact 0 and 1, l_inf and l2): every sampled point
  that satisfies a subdomain's splits (rejection sampling around feasible anchors), and every feasible
  iterate of a penalised PGD pushed towards each bound's extreme inside the split region, has its exact
  (float64) pre-activations inside the bounds.  Splits at every layer, consistent (from an anchor's
  phases) and random (often infeasible: then nothing may be sampled, and the subdomain may be proven empty).
* Never looser than CROWN + clamps, and strictly tighter somewhere (more units fixed, more empty subdomains).
* complete_bound with it agrees with the exact oracle (tests/exact_oracle.py) on tiny MLPs, l_inf and l2.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from exact_oracle import exact_saliency_range
from torch import nn

from bounds import complete_bound
from bounds.complete_beta import optimized_upper
from bounds.complete_mlp import DT, _crown_upper, margins, preact_bounds, relu_mlp_from_chain
from bounds.gradgraph import parse_chain


def _net(n: int, hidden: tuple[int, ...], seed: int, scale: float = 1.0) -> nn.Sequential:
    torch.manual_seed(seed)
    widths = (n,) + hidden
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], 3))
    net = nn.Sequential(*layers).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return net


def _setup(n, hidden, seed, scale, eps, norm, subdomains=48, frac=0.3):
    """MLP, region (box, ball), margins, root bounds, split vectors (half from anchors, half random),
    and the anchors."""
    net = _net(n, hidden, seed, scale)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, generator=gen, dtype=DT)
    x[0], x[-1] = 0.0, 1.0  # exact zeros and ones at the domain's edge
    mlp = relu_mlp_from_chain(parse_chain(net, (n,)), torch.float32)
    xl, xu = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    ball = (x, eps) if norm == "2" else None
    marg = margins(mlp, xl, xu)
    root = torch.zeros(1, mlp.units, dtype=torch.int8)
    lo0, hi0, _ = preact_bounds(mlp, root, xl, xu, marg, ball=ball)
    half = subdomains // 2
    anchors = _project(x + eps * (2 * torch.rand(half, n, generator=gen, dtype=DT) - 1), x, xl, xu, eps, norm)
    za = _preacts(mlp, anchors)
    unst = ((torch.cat(lo0, 1) < 0) & (torch.cat(hi0, 1) > 0))[0]
    pick = (torch.rand(half, mlp.units, generator=gen) < frac) & unst
    consistent = torch.where(pick, torch.where(za > 0, 1, -1), 0)
    pick = (torch.rand(half, mlp.units, generator=gen) < frac) & unst
    rand_sign = torch.where(torch.rand(half, mlp.units, generator=gen) < 0.5, 1, -1)
    random = torch.where(pick, rand_sign, 0)
    splits = torch.cat([consistent, random]).to(torch.int8)
    return {
        "mlp": mlp,
        "x": x,
        "xl": xl,
        "xu": xu,
        "ball": ball,
        "marg": marg,
        "prior": (lo0, hi0),
        "splits": splits,
        "anchors": torch.cat([anchors, anchors]),
        "eps": eps,
        "norm": norm,
    }


def _preacts(mlp, pts: torch.Tensor) -> torch.Tensor:
    out, h = [], pts
    for k in range(len(mlp.widths)):
        z = h @ mlp.weights[k].t() + mlp.biases[k]
        out.append(z)
        h = z.clamp_min(0)
    return torch.cat(out, dim=-1)


def _project(p, x, xl, xu, eps, norm):
    if norm == "2":
        d = p - x
        d = d * (eps * (1 - 1e-9) / d.norm(dim=-1, keepdim=True).clamp_min(1e-30)).clamp(max=1.0)
        p = x + d
    return torch.maximum(torch.minimum(p, xu), xl)


def _violation(z, s, m):
    """(..., ) total violation of the split constraints s z + m >= 0 (units with s != 0)."""
    return ((-(s * z + m)).clamp_min(0) * (s != 0)).sum(dim=-1)


def _bounds(c, iters):
    return preact_bounds(
        c["mlp"], c["splits"], c["xl"], c["xu"], c["marg"], ball=c["ball"], prior=c["prior"], opt_iters=iters
    )


CASES = [  # (n, hidden, seed, scale, eps, norm)
    (6, (12, 12), 5, 2.0, 0.15, "inf"),
    (8, (16, 16, 16), 1, 2.0, 0.1, "inf"),
    (10, (16, 16), 2, 1.0, 0.15, "2"),
    (8, (12, 12, 12), 3, 2.0, 0.2, "2"),
]


@pytest.mark.parametrize("n,hidden,seed,scale,eps,norm", CASES)
def test_alpha_beta_preact_bounds_sound(n, hidden, seed, scale, eps, norm):
    c = _setup(n, hidden, seed, scale, eps, norm)
    mlp, splits = c["mlp"], c["splits"].to(DT)
    lows, highs, empty = _bounds(c, 8)
    lo, hi = torch.cat(lows, 1), torch.cat(highs, 1)
    m = torch.cat(c["marg"])
    gen = torch.Generator().manual_seed(100 + seed)
    S = splits.shape[0]
    # rejection sampling: points around each anchor (shrinking radii) and uniform in the region
    P = 3000
    rad = eps * torch.logspace(-3, 0, P, dtype=DT).unsqueeze(1)
    around = c["anchors"].unsqueeze(1) + rad * (2 * torch.rand(S, P, n, generator=gen, dtype=DT) - 1)
    uni = c["x"] + eps * (2 * torch.rand(S, P, n, generator=gen, dtype=DT) - 1)
    pts = _project(torch.cat([around, uni], dim=1), c["x"], c["xl"], c["xu"], eps, norm)
    # penalised PGD towards each subdomain's extremes of its deepest-layer units (max and min)
    k = len(mlp.widths) - 1
    off, w = mlp.offsets[k], mlp.widths[k]
    for sign in (1.0, -1.0):
        xp = pts[:, ::40].clone()
        unit = torch.randint(off, off + w, (S, xp.shape[1]), generator=gen)
        for t in range(40):
            xp = xp.detach().requires_grad_(True)
            z = _preacts(mlp, xp)
            obj = sign * z.gather(2, unit.unsqueeze(2)).squeeze(2) - 10.0 * _violation(
                z, splits.unsqueeze(1), m
            )
            (g,) = torch.autograd.grad(obj.sum(), xp)
            with torch.no_grad():
                step = eps / 5 * 0.1 ** (t / 39)
                d = g.sign() if norm == "inf" else g / g.norm(dim=-1, keepdim=True).clamp_min(1e-30)
                xp = _project(xp + step * d, c["x"], c["xl"], c["xu"], eps, norm)
        pts = torch.cat([pts, xp.detach()], dim=1)
    z = _preacts(mlp, pts)
    feasible = _violation(z, splits.unsqueeze(1), m) == 0
    assert int(feasible[: S // 2].sum()) > S // 2 * 100  # the consistent subdomains have many points
    assert not bool(feasible[empty].any()), "a subdomain proven empty holds a feasible point"
    tol = 1e-10 * (1 + z.abs())
    below = (z < lo.unsqueeze(1) - tol) & feasible.unsqueeze(2)
    above = (z > hi.unsqueeze(1) + tol) & feasible.unsqueeze(2)
    assert not bool(below.any() or above.any()), (
        f"bound beaten: {int(below.sum())} below, {int(above.sum())} above "
        f"(worst {float(((lo.unsqueeze(1) - z) * below).max()):.3g}, "
        f"{float(((z - hi.unsqueeze(1)) * above).max()):.3g})"
    )


@pytest.mark.parametrize("n,hidden,seed,scale,eps,norm", CASES)
def test_never_looser_than_crown_and_tighter_somewhere(n, hidden, seed, scale, eps, norm):
    c = _setup(n, hidden, seed, scale, eps, norm)
    lc, hc, ec = _bounds(c, 0)
    la, ha, ea = _bounds(c, 8)
    Lc, Hc, La, Ha = (torch.cat(t, 1) for t in (lc, hc, la, ha))
    slack = 1e-9 * (1 + Lc.abs() + Hc.abs())
    live = ~ea  # an empty subdomain's bounds are kept well formed but mean nothing
    assert bool((La[live] >= Lc[live] - slack[live]).all() and (Ha[live] <= Hc[live] + slack[live]).all())
    assert bool((ea | ~ec).all()), "a subdomain CROWN proves empty must stay empty"
    gain = (Hc - Lc) - (Ha - La)
    assert float(gain[live].max()) > 1e-3 or int(ea.sum()) > int(ec.sum())


def test_iterate_zero_is_crown():
    """optimized_upper without steps is CROWN (complete_mlp._crown_upper) up to its float widening."""
    c = _setup(8, (16, 16, 16), 1, 2.0, 0.1, "inf")
    mlp = c["mlp"]
    lows, highs, _ = _bounds(c, 0)
    k = 2
    w, b = mlp.weights[k], mlp.biases[k]
    S = c["splits"].shape[0]
    lam = torch.cat([w, -w]).unsqueeze(0).expand(S, -1, -1)
    bias = torch.cat([b, -b]).unsqueeze(0).expand(S, -1)
    ref = _crown_upper(mlp, lam, bias, lows, highs, k - 1, c["xl"], c["xu"])
    got = optimized_upper(
        mlp, lam, bias, lows, highs, k - 1, c["xl"], c["xu"], c["splits"], c["marg"], iters=0
    )
    assert bool((got >= ref).all())
    assert torch.allclose(got, ref, rtol=1e-11, atol=1e-12)
    opt = optimized_upper(
        mlp, lam, bias, lows, highs, k - 1, c["xl"], c["xu"], c["splits"], c["marg"], iters=8
    )
    assert bool((opt <= got + 1e-12).all()) and float((got - opt).max()) > 1e-3


@pytest.mark.parametrize(
    "n,hidden,eps,seed,norm",
    [
        (8, (16, 16), 0.05, 0, "inf"),
        (8, (12, 12, 12), 0.05, 3, "inf"),
        (8, (16, 16), 0.15, 1, "2"),
        (6, (12, 12), 0.2, 4, "2"),
    ],
)
def test_oracle_agreement_alpha_beta(n, hidden, eps, seed, norm):
    net = _net(n, hidden, seed, 1.5)
    torch.manual_seed(100 + seed)
    x = torch.rand(1, n)
    tol = 0.01
    r = complete_bound(
        net, x, eps, norm=norm, budget_s=20.0, tol=tol, seed=seed, subdomain_bound="alpha-beta"
    )
    ex = float(exact_saliency_range(net, x[0], eps, int(r.target[0]), norm=norm)["max_euclidean"])
    lo, up = float(r.lower[0]), float(r.upper[0])
    widen = r.details["per_sample"][0]["float_widening"]
    assert lo <= ex + 1e-6 and ex <= up
    assert r.stop_reason[0] == "gap closed"
    assert up <= ex * (1 + tol) + 2 * widen + 1e-9


def test_auto_mode_resolution():
    from bounds.complete_beta import AUTO_MAX_UNITS, ITERS, opt_iters_for

    assert opt_iters_for("crown", 10) == 0 and opt_iters_for("alpha-beta", 10**6) == ITERS > 0
    assert opt_iters_for("auto", AUTO_MAX_UNITS) == ITERS and opt_iters_for("auto", AUTO_MAX_UNITS + 1) == 0


def test_bad_subdomain_bound():
    net = _net(4, (8,), 0)
    with pytest.raises(ValueError, match="subdomain_bound"):
        complete_bound(net, torch.rand(1, 4), 0.05, branching="phases", subdomain_bound="beta")


@pytest.mark.slow
def test_hard_net_closes_with_alpha_beta():
    """bench_complete's 16-32-32 eps 0.1 net: crown leaves a 27% gap after 10 s, alpha-beta closed it in
    about 5 s (benchmarks/results/complete_beta.txt)."""
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x = torch.rand(1, 16)
    r = complete_bound(net, x, 0.1, budget_s=30.0, subdomain_bound="alpha-beta")
    assert r.stop_reason[0] == "gap closed"
