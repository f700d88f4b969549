"""Shared machinery of the attacks: threat-model projection, seeded per-sample noise, restart stacking,
real-network evaluation, best-iterate bookkeeping and the result object.

Threat model (SPEC 1): ``B_p(x, eps) = {x' : ||x' - x||_p <= eps, lo <= x' <= hi, argmax f(x') = y}``.

Projection onto ``{||x' - x0||_p <= eps} ∩ [lo, hi]^n`` (x0 itself in the domain):

* l_inf: the intersection is a box, so the exact Euclidean projection is the clamp to
  ``[max(lo, x0 - eps), min(hi, x0 + eps)]``.
* l_2: radial projection onto the ball, then clipping to the domain.  The result stays in the ball:
  clipping each coordinate to an interval that contains x0_i never moves it away from x0_i
  (``|clip(v_i) - x0_i| <= |v_i - x0_i|``), so ``||clip(v) - x0||_2 <= ||v - x0||_2 <= eps``.  It is a
  feasible point, though not always the nearest one (the exact projection would solve for a KKT
  multiplier); :func:`max_violation` checks the feasibility of every returned point.

Randomness is counter-based: every random number of a sample is a hash of (seed, restart, the sample's
own content, a draw counter, the element index), computed with integer tensor ops on the input's device.
The noise of a sample therefore never depends on the rest of the batch (a batch of 8 gives the same
draws as eight runs of 1), the whole batch is drawn in one vectorised call (a ``torch.Generator`` per
sample would need a Python loop over samples at every draw), and CPU and CUDA draw the same numbers.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attributions import get_attribution
from ..errors import CertattrError, check_eps, check_input

ATTRIBUTIONS = ("saliency", "grad_x_input", "ig")
"""Attributions the attacks support (their batch rows are independent, so restarts can be stacked)."""

FEASIBILITY_TOL = 1e-6

# ------------------------------------------------------------------------------------------- checks


def check_domain(domain) -> tuple[float, float]:
    """``domain=(lo, hi)`` with finite lo < hi; None means unbounded (no clipping)."""
    if domain is None:
        return -math.inf, math.inf
    try:
        lo, hi = (float(v) for v in domain)
    except (TypeError, ValueError):
        raise CertattrError(f"domain must be a pair (lo, hi), got {domain!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise CertattrError(f"domain must be finite with lo < hi, got {domain!r}")
    return lo, hi


def check_batch(x: torch.Tensor, domain) -> tuple[torch.Tensor, tuple[float, float]]:
    """A finite floating (B, ...) batch inside the domain (tolerance 1e-6)."""
    check_input(x, name="x")
    if x.dim() < 2:
        raise CertattrError(f"x must be batched (B, ...), got shape {tuple(x.shape)}")
    lo, hi = check_domain(domain)
    below, above = float(lo - x.min()), float(x.max() - hi)
    if below > FEASIBILITY_TOL or above > FEASIBILITY_TOL:
        raise CertattrError(f"x lies outside the domain [{lo}, {hi}] (min {float(x.min()):.6g}, max "
                            f"{float(x.max()):.6g}); scale the inputs or pass domain=")
    return x.detach(), (lo, hi)


def check_positive_int(value, name: str, minimum: int = 1) -> int:
    try:
        if isinstance(value, bool) or int(value) != value:
            raise TypeError
        value = int(value)
    except (TypeError, ValueError):
        raise CertattrError(f"{name} must be an integer, got {value!r}") from None
    if value < minimum:
        raise CertattrError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_step_size(step_size, name: str = "step_size") -> float:
    value = check_eps(step_size, name=name)
    if value == 0:
        raise CertattrError(f"{name} must be > 0, got {step_size!r}")
    return value


def check_attribution(name: str) -> str:
    if name not in ATTRIBUTIONS and name != "integrated_gradients":
        raise CertattrError(f"unknown attribution {name!r} for an attack; choose from {', '.join(ATTRIBUTIONS)}")
    return "ig" if name == "integrated_gradients" else name


def resolve_labels(model: nn.Module, x: torch.Tensor, target) -> torch.Tensor:
    """(B,) int64 labels: ``target`` (int / tensor) or, if None, the real model's argmax at x."""
    if target is None:
        with torch.no_grad():
            return model(x).argmax(dim=1)
    target = torch.as_tensor(target, device=x.device).long().reshape(-1)
    if target.numel() == 1 and x.shape[0] > 1:
        target = target.expand(x.shape[0]).clone()
    if target.numel() != x.shape[0]:
        raise CertattrError(f"target has {target.numel()} entries for a batch of {x.shape[0]}")
    return target


