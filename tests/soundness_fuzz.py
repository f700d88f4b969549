"""Soundness fuzzing of ``bounds.certified_bound``: seeded random nets, inputs, radii, and attacks.

A certificate claims, for every x' in S = B_p(x, eps) ∩ domain (p in {2, inf}):

    lower <= g(x') <= upper (elementwise),   ||g(x') - g(x)||_2 <= euclidean,
    cos(g(x), g(x')) >= cosine,   f_y(x') - max_{j != y} f_j(x') > 0 where label_certified,
    |T_k(m(x)) ∩ T_k(m(x'))| / k >= topk_intersection(k)   (m = sum_c |g_c|).

Every claim is checked at every attack point x' (the real float32 network, autograd's conventions:
SPEC 9.1), with the tolerance ``tol(v) = TOL_REL * (1 + |v|)``: zero, since the certificate's outward
float margins are proven (the deviation and the cosine of the float32 attributions are evaluated in
float64, so the check adds no rounding of its own).  A violation is reported with a reproducer:
``python tests/soundness_fuzz.py --seed SEED`` rebuilds the exact configuration.

Generators vary what the bound code assumes: the first op of every supported kind (Linear, Conv2d,
ReLU, Softplus(beta), Sigmoid, Tanh, MaxPool2d, AvgPool2d, BatchNorm in eval with random running
statistics incl. tiny variances, Flatten, Dropout), mixed activations, overlapping (stride < kernel)
and non-overlapping max-pools, weights scaled so that many units are unstable, inputs with exact zeros
and ones, ℓ2 and ℓ∞, every attribution, every method (crown, alpha-crown, ibp), eps log-uniform in
[1e-4, 0.5], domain [0, 1] or None.  Attacks (``attack_points``): dense sampling (uniform in S, ℓ∞ vertices / ℓ2 sphere points,
sparse corners), PGD on ||g(x') - g(x)||^2 through the real net and through a smooth surrogate (ReLU ->
softplus, max-pool -> log-sum-exp), coordinate-targeted PGD (push g_i up / down for the entries whose
certified box is tightest) and PGD on the margins f_y - f_j.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bounds import certified_bound
from bounds.attribution import attribution as attr_fn

TOL_REL = 0.0
ATTRS = ("saliency", "grad_x_input", "ig")
METHODS = ("crown", "alpha-crown", "ibp")
IMAGE_FIRST = ("conv", "relu", "softplus", "sigmoid", "tanh", "maxpool", "avgpool", "bn", "flatten", "dropout")
TAB_FIRST = ("linear", "relu", "softplus", "sigmoid", "tanh", "bn", "flatten", "dropout")
ACTS = ("relu", "relu", "softplus", "sigmoid", "tanh")
POOLS = ((2, 2, 0), (3, 1, 1), (2, 1, 0), (3, 2, 1))  # (kernel, stride, padding): overlapping when s < k


# ----------------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------------
@dataclass
class FuzzConfig:
    """One fuzz case: a layer list (name, kwargs), the input shape and the certificate's arguments."""

    seed: int
    in_shape: tuple
    layers: list
    scale: float
    norm: str
    eps: float
    attribution: str
    domain: tuple | None
    ig_steps: int
    batch: int
    classes: int

    def reproducer(self) -> str:
        return f"python tests/soundness_fuzz.py --seed {self.seed}   # {json.dumps(asdict(self))}"


def _act(rng: random.Random, name: str | None = None) -> tuple:
    """An activation layer spec: ``name``, or a random one if None; softplus with a random beta."""
    betas = [0.5, 2.0, 10.0] if name else [0.5, 1.0, 2.0, 5.0, 10.0]
    name = name or rng.choice(ACTS)
    return (name, {"beta": rng.choice(betas)} if name == "softplus" else {})


