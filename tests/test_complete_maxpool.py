"""Max-pool routing in complete_bound's phase mode (bounds/complete_maxpool.py, bounds/complete_net.py).

(0) torch's CPU max-pool backward routes to the FIRST maximal entry in scan order (autograd, ties, overlap,
    padding, dilation) - the convention the rewrite relies on;
(a) the rewritten ReLU MLP's value and leaf gradient (pattern = torch's phases, virtual units by their
    definition) equal the real net's output and autograd gradient at thousands of points incl. ties and
    zeros; float32 nets: virtual-unit float values within the margins, the gradient within
    gradient_float_error;
(b) complete_bound(branching="phases"): sampling / vertex / PGD (through softplus + soft-max-pool
    surrogates) deviations <= upper, lower reached at a witness in the ball;
    also a fuzz over random max-pool CNNs (pool, order, channels, scale, eps, l_inf / l2, euclidean / cosine);
(c) an independent exact oracle (enumeration of ReLU phases and window winners with LPs written directly on
    the CNN) agrees with upper when the gap closes;
(d) refusals by name, memory cap, "auto" dispatch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linprog
from soundness_fuzz import pgd, project, sample_points, smooth_surrogate
from torch import nn

from bounds import complete_bound
from bounds.attribution import logit_gradient
from bounds.checks import PhaseBranchingUnsupported
from bounds.complete_maxpool import derive_phases, torch_pattern
from bounds.complete_mlp import gradient_float_error, leaf_gradient, margins
from bounds.complete_net import relu_mlp_from_chain
from bounds.gradgraph import parse_chain

POOLS = {  # kwargs of nn.MaxPool2d
    "2s2": {"kernel_size": 2},
    "2s1": {"kernel_size": 2, "stride": 1},
    "2s2p1": {"kernel_size": 2, "stride": 2, "padding": 1},
    "2s1d2": {"kernel_size": 2, "stride": 1, "dilation": 2},
    "3s1p1": {"kernel_size": 3, "stride": 1, "padding": 1},
}


def _first_max_grad(x: torch.Tensor, v: torch.Tensor, pool: dict) -> torch.Tensor:
    """Reference backward: each window's v to its first maximal valid entry (explicit loops)."""
    k = pool["kernel_size"]
    s, p, d = pool.get("stride", k), pool.get("padding", 0), pool.get("dilation", 1)
    g = torch.zeros_like(x)
    _, c, h, w = x.shape
    for b in range(x.shape[0]):
        for ch in range(c):
            for oh in range(v.shape[2]):
                for ow in range(v.shape[3]):
                    best, arg = None, None
                    for i in range(k):
                        for j in range(k):
                            ih, iw = oh * s - p + i * d, ow * s - p + j * d
                            if 0 <= ih < h and 0 <= iw < w and (best is None or x[b, ch, ih, iw] > best):
                                best, arg = x[b, ch, ih, iw], (ih, iw)
                    g[b, ch, arg[0], arg[1]] += v[b, ch, oh, ow]
    return g