# --------------------------------------------------------------------------------------- projection


def _rows(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (N,) tensor to broadcast over the rows of ``like`` (N, ...)."""
    return v.view((-1,) + (1,) * (like.dim() - 1))


def project(x_new: torch.Tensor, x0: torch.Tensor, eps, norm: str, domain: tuple[float, float]) -> torch.Tensor:
    """Map ``x_new`` into ``B_p(x0, eps) ∩ [lo, hi]^n`` (see the module docstring); eps a float or (N,)."""
    lo, hi = domain
    eps_t = torch.as_tensor(eps, dtype=x0.dtype, device=x0.device)
    if eps_t.dim() == 1:
        eps_t = _rows(eps_t, x0)
    if norm == "inf":
        return torch.maximum(torch.minimum(x_new, x0 + eps_t), x0 - eps_t).clamp(lo, hi)
    delta = x_new - x0
    length = torch.linalg.vector_norm(delta.flatten(1), dim=1)
    scale = (eps_t.flatten() / length.clamp_min(1e-30)).clamp(max=1.0)
    return (x0 + delta * _rows(scale, delta)).clamp(lo, hi)


def max_violation(x: torch.Tensor, x0: torch.Tensor, eps: float, norm: str,
                  domain: tuple[float, float]) -> torch.Tensor:
    """Largest violation (0-dim tensor) of ``||x - x0||_p <= eps`` and ``lo <= x <= hi`` over the batch."""
    lo, hi = domain
    delta = (x - x0).flatten(1)
    size = delta.abs().amax(dim=1) if norm == "inf" else torch.linalg.vector_norm(delta, dim=1)
    return torch.stack([(size - eps).max(), (lo - x).max(), (x - hi).max()]).clamp_min(0).max()


def assert_feasible(x: torch.Tensor, x0: torch.Tensor, eps: float, norm: str, domain: tuple[float, float],
                    tol: float = FEASIBILITY_TOL) -> None:
    """Raise RuntimeError (an internal bug, not a user error) if a point left the ball or the domain."""
    worst = float(max_violation(x, x0, eps, norm, domain))
    if worst > tol:
        raise RuntimeError(f"attack iterate outside the {norm} ball of radius {eps} or the domain "
                           f"{domain} by {worst:.3g} (> {tol})")


def step(x: torch.Tensor, direction: torch.Tensor, alpha, norm: str) -> torch.Tensor:
    """Steepest-ascent step of length alpha along ``direction``: sign for l_inf, normalised for l_2."""
    alpha_t = torch.as_tensor(alpha, dtype=x.dtype, device=x.device)
    if alpha_t.dim() == 1:
        alpha_t = _rows(alpha_t, x)
    if norm == "inf":
        return x + alpha_t * direction.sign()
    length = torch.linalg.vector_norm(direction.flatten(1), dim=1).clamp_min(1e-30)
    return x + alpha_t * direction / _rows(length, direction)


# ------------------------------------------------------------------------------------ random stream

_M32 = 0xFFFFFFFF
_GOLDEN = 0x61C88647  # 2**32 - 0x9E3779B9 (Weyl increment), < 2**31


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """xorshift-multiply finaliser on 32-bit values held in int64 (multipliers < 2**31: no overflow)."""
    h = h & _M32
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _M32
    h = h ^ (h >> 15)
    h = (h * 0x2C1B3C6D) & _M32
    h = h ^ (h >> 16)
    h = (h * 0x297A2D39) & _M32
    return h ^ (h >> 16)


def _scalar_mix(value: int) -> int:
    return int(_mix32(torch.tensor([int(value) & _M32], dtype=torch.int64))[0])


def sample_keys(x: torch.Tensor, seed: int, restarts: int) -> torch.Tensor:
    """(R*B,) int64 stream keys, restart-major: a hash of (seed, restart, the bits of the sample)."""
    bits = x.detach().to(torch.float32).contiguous().view(torch.int32).flatten(1).to(torch.int64) & _M32
    index = torch.arange(bits.shape[1], device=x.device, dtype=torch.int64)
    content = (_mix32(bits ^ _mix32(index * _GOLDEN)).sum(dim=1)) & _M32  # order-free exact int sum
    seed = int(seed)
    seed_key = _scalar_mix(_scalar_mix(seed & _M32) ^ ((seed >> 32) & _M32))
    base = _mix32(content ^ seed_key)
    r = torch.arange(restarts, device=x.device, dtype=torch.int64).view(-1, 1)
    return _mix32(base.view(1, -1) + _mix32(r * _GOLDEN + 0x5BD1E995)).reshape(-1)


class SampleStream:
    """Per-row counter-based random numbers: draw ``t`` of row i depends only on (keys[i], t)."""

    def __init__(self, keys: torch.Tensor, shape: Sequence[int], dtype: torch.dtype):
        self.keys = keys
        self.shape = tuple(int(s) for s in shape)
        self.n = int(math.prod(self.shape))
        self.dtype = dtype
        self.counter = 0
        self._index = torch.arange(self.n, device=keys.device, dtype=torch.int64) * _GOLDEN

    def _bits(self) -> torch.Tensor:
        self.counter += 1
        row = _mix32(self.keys ^ _scalar_mix(self.counter * 0x27D4EB2F + 0x165667B1))
        return _mix32(row.view(-1, 1) + self._index)  # (N, n) uniform 32-bit integers

    def uniform(self) -> torch.Tensor:
        """U(0, 1) with 24 random bits, never exactly 0 or 1; shape (N, *shape)."""
        u = ((self._bits() >> 8).to(torch.float64) + 0.5) / float(1 << 24)
        return u.to(self.dtype).view((-1,) + self.shape)

    def normal(self) -> torch.Tensor:
        """Standard normal (Box-Muller on two uniform draws); shape (N, *shape)."""
        u1 = ((self._bits() >> 8).to(torch.float64) + 0.5) / float(1 << 24)
        u2 = ((self._bits() >> 8).to(torch.float64) + 0.5) / float(1 << 24)
        z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
        return z.to(self.dtype).view((-1,) + self.shape)

    def signs(self) -> torch.Tensor:
        """Uniform random signs in {-1, +1}; shape (N, *shape)."""
        return (((self._bits() >> 31) & 1) * 2 - 1).to(self.dtype).view((-1,) + self.shape)

    def ball(self, eps: float, norm: str) -> torch.Tensor:
        """Uniform points of the eps-ball (l_inf: the box; l_2: Gaussian direction times eps U^(1/n))."""
        if norm == "inf":
            return (2.0 * self.uniform() - 1.0) * eps
        direction = self.normal()
        direction = direction / _rows(torch.linalg.vector_norm(direction.flatten(1), dim=1).clamp_min(1e-30),
                                      direction)
        radius = self.uniform().flatten(1)[:, 0] ** (1.0 / self.n) * eps
        return direction * _rows(radius, direction)

    def sphere(self, eps: float, norm: str) -> torch.Tensor:
        """Points on the boundary of the ball (l_inf: random vertices eps * sign; l_2: the sphere)."""
        if norm == "inf":
            return self.signs() * eps
        direction = self.normal()
        return eps * direction / _rows(torch.linalg.vector_norm(direction.flatten(1), dim=1).clamp_min(1e-30),
                                       direction)


# ------------------------------------------------------------------------------ surrogate networks


class RowSoftplus(nn.Module):
    """softplus_beta(z) = softplus(beta z) / beta with one beta per batch row (``holder.beta``, (N,)).

    A batch whose size is a multiple of N (IG / SmoothGrad path points laid out as (m, N)) repeats the
    betas, so stacked restarts with different surrogate betas still go through one forward pass.
    """

    def __init__(self, holder: BetaHolder):
        super().__init__()
        self.holder = holder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        beta = self.holder.beta
        reps, rest = divmod(z.shape[0], beta.shape[0])
        if rest:
            raise RuntimeError(f"batch of {z.shape[0]} rows is not a multiple of {beta.shape[0]} betas")
        beta = _rows(beta.to(z.dtype).repeat(reps), z)
        return F.softplus(z * beta) / beta


class BetaHolder:
    """Plain holder (not a Module) of the per-row betas read by :class:`RowSoftplus`."""

    def __init__(self):
        self.beta: torch.Tensor | None = None


def row_beta_surrogate(model: nn.Module) -> tuple[nn.Module, BetaHolder]:
    """Copy of ``model`` with every ``nn.ReLU`` replaced by a :class:`RowSoftplus` (per-row beta)."""
    holder = BetaHolder()
    surrogate = copy.deepcopy(model)

    def replace(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU):
                setattr(module, name, RowSoftplus(holder))
            else:
                replace(child)

    replace(surrogate)
    for p in surrogate.parameters():
        p.requires_grad_(False)
    return surrogate, holder


# --------------------------------------------------------------------------------- real evaluation


def attribution_fn(name: str, ig_steps: int, *, chunk_all: bool = False):
    """``fn(model, x, y, create_graph)`` computing the attribution ``name`` (IG with ``ig_steps`` points).

    The hot loop calls the unchecked core (:mod:`bounds.attribution`, which ``certattr.attributions``
    wraps): the inputs were validated once, and re-checking them (isfinite over the whole batch) at
    every step cost about 10% of an attack.  ``chunk_all``: IG sends every path point through the
    model in one chunk (needed by RowSoftplus).
    """
    from bounds.attribution import attribution as core
    from bounds.attribution import integrated_gradients

    get_attribution(name)  # validates the name

    def fn(model, x, y, create_graph=False):
        if name == "ig":
            chunk = max(x.shape[0] * ig_steps, 1) if chunk_all else 4096
            return integrated_gradients(model, x, y, steps=ig_steps, create_graph=create_graph, chunk_size=chunk)
        return core(model, x, y, name, create_graph=create_graph)
    return fn


def real_eval(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attribution: str,
              ig_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(label kept (N,) bool, attribution g(x) detached) on the real network.

    Saliency and gradient x input share one forward pass between the label check and the gradient.
    """
    x = x.detach()
    with torch.enable_grad():
        if attribution in ("saliency", "grad_x_input"):
            xr = x.requires_grad_(True)
            logits = model(xr)
            (grad,) = torch.autograd.grad(logits.gather(1, y.view(-1, 1)).sum(), xr)
            g = grad if attribution == "saliency" else x * grad
            return logits.detach().argmax(dim=1) == y, g.detach()
        g = attribution_fn(attribution, ig_steps)(model, x, y).detach()
    with torch.no_grad():
        kept = model(x).argmax(dim=1) == y
    return kept, g


def stack(t: torch.Tensor, restarts: int) -> torch.Tensor:
    """Repeat a (B, ...) tensor restart-major into (R*B, ...): row r*B + b is sample b, restart r."""
    return t.repeat((restarts,) + (1,) * (t.dim() - 1))


class BestTracker:
    """Per-row best label-preserving iterate: lower criterion wins (strictly), ties keep the older one."""

    def __init__(self, x0: torch.Tensor):
        self.x = x0.detach().clone()
        self.value = torch.full((x0.shape[0],), math.inf, dtype=torch.float64, device=x0.device)
        self.found = torch.zeros(x0.shape[0], dtype=torch.bool, device=x0.device)

    def update(self, x: torch.Tensor, value: torch.Tensor, eligible: torch.Tensor) -> None:
        value = value.detach().to(torch.float64)
        better = eligible & ~torch.isnan(value) & (value < self.value)
        self.value = torch.where(better, value, self.value)
        self.x = torch.where(_rows(better, x), x.detach(), self.x)
        self.found |= better

    def reduce(self, restarts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Best over restarts per sample: (x (B, ...), value (B,), found (B,)); first restart wins ties."""
        batch = self.x.shape[0] // restarts
        values = self.value.view(restarts, batch)
        pick = values.argmin(dim=0)  # inf everywhere -> restart 0 (still x0 there)
        cols = torch.arange(batch, device=self.x.device)
        rows = pick * batch + cols
        return self.x[rows], values[pick, cols], self.found.view(restarts, batch).any(dim=0)


# ------------------------------------------------------------------------------------------ result


METRIC_KEYS = ("euclidean", "cosine", "topk_intersection", "kendall", "spearman", "center_of_mass_shift")


@dataclass
class AttackResult:
    """Outcome of an attribution attack on a batch (tensors have one entry per sample).

    x_adv:      best label-preserving iterate per sample (x itself where none was found)
    label_kept: argmax f(x_adv) == label on the REAL network (bool)
    found:      an eligible iterate other than x was found
    euclidean .. center_of_mass_shift: ``certattr.metrics.dissimilarities(g(x), g(x_adv), k)``, g on the
                real network, w.r.t. the label of the clean input
    network:    which network gave the attack's gradients, e.g. "softplus-surrogate(beta=10)"
    measured_on: which function the reported deviations were measured on (SPEC 9.3): "real" (the
                real network's attribution, the default), "softplus-surrogate(beta=B)" (the surrogate
                whose first-order model a practical bound describes) or "smoothed(...)" (the smoothed
                attribution h of a smoothed certificate); compare pairs bounds with attacks by it
    extras:     per-sample tensors stored beside the metrics (e.g. the Monte Carlo confidence
                bounds of the smoothed attack)
    """

    x_adv: torch.Tensor
    label: torch.Tensor
    label_kept: torch.Tensor
    found: torch.Tensor
    euclidean: torch.Tensor
    cosine: torch.Tensor
    topk_intersection: torch.Tensor
    kendall: torch.Tensor
    spearman: torch.Tensor
    center_of_mass_shift: torch.Tensor
    kind: str
    attribution: str
    norm: str
    eps: float
    k: int
    steps: int
    restarts: int
    seed: int
    time: float
    network: str
    criterion: torch.Tensor | None = None
    details: dict[str, Any] = field(default_factory=dict)
    measured_on: str = "real"
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x_adv.shape[0])

    def metrics(self) -> dict[str, torch.Tensor]:
        return {key: getattr(self, key) for key in METRIC_KEYS}

    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per sample (for TSV writers and stores)."""
        per_sample = self.time / max(len(self), 1)
        cols = {key: getattr(self, key).detach().cpu().tolist() for key in METRIC_KEYS}
        kept = self.label_kept.cpu().tolist()
        labels = self.label.cpu().tolist()
        return [{"kind": self.kind, "attribution": self.attribution, "norm": self.norm, "eps": self.eps,
                 "label": labels[i], "label_kept": bool(kept[i]), **{k: v[i] for k, v in cols.items()},
                 "network": self.network, "measured_on": self.measured_on, "time": per_sample}
                for i in range(len(self))]


def finish(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, g0: torch.Tensor,
           attribution: str, ig_steps: int, k: int, eps: float, norm: str, domain, found: torch.Tensor,
           started: float, measure_net: nn.Module | None = None, **fields) -> AttackResult:
    """Check feasibility, evaluate g(x_adv) (on ``measure_net`` if given, else the real net; the label
    always on the real net) and build the AttackResult."""
    from ..metrics import dissimilarities

    assert_feasible(x_adv, x, eps, norm, domain)
    kept, g_adv = measured_eval(model, measure_net, x_adv, y, attribution, ig_steps)
    with torch.no_grad():
        dis = dissimilarities(g0, g_adv, k)
    return AttackResult(x_adv=x_adv.detach(), label=y, label_kept=kept, found=found, eps=eps, norm=norm,
                        attribution=attribution, k=k, time=time.perf_counter() - started, **dis, **fields)


def measured_eval(model: nn.Module, measure_net: nn.Module | None, x: torch.Tensor, y: torch.Tensor,
                  attribution: str, ig_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(label kept on the REAL network, attribution on ``measure_net``); :func:`real_eval` when it is
    None or the model itself."""
    if measure_net is None or measure_net is model:
        return real_eval(model, x, y, attribution, ig_steps)
    with torch.no_grad():
        kept = model(x.detach()).argmax(dim=1) == y
    with torch.enable_grad():
        g = attribution_fn(attribution, ig_steps)(measure_net, x.detach(), y).detach()
    return kept, g