def random_config(seed: int) -> FuzzConfig:
    """A random supported architecture and certificate request (deterministic in ``seed``)."""
    rng = random.Random(seed)
    image = rng.random() < 0.6
    layers: list = []
    if image:
        c, hw = rng.choice([1, 2]), rng.choice([5, 6, 7, 8])
        shape: tuple = (c, hw, hw)
        in_shape = shape
        first = IMAGE_FIRST[seed % len(IMAGE_FIRST)] if seed < 1000 else rng.choice(IMAGE_FIRST)
        ops = [first] + [rng.choice(["conv", "conv", "act", "pool", "bn"]) for _ in range(rng.randint(1, 4))]
        if first == "flatten":  # an MLP on the flattened image
            ops = [first]
        for op in ops:
            if op in ("relu", "softplus", "sigmoid", "tanh", "act"):
                layers.append(_act(rng, None if op == "act" else op))
            elif op == "conv":
                k, s, p = rng.choice([(3, 1, 1), (2, 1, 0), (3, 2, 1), (2, 2, 0)])
                if shape[1] + 2 * p < k + 1:
                    continue
                out = rng.choice([2, 3, 4])
                layers.append(("conv", {"in": shape[0], "out": out, "k": k, "s": s, "p": p}))
                hw = (shape[1] + 2 * p - k) // s + 1
                shape = (out, hw, hw)
            elif op in ("pool", "maxpool", "avgpool"):
                kind = op if op != "pool" else rng.choice(["maxpool", "maxpool", "avgpool"])
                k, s, p = rng.choice(POOLS)
                hw = (shape[1] + 2 * p - k) // s + 1
                if hw < 2:
                    continue
                layers.append((kind, {"k": k, "s": s, "p": p}))
                shape = (shape[0], hw, hw)
            elif op == "bn":
                layers.append(("bn2d", {"c": shape[0]}))
            elif op in ("dropout", "flatten"):
                layers.append((op, {}))
        if not layers or layers[-1][0] != "flatten":
            layers.append(("flatten", {}))
        flat = int(math.prod(shape))
    else:
        flat = rng.randint(4, 12)
        shape = (flat,)
        in_shape = shape
        first = TAB_FIRST[seed % len(TAB_FIRST)] if seed < 1000 else rng.choice(TAB_FIRST)
        if first in ("relu", "softplus", "sigmoid", "tanh"):
            layers.append(_act(rng, first))
        elif first == "bn":
            layers.append(("bn1d", {"c": flat}))
        elif first in ("flatten", "dropout"):
            layers.append((first, {}))
    if layers and rng.random() < 0.3:  # (a tabular "linear" first op stays first)
        layers.append(("dropout", {}))
    for _ in range(rng.randint(1, 2)):
        hidden = rng.choice([6, 8, 12, 16])
        layers.append(("linear", {"in": flat, "out": hidden}))
        if rng.random() < 0.25:
            layers.append(("bn1d", {"c": hidden}))
        layers.append(_act(rng))
        flat = hidden
    classes = rng.choice([2, 3, 4])
    layers.append(("linear", {"in": flat, "out": classes}))
    return FuzzConfig(
        seed=seed,
        in_shape=in_shape,
        layers=layers,
        scale=math.exp(rng.uniform(math.log(0.5), math.log(4.0))),
        norm=rng.choice(["2", "inf"]),
        eps=math.exp(rng.uniform(math.log(1e-4), math.log(0.5))),
        attribution=rng.choice(ATTRS),
        domain=None if rng.random() < 0.1 else (0.0, 1.0),
        ig_steps=rng.choice([2, 3, 4]),
        batch=rng.choice([1, 2]),
        classes=classes,
    )


