"""Phase branch-and-bound on ReLU CNNs (dense conversion) and under l2; verified leaf emptiness.

Exact oracle (``tests/exact_oracle.py``) on tiny CNNs (through an independently checked dense MLP
equivalent) and tiny MLPs under l2 (its SOCP variant); witnesses recomputed on the real net and checked
in the ball as float32 and float64 see it; attacks (sampling + PGD through the real net and softplus
surrogates) never beat ``upper``; Farkas certificates of ``complete_leaf`` on leaves that are empty by
a clear or a tiny margin, and leaves that are feasible only inside the float margins (never dropped).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from exact_oracle import exact_saliency_range
from soundness_fuzz import pgd, project, sample_points, smooth_surrogate
from test_bounds_complete import _mlp
from torch import nn

from bounds import complete_bound
from bounds.attribution import logit_gradient
from bounds.complete_leaf import farkas_verified, leaf_program
from bounds.complete_mlp import margins
from bounds.complete_net import relu_mlp_from_chain
from bounds.gradgraph import parse_chain


def _cnn(seed: int, pool: bool | str = False) -> nn.Sequential:
    torch.manual_seed(seed)
    if pool == "bn":  # conv -> BatchNorm (folded) -> relu -> avgpool + conv (one layer of two ops) -> relu
        net = nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(3, 4, 2), nn.ReLU(), nn.Flatten(), nn.Linear(4, 3),
        )
        with torch.no_grad():
            bn = net[1]
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.05, 1.0)
            bn.weight.uniform_(-1.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    elif pool:  # conv (padding) -> relu -> avgpool -> linear -> relu -> linear
        net = nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
            nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3),
        )
    else:  # cnn-small in miniature: conv s2 -> relu -> conv -> relu -> flatten -> linear
        net = nn.Sequential(
            nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 2), nn.ReLU(),
            nn.Flatten(), nn.Linear(8, 3),
        )
    return net.eval()


def _dense_equivalent(net: nn.Module, in_shape) -> nn.Sequential:
    """The CNN as Linear/ReLU layers (float64), checked against the CNN on random inputs."""
    mlp = relu_mlp_from_chain(parse_chain(net, in_shape), torch.float32)
    layers: list[nn.Module] = []
    for k, (w, b) in enumerate(zip(mlp.weights, mlp.biases)):
        lin = nn.Linear(w.shape[1], w.shape[0]).double()
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        layers += [lin] + ([nn.ReLU()] if k < len(mlp.widths) else [])
    dense = nn.Sequential(*layers).eval()
    x = torch.rand(64, *in_shape, dtype=torch.float64)
    ref = net.double()(x)
    net.float()
    # exact up to float64 rounding; a BatchNorm is folded in float32 (parse_chain), its ~1e-7 relative
    # rounding is part of the float margins
    bn = any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert torch.allclose(dense(x.flatten(1)), ref, rtol=0, atol=1e-5 if bn else 1e-12)
    return dense


def _deviation(model, pt, x, target) -> float:
    t = torch.tensor([target])
    g1 = logit_gradient(model, pt.unsqueeze(0), t).double()
    g0 = logit_gradient(model, x, t).double()
    return float((g1 - g0).norm())


def _check_witness(net, r, x, eps, norm):
    w = r.witness[0]
    assert w.dtype == x.dtype
    d = w - x[0]
    if norm == "2":
        assert float(d.flatten().norm()) <= eps  # float32, as a caller checks it
        assert float((w.double() - x[0].double()).flatten().norm()) <= eps
    else:
        assert float((w.double() - x[0].double()).abs().max()) <= eps
    assert float(w.min()) >= 0.0 and float(w.max()) <= 1.0
    assert _deviation(net, w, x, int(r.target[0])) == pytest.approx(float(r.lower[0]), rel=0, abs=1e-12)


@pytest.mark.parametrize("pool,eps,seed", [(False, 0.2, 0), (True, 0.1, 1), ("bn", 0.05, 2)])
def test_cnn_oracle_agreement(pool, eps, seed):
    net = _cnn(seed, pool)
    in_shape = (1, 4, 4) if pool else (1, 5, 5)
    dense = _dense_equivalent(net, in_shape)
    torch.manual_seed(50 + seed)
    x = torch.rand(1, *in_shape)
    r = complete_bound(net, x, eps, budget_s=20.0, tol=0.01, seed=seed)
    ex = float(exact_saliency_range(dense, x[0].flatten().double(), eps, int(r.target[0]))["max_euclidean"])
    lo, up = float(r.lower[0]), float(r.upper[0])
    widen = r.details["per_sample"][0]["float_widening"]
    assert lo <= ex + 1e-6 and ex <= up
    assert r.stop_reason[0] == "gap closed"
    assert up <= ex * 1.01 + 2 * widen
    _check_witness(net, r, x, eps, "inf")


@pytest.mark.parametrize("n,hidden,eps,seed", [(8, (16, 16), 0.2, 0), (12, (16, 16), 0.15, 1)])
def test_l2_oracle_agreement(n, hidden, eps, seed):
    net = _mlp(n, hidden, seed)
    torch.manual_seed(100 + seed)
    x = torch.rand(1, n)
    r = complete_bound(net, x, eps, norm=2, budget_s=20.0, tol=0.01, seed=seed)
    ex = float(exact_saliency_range(net, x[0], eps, int(r.target[0]), norm="2")["max_euclidean"])
    lo, up = float(r.lower[0]), float(r.upper[0])
    widen = r.details["per_sample"][0]["float_widening"]
    assert lo <= ex + 1e-6 and ex <= up
    assert r.stop_reason[0] == "gap closed"
    assert up <= ex * 1.01 + 2 * widen
    _check_witness(net, r, x, eps, "2")


def _fuzz_one(seed: int, budget_s: float) -> None:
    rng = random.Random(seed)
    norm = rng.choice(["inf", "2"])
    if rng.random() < 0.4:
        kind = rng.choice([False, True, "bn"])
        net, shape = _cnn(seed, pool=kind), ((1, 4, 4) if kind else (1, 5, 5))
    else:
        n = rng.choice([4, 8, 12])
        net, shape = _mlp(n, tuple(rng.choice([6, 12, 16]) for _ in range(rng.choice([1, 2]))), seed), (n,)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(rng.choice([1.0, 3.0]))
    n_in = int(np.prod(shape))
    eps = 10 ** rng.uniform(-2.5, -0.8) * (np.sqrt(n_in) / 2 if norm == "2" else 1)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((rng.choice([1, 2]),) + shape, generator=gen)
    r = complete_bound(net, x, eps, norm=norm, budget_s=budget_s, tol=0.01, seed=seed)
    t = r.target
    g0 = logit_gradient(net, x, t).detach()
    dom = (0.0, 1.0)
    pts = [sample_points(x, eps, norm, dom, 128, gen)]
    for model in (net, smooth_surrogate(net, 10.0, 0.1), smooth_surrogate(net, 50.0, 0.1)):
        def loss(xp, model=model):
            return (logit_gradient(model, xp, t, create_graph=True) - g0).flatten(1).norm(dim=1)

        start = project(x + eps * (2 * torch.rand(x.shape, generator=gen) - 1), x, eps, norm, dom)
        pts.append(torch.stack(pgd(loss, x, eps, norm, dom, 10, start)))
    pts = torch.cat(pts)
    p, b = pts.shape[:2]
    g = logit_gradient(net, pts.reshape(p * b, *shape), t.repeat(p)).detach().double().view(p, b, -1)
    dev = (g - g0.double().flatten(1).unsqueeze(0)).norm(dim=2).max(dim=0).values
    assert (dev <= r.upper.double()).all(), (seed, norm, dev.tolist(), r.upper.tolist())  # zero tolerance
    assert (r.lower <= r.upper).all()
    d = (r.witness.double() - x.double()).flatten(1)
    inside = d.norm(dim=1) <= eps if norm == "2" else d.abs().amax(dim=1) <= eps
    if norm == "2":
        inside &= (r.witness - x).flatten(1).norm(dim=1) <= eps  # float32, as a caller checks it
    assert inside.all() and ((r.witness >= 0) & (r.witness <= 1)).all()
    gw = logit_gradient(net, r.witness, t).detach().double()
    reached = (gw - g0.double()).flatten(1).norm(dim=1)
    assert torch.allclose(reached, r.lower.double(), rtol=1e-6, atol=1e-9)


def test_cnn_l2_fuzz():
    for seed in range(8):
        _fuzz_one(seed, 0.5)


@pytest.mark.slow
def test_cnn_l2_fuzz_slow():
    for seed in range(100, 220):
        _fuzz_one(seed, 1.0)


# ---------------------------------------------------------------------------------------------------
# verified leaf emptiness
# ---------------------------------------------------------------------------------------------------
def _two_unit_net(delta: float) -> nn.Sequential:
    """z_1 = x_1 - 0.5, z_2 = -x_1 + 0.5 - delta: both active needs 0.5 < x_1 < 0.5 - delta (empty
    iff delta >= 0; its width is -delta)."""
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)).double().eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        net[0].bias.copy_(torch.tensor([-0.5, 0.5 - delta]))
        net[2].weight.copy_(torch.tensor([[1.0, 2.0], [0.5, -1.0]]))
    return net


def _leaf(delta: float, dtype=torch.float32, ball=None):
    net = _two_unit_net(delta).to(dtype)
    mlp = relu_mlp_from_chain(parse_chain(net, (2,)), dtype)
    xl, xu = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    marg = margins(mlp, xl, xu)
    both = torch.ones(2, dtype=torch.int8)
    return leaf_program(mlp, both, both, xl, xu, marg, ball), marg


def test_leaf_emptiness_is_a_verified_certificate():
    (status, _, _), marg = _leaf(0.1)
    assert status == "empty"
    # empty by a tiny margin (a few times the float margin, far below HiGHS's tolerances relative
    # to the box): still a verified certificate
    m = float(marg[0].max())
    (status, _, _), _ = _leaf(8 * m)
    assert status == "empty"
    # empty in exact arithmetic but inside the float margins: never dropped
    (status, _, _), _ = _leaf(0.1 * m)
    assert status == "unsure"
    # a real region (width 1e-3): feasible, with an interior point
    (status, xs, depth), _ = _leaf(-1e-3)
    assert status == "feasible" and depth > 0 and 0.5 < xs[0] < 0.5 + 1e-3


def test_leaf_emptiness_l2_uses_the_ball():
    # region 0.5 < x_1 < 0.6; the ball around x0 = (0.3, 0.5) reaches x_1 <= 0.3 + r
    x0 = torch.tensor([0.3, 0.5], dtype=torch.float64)
    (status, _, _), _ = _leaf(-0.1, ball=(x0, 0.19, 0.19))
    assert status == "empty"  # the box alone meets the region: only the ball empties it
    (status, xs, _), _ = _leaf(-0.1, ball=(x0, 0.25, 0.25))
    assert status == "feasible" and np.linalg.norm(xs - x0.numpy()) <= 0.25 and xs[0] > 0.5


def test_farkas_rejects_a_wrong_certificate():
    rows = np.array([[-1.0, 0.0], [1.0, 0.0]])  # x_1 >= 0.4, x_1 <= 0.6: not empty
    rhs = np.array([-0.4, 0.6])
    lo, hi = np.zeros(2), np.ones(2)
    for y in ([1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [-1.0, 3.0]):
        assert not farkas_verified(rows, rhs, np.array(y), lo, hi)
    # x_1 >= 0.6 and x_1 <= 0.4: empty, y = (1, 1) proves it
    assert farkas_verified(rows, np.array([-0.6, 0.4]), np.array([1.0, 1.0]), lo, hi)


def test_l2_projection_passes_float_checks():
    """Rounded points stay in ball ∩ box as float32 and float64 see it, for radii at the rounding scale."""
    from bounds.complete_attack import ball_radii
    from bounds.complete_attack import project as bab_project

    gen = torch.Generator().manual_seed(3)
    for n, eps in ((784, 0.03), (784, 1e-6), (3072, 0.5), (16, 0.3)):
        x = torch.rand(n, generator=gen)
        x[: n // 5] = 0.0
        x64 = x.double()
        inner, outer = ball_radii(eps, n, torch.float32)
        assert inner < eps < outer
        xl, xu = (x64 - outer).clamp_min(0), (x64 + outer).clamp_max(1)
        far = x64 + torch.randn(256, n, generator=gen, dtype=torch.float64) * eps
        q = bab_project(far, xl, xu, torch.float32, (x64, inner))
        assert q.dtype == torch.float32
        assert bool(((q - x).norm(dim=1) <= eps).all())
        assert bool(((q.double() - x64).norm(dim=1) <= eps).all())
        assert bool(((q >= 0) & (q <= 1)).all())