@pytest.mark.parametrize("name", list(POOLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_routes_to_first_maximum(name, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (6, 2, 5, 5), generator=gen).to(dtype)  # many exact ties
    x[0] = 1.0  # every window tied
    for fmt in (torch.contiguous_format, torch.channels_last):
        xr = x.clone().to(memory_format=fmt).requires_grad_(True)
        y = F.max_pool2d(xr, **POOLS[name])
        v = torch.randint(1, 100, y.shape, generator=gen).to(dtype)
        (g,) = torch.autograd.grad((y * v).sum(), xr)
        assert torch.equal(g.contiguous(), _first_max_grad(x, v, POOLS[name])), (name, fmt)


def _cnn(pool: str, seed: int, order: str = "relu-pool", in_shape=(1, 4, 4), ch: int = 3, hidden: int = 6,
         scale: float = 1.0, dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    conv = nn.Conv2d(in_shape[0], ch, 2)
    mp = nn.MaxPool2d(**POOLS[pool])
    body = [conv, nn.ReLU(), mp] if order == "relu-pool" else [conv, mp, nn.ReLU()]
    if order == "relu-pool-relu":
        body.append(nn.ReLU())
    n = nn.Sequential(*body, nn.Flatten())(torch.zeros(1, *in_shape)).numel()
    net = nn.Sequential(*body, nn.Flatten(), nn.Linear(n, hidden), nn.ReLU(), nn.Linear(hidden, 3)).eval()
    with torch.no_grad():
        for prm in net.parameters():
            prm.mul_(scale)
    return net.to(dtype)


def _points(shape, count: int, seed: int, dtype) -> torch.Tensor:
    """Uniform points, quantised ones (exact zeros and many ties), constant images (every window tied)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(count, *shape, generator=gen, dtype=torch.float64)
    q = count // 3
    x[:q] = (x[:q] * 3).round() / 3
    x[q : 2 * q] = x[q : 2 * q, :, :1, :1]  # constant image
    x[-1] = 0.0
    return x.to(dtype)


def _real_preacts(net: nn.Sequential, mlp, x: torch.Tensor) -> list:
    """Float pre-activations of the real hidden layers (the conv's, the hidden Linear's), None for the
    virtual layers."""
    z1 = net[0](x).flatten(1)
    lin = next(i for i, m in enumerate(net) if isinstance(m, nn.Linear))
    z2 = net[: lin + 1](x)
    return [z1] + [None] * (len(mlp.widths) - 2) + [z2]


CASES = [(p, o) for p in POOLS for o in ("relu-pool", "pool-relu")] + [("2s1", "relu-pool-relu")]


@pytest.mark.parametrize("pool,order", CASES)
def test_rewrite_value_and_gradient_exact(pool, order):
    net = _cnn(pool, 1, order, in_shape=(2, 4, 4), scale=2.0, dtype=torch.float64)
    mlp = relu_mlp_from_chain(parse_chain(net, (2, 4, 4)), torch.float64)
    x = _points((2, 4, 4), 1500, 7, torch.float64)
    ph = torch_pattern(mlp, _real_preacts(net, mlp, x))
    derived, clash = derive_phases(mlp, ph)
    assert not clash.any() and torch.equal(derived, ph)  # the implications hold at torch's patterns
    h = x.flatten(1)
    for k in range(len(mlp.widths)):
        h = torch.relu(h @ mlp.weights[k].t() + mlp.biases[k])
    out = h @ mlp.weights[-1].t() + mlp.biases[-1]
    ref = net(x).detach()
    assert torch.allclose(out, ref, rtol=0, atol=1e-12 * (1 + float(ref.abs().max())))
    for target in range(3):
        g = logit_gradient(net, x, torch.full((x.shape[0],), target)).flatten(1)
        gl = leaf_gradient(mlp, ph, target)
        assert torch.allclose(gl, g, rtol=0, atol=1e-12 * (1 + float(g.abs().max()))), target
    # the points really exercise the tie rule: many windows tie at a positive maximum
    entries = torch.relu(net[0](x)).detach().flatten(1)
    ties = 0
    for win in _windows(tuple(net[0](x[:1]).shape[1:]), POOLS[pool]):
        v = entries[:, win]
        top = v.amax(dim=1, keepdim=True)
        ties += int((((v == top).sum(dim=1) >= 2) & (top[:, 0] > 0)).sum())
    assert ties >= 100


@pytest.mark.parametrize("pool,order", [("2s1", "relu-pool"), ("3s1p1", "pool-relu"), ("2s2p1", "relu-pool")])
def test_float32_within_margins_and_gradient_error(pool, order):
    net32 = _cnn(pool, 2, order, in_shape=(2, 4, 4), scale=3.0)
    net64 = _cnn(pool, 2, order, in_shape=(2, 4, 4), scale=3.0).double()
    mlp = relu_mlp_from_chain(parse_chain(net32, (2, 4, 4)), torch.float32)
    x = _points((2, 4, 4), 1200, 11, torch.float32)
    marg = torch.cat(margins(mlp, torch.zeros(32, dtype=torch.float64), torch.ones(32, dtype=torch.float64)))
    pre32, pre64 = _real_preacts(net32, mlp, x), _real_preacts(net64, mlp, x.double())
    ph = torch_pattern(mlp, pre32)
    # virtual units: torch's phase is covered by the margin of the exact value (split rule of complete_mlp)
    h = x.double().flatten(1)
    for k in range(len(mlp.widths)):
        z = h @ mlp.weights[k].t() + mlp.biases[k]
        sl = slice(mlp.offsets[k], mlp.offsets[k] + mlp.widths[k])
        on = mlp.layer(ph, k) > 0
        assert bool((z[on] >= -marg[sl].expand_as(z)[on]).all()), k
        assert bool((z[~on] <= marg[sl].expand_as(z)[~on]).all()), k
        h = torch.relu(z)
    assert pre64 is not None
    for target in range(3):
        g32 = logit_gradient(net32, x, torch.full((x.shape[0],), target)).flatten(1).double()
        gl = leaf_gradient(mlp, ph, target)
        err = gradient_float_error(mlp, target)
        assert bool(((g32 - gl).abs() <= err).all()), target


# ----------------------------------------------------------------------------------------------
# (b) complete_bound against attacks
# ----------------------------------------------------------------------------------------------
def _deviation(net, pts, x, target) -> torch.Tensor:
    g = logit_gradient(net, pts, target.repeat(pts.shape[0])).detach().double().flatten(1)
    g0 = logit_gradient(net, x, target).detach().double().flatten(1)
    return (g - g0).norm(dim=1)


def _attack_max(net, x, eps, target, seed: int, norm: str = "inf") -> float:
    gen = torch.Generator().manual_seed(seed)
    pts = [sample_points(x, eps, norm, (0.0, 1.0), 600, gen).flatten(0, 1)]
    g0 = logit_gradient(net, x, target).detach()
    dilated = any(isinstance(m, nn.MaxPool2d) and m.dilation != 1 for m in net)  # SoftMaxPool2d: no dilation
    softplus = nn.Sequential(*[nn.Softplus(beta=10.0) if isinstance(m, nn.ReLU) else m for m in net])
    smooth = [softplus] if dilated else [smooth_surrogate(net, 10.0, 0.1), smooth_surrogate(net, 50.0, 0.02)]
    for model in [net, *smooth]:
        def loss(xp, model=model):
            g = logit_gradient(model, xp, target.repeat(xp.shape[0]), create_graph=True)
            return (g - g0).flatten(1).norm(dim=1)

        start = x + eps * (2 * torch.rand((16,) + tuple(x.shape[1:]), generator=gen) - 1)
        start = project(start, x, eps, norm, (0.0, 1.0))
        pts += pgd(loss, x, eps, norm, (0.0, 1.0), 15, start)
    return float(_deviation(net, torch.cat(pts), x, target).max())


BAB = [  # (pool, order, eps, seed)
    ("2s2", "relu-pool", 0.08, 0),
    ("2s1", "relu-pool", 0.05, 1),
    ("2s2p1", "pool-relu", 0.08, 2),
    ("2s1d2", "relu-pool", 0.06, 3),
    ("3s1p1", "pool-relu", 0.04, 4),
]


@pytest.mark.parametrize("pool,order,eps,seed", BAB)
def test_complete_bound_maxpool_vs_attacks(pool, order, eps, seed):
    net = _cnn(pool, seed, order, scale=2.0)
    x = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(50 + seed))
    x.view(-1)[:3] = 0.0  # exact zeros at the domain's edge
    x.view(-1)[5] = x.view(-1)[6]  # a tie in the input
    r = complete_bound(net, x, eps, budget_s=3.0, tol=0.01, branching="phases", seed=seed)
    assert r.method == "bab"
    lo, up = float(r.lower[0]), float(r.upper[0])
    assert lo <= up
    worst = _attack_max(net, x, eps, r.target, 900 + seed)
    assert worst <= up, (worst, up)
    w = r.witness
    assert float((w - x).abs().max()) <= eps and bool(((w >= 0) & (w <= 1)).all())
    assert float(_deviation(net, w, x, r.target)[0]) == pytest.approx(lo, rel=1e-6, abs=1e-9)


def _fuzz(seed: int, budget_s: float) -> None:
    """A random max-pool CNN (pool, order, channels, scale, eps, norm, objective), attacked at zero
    tolerance."""
    rng = np.random.default_rng(seed)
    pool = str(rng.choice(list(POOLS)))
    order = str(rng.choice(["relu-pool", "pool-relu"]))
    in_shape = (int(rng.integers(1, 3)), int(rng.integers(4, 6)), int(rng.integers(4, 6)))
    net = _cnn(pool, seed, order, in_shape, ch=int(rng.integers(2, 4)), hidden=int(rng.integers(3, 8)),
               scale=float(rng.choice([1.0, 2.0, 3.0])))
    norm, objective = str(rng.choice(["inf", "2"])), str(rng.choice(["euclidean", "cosine"]))
    eps = float(10 ** rng.uniform(-2.3, -1.0)) * (3.0 if norm == "2" else 1.0)
    x = torch.rand(1, *in_shape, generator=torch.Generator().manual_seed(seed))
    x.view(-1)[: int(rng.integers(0, 4))] = 0.0
    cfg = (seed, pool, order, in_shape, norm, objective, eps)
    r = complete_bound(net, x, eps, norm, objective=objective, budget_s=budget_s, branching="phases",
                       seed=seed)
    w = r.witness
    d = (w - x).flatten().double()
    assert float(d.abs().max() if norm == "inf" else d.norm()) <= eps, cfg
    assert bool(((w >= 0) & (w <= 1)).all()), cfg
    if objective == "euclidean":
        assert float(r.lower[0]) <= float(r.upper[0]), cfg
        worst = _attack_max(net, x, eps, r.target, 300 + seed, norm)
        assert worst <= float(r.upper[0]), (cfg, worst, float(r.upper[0]))
        reached = float(_deviation(net, w, x, r.target)[0])
        assert reached == pytest.approx(float(r.lower[0]), rel=1e-6, abs=1e-9), cfg
    else:  # lower: certified min cosine over the ball; upper: the cosine reached at the witness
        gen = torch.Generator().manual_seed(seed)
        pts = sample_points(x, eps, norm, (0.0, 1.0), 600, gen).flatten(0, 1)
        g = logit_gradient(net, pts, r.target.repeat(pts.shape[0])).double().flatten(1)
        g0 = logit_gradient(net, x, r.target).double().flatten(1)
        cos = (g @ g0.t())[:, 0] / (g.norm(dim=1) * g0.norm()).clamp_min(1e-300)
        assert float(cos.min()) >= float(r.lower[0]) - 1e-12, cfg
        assert float(r.lower[0]) <= float(r.upper[0]) + 1e-12, cfg


@pytest.mark.parametrize("seed", range(4))
def test_fuzz_maxpool(seed):
    _fuzz(seed, 1.0)


@pytest.mark.slow
def test_fuzz_maxpool_slow():
    for seed in range(100, 160):
        _fuzz(seed, 2.0)


# ----------------------------------------------------------------------------------------------
# (c) exact oracle written directly on the CNN
# ----------------------------------------------------------------------------------------------
def _windows(in_shape, pool: dict) -> list[list[int]]:
    """Valid entries per window via F.unfold of an index image (1-based, padding 0), scan order."""
    c, h, w = in_shape
    idx = torch.arange(1, c * h * w + 1, dtype=torch.float64).view(1, c, h, w)
    k = pool["kernel_size"]
    cols = F.unfold(idx, k, pool.get("dilation", 1), pool.get("padding", 0), pool.get("stride", k))
    cols = cols.view(c, k * k, -1).permute(0, 2, 1).reshape(-1, k * k)
    return [[int(v) - 1 for v in row if v > 0] for row in cols]


def _feasible(rows, box, x_hint):
    """max t s.t. strict rows a x + c >= t ||a||_1, weak rows a x + c >= 0, x in box (t <= 1) ->
    (feasible, point).  Zero rows decided by c (strict: c > 0, weak: c >= 0)."""
    a_s, c_s, a_w, c_w = [], [], [], []
    for a, c, strict in rows:
        nrm = np.abs(a).sum()
        if nrm == 0:
            if c < 0 or (strict and c <= 0):
                return False, None
            continue
        (a_s if strict else a_w).append(a / nrm)
        (c_s if strict else c_w).append(c / nrm)
    if x_hint is not None and all(a @ x_hint + c > 1e-9 for a, c in zip(a_s, c_s)) and all(
        a @ x_hint + c >= 0 for a, c in zip(a_w, c_w)
    ):
        return True, x_hint
    n = box[0].size
    ub = [np.hstack([-a, [1.0]]) for a in a_s] + [np.hstack([-a, [0.0]]) for a in a_w]
    rhs = list(c_s) + list(c_w)
    res = linprog(np.hstack([np.zeros(n), [-1.0]]), A_ub=np.array(ub) if ub else None, b_ub=rhs or None,
                  bounds=list(zip(box[0], box[1])) + [(None, 1.0)], method="highs")
    if res.status != 0:
        return False, None
    t = -res.fun
    return (t > 1e-9 if a_s else True), res.x[:n]


def oracle_max_deviation(net: nn.Sequential, x: torch.Tensor, eps: float, target: int, pool: dict) -> float:
    """max ||g_P - g(x)|| over every pattern P (conv ReLU phases, window winners = FIRST maximum, hidden
    ReLU phases) realised in the l_inf ball ∩ [0, 1]: depth-first search, one LP per branch (strict
    inequalities with depth > 1e-9, autograd's relu'(0) = 0 and first-maximum rule as weak / strict rows)."""
    conv, lin1, lin2 = net[0], net[4], net[6]
    in_shape = tuple(x.shape[1:])
    n = int(np.prod(in_shape))
    eye = torch.eye(n, dtype=torch.float64).view(n, *in_shape)
    wc = F.conv2d(eye, conv.weight.detach().double()).flatten(1).t().numpy()
    conv_shape = F.conv2d(eye[:1], conv.weight.detach().double()).shape[1:]
    bc = conv.bias.detach().double().repeat_interleave(conv_shape[1] * conv_shape[2]).numpy()
    wins = _windows(tuple(conv_shape), pool)
    w1, b1 = lin1.weight.detach().double().numpy(), lin1.bias.detach().double().numpy()
    w2 = lin2.weight.detach().double().numpy()[target]
    x0 = x.double().flatten().numpy()
    box = (np.maximum(x0 - eps, 0.0), np.minimum(x0 + eps, 1.0))
    g0 = logit_gradient(net.double(), x.double(), torch.tensor([target])).flatten().numpy()
    best = [0.0]

    def leaf(dc, winners, d1):
        v = w1.T @ (d1 * w2)
        up = np.zeros(len(bc))
        for wi, j in enumerate(winners):
            up[j] += v[wi]
        g = wc.T @ (dc * up)
        best[0] = max(best[0], float(np.linalg.norm(g - g0)))

    def branch(stage, i, rows, pt, dc, winners, d1):
        if stage == 0 and i == len(bc):
            return branch(1, 0, rows, pt, dc, winners, d1)
        if stage == 1 and i == len(wins):
            return branch(2, 0, rows, pt, dc, winners, d1)
        if stage == 2 and i == len(b1):
            return leaf(dc, winners, d1)
        ac, cc = dc[:, None] * wc, dc * bc  # entries a_j = D z_j as affine forms
        if stage == 0:
            options = [(1.0, [(wc[i], bc[i], True)]), (0.0, [(-wc[i], -bc[i], False)])]
        elif stage == 1:
            ent = wins[i]
            options = []
            for pos, j in enumerate(ent):
                cons = [(ac[j] - ac[m], cc[j] - cc[m], q < pos) for q, m in enumerate(ent) if m != j]
                options.append((j, cons))
        else:
            pa = np.array([ac[j] for j in winners])
            pc = np.array([cc[j] for j in winners])
            a, c = w1[i] @ pa, w1[i] @ pc + b1[i]
            options = [(1.0, [(a, c, True)]), (0.0, [(-a, -c, False)])]
        for val, cons in options:
            ok, p = _feasible(rows + cons, box, pt)
            if not ok:
                continue
            if stage == 0:
                dc2 = dc.copy()
                dc2[i] = val
                branch(0, i + 1, rows + cons, p, dc2, winners, d1)
            elif stage == 1:
                branch(1, i + 1, rows + cons, p, dc, winners + [val], d1)
            else:
                d2 = d1.copy()
                d2[i] = val
                branch(2, i + 1, rows + cons, p, dc, winners, d2)

    branch(0, 0, [], x0, np.zeros(len(bc)), [], np.zeros(len(b1)))
    return best[0]


ORACLE = [  # (pool, eps, seed)
    ("2s1", 0.04, 0),
    ("2s2p1", 0.06, 1),
    ("2s1d2", 0.05, 2),
]


ORACLE_SLOW = [("3s1p1", 0.08, 2), ("2s1", 0.08, 2), ("2s1d2", 0.08, 1), ("3s1p1", 0.08, 1)]


@pytest.mark.parametrize("pool,eps,seed", ORACLE + [pytest.param(*c, marks=pytest.mark.slow)
                                                   for c in ORACLE_SLOW])
def test_oracle_agreement(pool, eps, seed):
    net = _cnn(pool, 20 + seed, in_shape=(1, 4, 4), ch=2, hidden=4, scale=2.0, dtype=torch.float64)
    x = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(70 + seed), dtype=torch.float64)
    x.view(-1)[0] = 0.0
    tol = 0.01
    r = complete_bound(net, x, eps, budget_s=20.0, tol=tol, branching="phases", seed=seed)
    ex = oracle_max_deviation(net, x, eps, int(r.target[0]), POOLS[pool])
    lo, up = float(r.lower[0]), float(r.upper[0])
    widen = r.details["per_sample"][0]["float_widening"]
    assert lo <= ex + 1e-9 and ex <= up
    assert r.stop_reason[0] == "gap closed"
    assert up <= ex * (1 + tol) + 2 * widen


# ----------------------------------------------------------------------------------------------
# (d) refusals, memory, dispatch
# ----------------------------------------------------------------------------------------------
def test_refusals_by_name():
    x = torch.rand(1, 1, 4, 4)
    lin = nn.Linear(8, 3)
    first = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Flatten(), lin).eval()
    negative = nn.Sequential(nn.Conv2d(1, 2, 1), nn.MaxPool2d(2), nn.Flatten(), lin).eval()
    between = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Conv2d(2, 2, 1), nn.MaxPool2d(2),
                            nn.Conv2d(2, 2, 1), nn.ReLU(), nn.Flatten(), lin).eval()
    for net, match in ((first, "before any affine"), (negative, "negative"), (between, "negative")):
        with pytest.raises(PhaseBranchingUnsupported, match=match):
            complete_bound(net, x, 0.05, budget_s=0.5, branching="phases")
        assert complete_bound(net, x, 0.05, budget_s=0.5).method == "input-bab"  # "auto" falls back


def test_memory_cap_and_auto_dispatch():
    net = _cnn("2s2", 0, in_shape=(1, 8, 8), ch=3, hidden=6)
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(PhaseBranchingUnsupported, match="max_memory_mb"):
        complete_bound(net, x, 0.02, budget_s=0.5, branching="phases", max_memory_mb=0.05)
    assert complete_bound(net, x, 0.02, budget_s=0.5, max_memory_mb=0.05).method == "input-bab"
    r = complete_bound(net, x, 0.02, budget_s=1.0)
    assert r.method == "bab" and float(r.lower[0]) <= float(r.upper[0])