# ----------------------------------------------------------------------------------------------
# models and inputs
# ----------------------------------------------------------------------------------------------
def build_model(cfg: FuzzConfig) -> nn.Sequential:
    """The network of ``cfg`` with seeded weights: N(0, scale^2 / fan_in) weights and biases of the
    same order as the pre-activation spread (many unstable units); BatchNorm in eval with random
    running means, log-uniform running variances in [1e-4, 1] and signed affine weights."""
    gen = torch.Generator().manual_seed(10_000 + cfg.seed)
    mods: list[nn.Module] = []
    for name, kw in cfg.layers:
        if name == "linear":
            m = nn.Linear(kw["in"], kw["out"])
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * cfg.scale / kw["in"] ** 0.5)
                m.bias.copy_(torch.randn(kw["out"], generator=gen) * 0.3)
        elif name == "conv":
            m = nn.Conv2d(kw["in"], kw["out"], kw["k"], stride=kw["s"], padding=kw["p"])
            fan = kw["in"] * kw["k"] ** 2
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * cfg.scale / fan**0.5)
                m.bias.copy_(torch.randn(kw["out"], generator=gen) * 0.3)
        elif name in ("bn2d", "bn1d"):
            m = (nn.BatchNorm2d if name == "bn2d" else nn.BatchNorm1d)(kw["c"])
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(kw["c"], generator=gen) * 0.5)
                m.running_var.copy_(torch.exp(torch.empty(kw["c"]).uniform_(math.log(1e-4), 0.0, generator=gen)))
                m.weight.copy_(torch.randn(kw["c"], generator=gen) * 0.3)
                m.bias.copy_(torch.randn(kw["c"], generator=gen) * 0.3)
        elif name == "relu":
            m = nn.ReLU()
        elif name == "softplus":
            m = nn.Softplus(beta=kw["beta"])
        elif name == "sigmoid":
            m = nn.Sigmoid()
        elif name == "tanh":
            m = nn.Tanh()
        elif name == "maxpool":
            m = nn.MaxPool2d(kw["k"], kw["s"], kw["p"])
        elif name == "avgpool":
            m = nn.AvgPool2d(kw["k"], kw["s"], kw["p"])
        elif name == "flatten":
            m = nn.Flatten()
        elif name == "dropout":
            m = nn.Dropout(0.3)
        else:
            raise KeyError(name)
        mods.append(m)
    return nn.Sequential(*mods).eval()


def make_input(cfg: FuzzConfig) -> torch.Tensor:
    """(batch, *in_shape) in [0, 1] with ~20% exact zeros and ~10% exact ones (domain None: spread to
    [-0.5, 1.5], the zeros kept)."""
    gen = torch.Generator().manual_seed(20_000 + cfg.seed)
    x = torch.rand((cfg.batch,) + tuple(cfg.in_shape), generator=gen)
    u = torch.rand(x.shape, generator=gen)
    if cfg.domain is None:
        x = x * 2 - 0.5
    x = torch.where(u < 0.2, torch.zeros_like(x), x)
    if cfg.domain is not None:
        x = torch.where(u > 0.9, torch.ones_like(x), x)
    return x


class SoftMaxPool2d(nn.Module):
    """Smooth max-pool: temp * logsumexp(window / temp) (padding counts as -inf, as in max_pool2d).
    For the integer kernel/stride/padding pools that ``random_config`` generates."""

    def __init__(self, pool: nn.MaxPool2d, temp: float):
        super().__init__()
        self.k, self.s, self.p, self.temp = int(pool.kernel_size), int(pool.stride), int(pool.padding), temp

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, c, hh, _ = h.shape
        hp = F.pad(h, (self.p,) * 4, value=-1e9) if self.p else h
        cols = F.unfold(hp, self.k, stride=self.s).view(b, c, self.k * self.k, -1)  # (B, C, k*k, L)
        ho = (hh + 2 * self.p - self.k) // self.s + 1
        return (self.temp * torch.logsumexp(cols / self.temp, dim=2)).view(b, c, ho, -1)


def smooth_surrogate(model: nn.Sequential, beta: float, temp: float) -> nn.Sequential:
    """ReLU -> Softplus(beta), MaxPool2d -> SoftMaxPool2d(temp); same weights (for second-order PGD)."""
    mods = []
    for m in model:
        if isinstance(m, nn.ReLU):
            mods.append(nn.Softplus(beta=beta))
        elif isinstance(m, nn.MaxPool2d):
            mods.append(SoftMaxPool2d(m, temp))
        else:
            mods.append(copy.deepcopy(m))
    return nn.Sequential(*mods).eval()


# ----------------------------------------------------------------------------------------------
# attacks: every function returns candidate points x' of S, shape (P, B, ...)
# ----------------------------------------------------------------------------------------------
def _bview(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(t.shape + (1,) * (like.dim() - t.dim()))


def project(xp: torch.Tensor, x: torch.Tensor, eps: float, norm: str, domain, sample_ndim: int | None = None):
    """Onto S: the ball projection, then the clamp to the domain (x in the domain, so clamping only moves
    coordinates towards x and keeps the point in the ball).  ``sample_ndim``: trailing dims of one
    sample (default x.dim() - 1)."""
    d = xp - x
    if norm == "inf":
        d = d.clamp(-eps, eps)
    else:
        nd = x.dim() - 1 if sample_ndim is None else sample_ndim
        nrm = d.flatten(d.dim() - nd).norm(dim=-1)
        # (1 - 1e-6): stay inside the ball after rounding (a point an ulp outside proves nothing)
        d = d * _bview((eps * (1 - 1e-6) / nrm.clamp_min(1e-30)).clamp(max=1.0), d)
    out = x + d
    return out.clamp(domain[0], domain[1]) if domain is not None else out


def sample_points(x, eps, norm, domain, count, gen) -> torch.Tensor:
    """count x B points: a third uniform in the ball, a third on its boundary (ℓ∞ vertices, ℓ2 sphere),
    a third sparse corners (a random quarter of the coordinates at +-eps, the rest at x)."""
    shape = (count,) + tuple(x.shape)
    n = x[0].numel()
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    if norm == "inf":
        uni = (torch.rand(shape, generator=gen) * 2 - 1) * eps
        edge = sign * eps
    else:
        dirs = torch.randn(shape, generator=gen)
        dirs = dirs / _bview(dirs.flatten(2).norm(dim=2), dirs)
        uni = dirs * _bview(eps * torch.rand(count, x.shape[0], generator=gen) ** (1.0 / n), dirs)
        edge = dirs * eps
    mask = (torch.rand(shape, generator=gen) < 0.25).float()
    sparse = sign * mask * (eps if norm == "inf" else eps / _bview(mask.flatten(2).sum(2).clamp_min(1).sqrt(), mask))
    which = torch.arange(count) % 3
    d = torch.where(_bview(which == 0, uni), uni, torch.where(_bview(which == 1, edge), edge, sparse))
    return project(x.unsqueeze(0) + d, x.unsqueeze(0), eps, norm, domain, x.dim() - 1)


def pgd(loss_fn, x, eps, norm, domain, steps, start) -> list[torch.Tensor]:
    """Projected gradient ascent of loss_fn (rows -> (rows,)) from ``start``; step eps/4 decaying to
    eps/40 (sign steps for ℓ∞, normalised for ℓ2).  Returns every iterate."""
    xp, out = start.detach(), []
    for t in range(steps):
        step = eps / 4 * (0.1 ** (t / max(1, steps - 1)))
        xp = xp.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(xp).sum(), xp)
        with torch.no_grad():
            if norm == "inf":
                xp = xp + step * grad.sign()
            else:
                xp = xp + step * grad / _bview(grad.flatten(1).norm(dim=1).clamp_min(1e-30), grad)
            xp = project(xp, x, eps, norm, domain)
        out.append(xp.detach())
    return out


def attack_points(net, x, cfg, target, results, budget: dict, gen) -> list[tuple[str, torch.Tensor]]:
    """All attacks of the module docstring; a list of (attack name, points (P, B, ...))."""
    eps, norm, dom, attr, steps = cfg.eps, cfg.norm, cfg.domain, cfg.attribution, cfg.ig_steps
    blocks = [("sample", sample_points(x, eps, norm, dom, budget["samples"], gen))]

    def g_of(model, xp, tgt, graph=True):
        return attr_fn(model, xp, tgt, attr, steps=steps, create_graph=graph)

    def rand_start(rows_x):
        return sample_points(rows_x, eps, norm, dom, 1, gen)[0]

    nets = [("real", net)] + [(f"surrogate{b:g}", smooth_surrogate(net, b, t)) for b, t in budget["surrogates"]]
    for name, model in nets:  # deviation PGD
        g0 = g_of(model, x, target, graph=False).detach()
        for _ in range(budget["restarts"]):
            its = pgd(lambda xp, m=model, g0=g0: ((g_of(m, xp, target) - g0) ** 2).flatten(1).sum(1),
                      x, eps, norm, dom, budget["steps"], rand_start(x))
            blocks.append((f"pgd-deviation-{name}", torch.stack(its)))
    # coordinate-targeted PGD: the entries whose certified box is tightest, each pushed outwards
    b, n = x.shape[0], x[0].numel()
    g_x = next(iter(results.values())).attribution_at_x.flatten(1)
    rows_idx, rows_sign = [], []
    for res in results.values():
        up, lo = (res.upper.flatten(1) - g_x), (g_x - res.lower.flatten(1))
        kk = min(budget["coords"], n)
        rows_idx += [up.topk(kk, dim=1, largest=False).indices.T, lo.topk(kk, dim=1, largest=False).indices.T]
        rows_sign += [torch.ones(kk, b), -torch.ones(kk, b)]
    idx, sgn = torch.cat(rows_idx), torch.cat(rows_sign)  # (K, B)
    k_rows = idx.shape[0]
    x_rep = x.repeat((k_rows,) + (1,) * (x.dim() - 1))
    t_rep = target.repeat(k_rows)
    flat_idx, flat_sgn = idx.reshape(-1, 1), sgn.reshape(-1)
    for name, model in nets:
        its = pgd(lambda xp, m=model: flat_sgn * g_of(m, xp, t_rep).flatten(1).gather(1, flat_idx).squeeze(1),
                  x_rep, eps, norm, dom, budget["steps"], x_rep.clone())
        blocks.append((f"pgd-coordinate-{name}", torch.stack(its).view(-1, *x.shape)))
    # margin PGD: minimise f_y - max_{j != y} f_j on the real net
    def neg_margin(xp):
        logits = net(xp)
        own = logits.gather(1, target.view(-1, 1)).squeeze(1)
        return -(own - logits.scatter(1, target.view(-1, 1), float("-inf")).max(dim=1).values)

    if cfg.classes > 1:
        for r in range(budget["restarts"]):
            its = pgd(neg_margin, x, eps, norm, dom, budget["steps"], x.clone() if r == 0 else rand_start(x))
            blocks.append(("pgd-margin", torch.stack(its)))
    return blocks


# ----------------------------------------------------------------------------------------------
# checking one certificate against evaluated points
# ----------------------------------------------------------------------------------------------
def _topk_overlap(m1: torch.Tensor, m2: torch.Tensor, k: int) -> torch.Tensor:
    t1 = torch.zeros_like(m1, dtype=torch.bool).scatter_(1, m1.topk(k, dim=1).indices, True)
    t2 = torch.zeros_like(m2, dtype=torch.bool).scatter_(1, m2.topk(k, dim=1).indices, True)
    return (t1 & t2).sum(dim=1).to(m1.dtype) / k


def _map(g: torch.Tensor) -> torch.Tensor:
    return g.abs().sum(dim=1).flatten(1) if g.dim() >= 3 else g.abs().flatten(1)


def check_certificate(res, gs: torch.Tensor, margins: torch.Tensor | None, src: list[str]) -> list[dict]:
    """Violations of ``res`` at P evaluated points: gs (P, B, ...) attributions, margins (P, B) values
    of f_y - max_{j != y} f_j (None: one class), src[p] the attack that produced point p."""
    out: list[dict] = []
    g0, lo, hi = res.attribution_at_x, res.lower, res.upper

    def add(kind, mask, size):
        if mask.any():
            p, b = [int(v) for v in mask.nonzero()[size[mask].argmax()]]
            out.append({"check": kind, "size": float(size[mask].max()), "attack": src[p], "sample": b,
                        "count": int(mask.sum())})

    tol = TOL_REL * (1 + gs.abs())
    over = (gs - hi.unsqueeze(0) - tol).flatten(2).amax(2)
    under = (lo.unsqueeze(0) - gs - tol).flatten(2).amax(2)
    add("box-upper", over > 0, over)
    add("box-lower", under > 0, under)
    # the deviation and the cosine of the float attributions, computed in float64 (a float32 cosine
    # errs by an ulp, more than a sound certificate's margin near cos = 1)
    gf, g0f = gs.flatten(2).double(), g0.flatten(1).double().unsqueeze(0)
    dev = (gf - g0f).norm(dim=2)
    slack = dev - res.euclidean.double().unsqueeze(0) - TOL_REL * (1 + g0f.norm(dim=2))
    add("euclidean", slack > 0, slack)
    nrm = gf.norm(dim=2) * g0f.norm(dim=2)
    ok_norm = nrm > 0
    cos = (gf * g0f).sum(dim=2) / nrm.clamp_min(1e-300)
    cslack = res.cosine.double().unsqueeze(0) - TOL_REL - cos
    add("cosine", (cslack > 0) & ok_norm, cslack)
    if margins is not None:
        bad = res.label_certified.unsqueeze(0) & (margins <= 0)
        add("label", bad, -margins)
    m0 = _map(g0)
    for k in sorted({1, max(2, m0.shape[1] // 5)}):
        if k >= m0.shape[1]:
            continue
        bound = res.topk_intersection(k)
        pts_maps = _map(gs.flatten(0, 1))  # (P * B, entries), rows ordered (point, sample)
        actual = _topk_overlap(m0.repeat(gs.shape[0], 1), pts_maps, k).view(gs.shape[:2])
        gap = bound.unsqueeze(0) - actual - 1e-6
        add(f"topk{k}", gap > 0, gap)
    return out


# ----------------------------------------------------------------------------------------------
# one configuration
# ----------------------------------------------------------------------------------------------
DEFAULT_BUDGET = {"samples": 48, "steps": 8, "restarts": 1, "coords": 2, "surrogates": [(10.0, 0.05)]}
SLOW_BUDGET = {"samples": 96, "steps": 12, "restarts": 2, "coords": 3, "surrogates": [(10.0, 0.05), (50.0, 0.01)]}


def run_config(cfg: FuzzConfig, budget: dict | None = None, verbose: bool = False) -> dict:
    """Certify (every method) and attack one configuration.  Returns a report dict: config,
    ``points`` (attack points x samples evaluated), ``violations`` (list), ``errors`` (list), time."""
    budget = budget or DEFAULT_BUDGET
    t0, c0 = time.perf_counter(), time.process_time()
    torch.manual_seed(cfg.seed)
    net, x = build_model(cfg), make_input(cfg)
    report = {"seed": cfg.seed, "config": cfg, "points": 0, "violations": [], "errors": [], "time": 0.0}
    results = {}
    for method in METHODS:
        try:
            results[method] = certified_bound(net, x, cfg.eps, cfg.norm, cfg.attribution, method=method,
                                              domain=cfg.domain, ig_steps=cfg.ig_steps)
        except Exception as exc:  # noqa: BLE001 - every generated layer is supported: any exception is a bug
            report["errors"].append(f"{method}: {type(exc).__name__}: {str(exc)[:300]}")
    if results:
        target = next(iter(results.values())).target
        gen = torch.Generator().manual_seed(30_000 + cfg.seed)
        blocks = attack_points(net, x, cfg, target, results, budget, gen)
        pts = torch.cat([p for _, p in blocks])
        src = [name for name, p in blocks for _ in range(p.shape[0])]
        rows = pts.flatten(0, 1)
        gs = attr_fn(net, rows, target.repeat(pts.shape[0]), cfg.attribution, steps=cfg.ig_steps).detach()
        margins = None
        if cfg.classes > 1:
            with torch.no_grad():
                logits = net(rows)
            tr = target.repeat(pts.shape[0]).view(-1, 1)
            own = logits.gather(1, tr).squeeze(1)
            margins = (own - logits.scatter(1, tr, float("-inf")).max(dim=1).values).view(pts.shape[:2])
        report["points"] = int(pts.shape[0] * pts.shape[1])
        for method, res in results.items():
            for v in check_certificate(res, gs.view(pts.shape), margins, src):
                report["violations"].append({"method": method, **v})
            report.setdefault("euclidean", {})[method] = [round(float(e), 6) for e in res.euclidean]
    report["time"], report["cpu"] = time.perf_counter() - t0, time.process_time() - c0
    if verbose:
        print(format_report(report))
    return report


def format_report(report: dict) -> str:
    cfg = report["config"]
    head = (f"seed {cfg.seed}: {cfg.norm} eps={cfg.eps:.3g} {cfg.attribution} domain={cfg.domain} "
            f"in={cfg.in_shape} layers={[n for n, _ in cfg.layers]} points={report['points']} "
            f"time={report['time']:.2f}s cpu={report['cpu']:.2f}s")
    lines = [head]
    lines += [f"  VIOLATION {v}" for v in report["violations"]]
    lines += [f"  ERROR {e}" for e in report["errors"]]
    if report["violations"] or report["errors"]:
        lines.append("  reproducer: " + cfg.reproducer())
    return "\n".join(lines)


def run_sweep(seeds, budget: dict | None = None, verbose: bool = False) -> dict:
    """Run many seeds; returns totals (configs, certificates, attack points, violations, errors) and
    the failing reports."""
    totals = {"configs": 0, "certificates": 0, "points": 0, "violations": 0, "errors": 0, "time": 0.0, "cpu": 0.0}
    failing = []
    for seed in seeds:
        rep = run_config(random_config(seed), budget, verbose=verbose)
        totals["configs"] += 1
        totals["certificates"] += len(METHODS) - len(rep["errors"])
        totals["points"] += rep["points"]
        totals["violations"] += len(rep["violations"])
        totals["errors"] += len(rep["errors"])
        totals["time"] += rep["time"]
        totals["cpu"] += rep["cpu"]
        if rep["violations"] or rep["errors"]:
            failing.append(rep)
    return {"totals": totals, "failing": failing}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="certified_bound soundness fuzzing")
    ap.add_argument("--seed", type=int, help="one configuration (verbose)")
    ap.add_argument("--seeds", default="0:24", help="range a:b of seeds")
    ap.add_argument("--slow", action="store_true", help="the slow job's attack budget")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # small ops: one thread is fastest (as in tests/conftest.py)
    budget = SLOW_BUDGET if args.slow else DEFAULT_BUDGET
    if args.seed is not None:
        rep = run_config(random_config(args.seed), budget, verbose=True)
        return 1 if rep["violations"] or rep["errors"] else 0
    a, b = (int(v) for v in args.seeds.split(":"))
    out = run_sweep(range(a, b), budget, verbose=True)
    print(json.dumps(out["totals"]))
    return 1 if out["failing"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
