"""Cosine certificate for uniformly smoothed attributions (Wang & Kong 2024, "Certified l2 Attribution
Robustness via Uniformly Smoothed Attributions").

Smoothed attribution h(x) = E_{eta ~ U(B_2(0, r))} g~(x + eta), with g~ = g / ||g|| (M = 1, default) or
g clipped to norm M; eta = r U^(1/n) z / ||z||, z ~ N(0, I_n), U ~ U(0, 1) (uniform in the n-ball).
The noisy points are not clipped to the data domain (h is defined on R^n; clipping would break the
translation argument below).

Deterministic part.  For ||delta||_2 <= eps <= 2r, writing B = B(x, r), B' = B(x + delta, r), V = vol(B):
    h(x + delta) - h(x) = (1/V) [ int_{B' \\ B} g~ - int_{B \\ B'} g~ ],
so ||h(x + delta) - h(x)|| <= d := 2 M (1 - rho(eps / r)), with the overlap fraction of two n-balls of
radius r at distance eps, rho = I_{1 - (eps/2r)^2}((n+1)/2, 1/2) (regularised incomplete beta;
1 - rho = I_{(eps/2r)^2}(1/2, (n+1)/2) is what is evaluated, accurate for small eps); d = 2M beyond 2r.
Tangent geometry then gives cos(h(x), h(x + delta)) >= sqrt(1 - d^2 / ||h(x)||^2) when d < ||h(x)||.

Monte Carlo part.  h(x) is estimated by the mean h^ of N i.i.d. vectors X_i with ||X_i|| <= M.  By
McDiarmid's bounded-differences inequality (McDiarmid 1989) applied to F = ||h^ - h|| (changing one X_i
moves F by at most 2M/N) and Jensen (E F <= sqrt(E||X - h||^2 / N) <= M / sqrt(N)), the standard
Hilbert-space mean-embedding argument (e.g. Gretton et al., JMLR 2012, Thm. 7; Tolstikhin et al. 2017):
    P( ||h^ - h|| >= M/sqrt(N) + M sqrt(2 ln(1/alpha) / N) ) <= alpha,
so h_lower = max(0, ||h^|| - t), t = M (1 + sqrt(2 ln(1/alpha))) / sqrt(N), is a (1 - alpha) lower
confidence bound on ||h(x)|| (per sample; not simultaneous over a batch).  The certificate uses h_lower
(cos bound increases with ||h||) and abstains (cosine -1) when d >= h_lower.

``paper_closed_form_bound`` is the paper's closed form as summarised by secondary sources, kept only as
a separately named, UNVERIFIED variant: it is VIOLATED by a 2-D counterexample kept in
tests/test_bounds_smoothed.py (a quadratic logit whose normalised gradient points to a centre c: h flips
direction when x crosses c, cos = -1 while the closed form claims about 0.6, or 0.37 if V_U is read as the
symmetric difference).  Do not use it to certify.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import special
from torch import nn

from .attribution import attribution as compute_attribution
from .checks import resolve_target
from .floatsafe import tf32_off
from .practical import _check_eps, _check_x, check_attribution
from .result import BoundResult

ArrayLike = float | np.ndarray | torch.Tensor


@dataclass
class SmoothedResult(BoundResult):
    """BoundResult (kind "smoothed"; euclidean = d, cosine = certified lower bound or -1) plus:

    h_norm:       ||h^(x)||, the Monte Carlo estimate (B,)
    h_norm_lower: (1 - alpha) lower confidence bound on ||h(x)|| (B,)
    abstain:      bool (B,): d >= h_norm_lower, nothing certified
    n_samples, alpha, radius: the Monte Carlo and smoothing parameters
    deviation:    d = 2M (1 - rho(eps/r)), the deterministic bound on ||h(x+delta) - h(x)|| (B,)
    """

    h_norm: torch.Tensor | None = None
    h_norm_lower: torch.Tensor | None = None
    abstain: torch.Tensor | None = None
    n_samples: int = 0
    alpha: float = 0.0
    radius: float = 0.0
    deviation: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------- formulas


def _as_array(v: ArrayLike) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().double().numpy()
    return np.asarray(v, dtype=np.float64)


def _out(v: np.ndarray):
    return float(v) if np.ndim(v) == 0 else v


def overlap_fraction(eps: ArrayLike, r: ArrayLike, n: int):
    """rho = vol(B(0, r) cap B(delta, r)) / vol(B(0, r)) for ||delta|| = eps in R^n:
    I_{1 - (eps/2r)^2}((n+1)/2, 1/2) for eps <= 2r, else 0."""
    return _out(1.0 - _non_overlap(_as_array(eps), _as_array(r), int(n)))


def _non_overlap(eps: np.ndarray, r: np.ndarray, n: int) -> np.ndarray:
    """1 - rho = I_{(eps/2r)^2}(1/2, (n+1)/2) (accurate for small eps), 1 beyond 2r."""
    if n < 1:
        raise ValueError(f"dimension n must be >= 1, got {n}")
    ratio = np.clip(eps / (2.0 * r), 0.0, None)
    inside = special.betainc(0.5, (n + 1) / 2.0, np.minimum(ratio, 1.0) ** 2)
    return np.where(ratio >= 1.0, 1.0, inside)


def deviation_bound(eps: ArrayLike, r: ArrayLike, n: int, M: float = 1.0):
    """d = 2 M (1 - rho(eps/r)): bound on ||h(x + delta) - h(x)|| for ||delta||_2 <= eps."""
    return _out(2.0 * M * _non_overlap(_as_array(eps), _as_array(r), int(n)))


def mc_radius(n_samples: int, alpha: float, M: float = 1.0) -> float:
    """t with P(||h^ - h|| >= t) <= alpha for the mean of N vectors of norm <= M (McDiarmid + Jensen):
    t = M (1 + sqrt(2 ln(1/alpha))) / sqrt(N)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return float(M * (1.0 + math.sqrt(2.0 * math.log(1.0 / alpha))) / math.sqrt(int(n_samples)))


def certified_cosine(h_lower: ArrayLike, d: ArrayLike):
    """sqrt(1 - d^2 / h^2) where d < h, else -1 (abstain)."""
    h, dd = _as_array(h_lower), _as_array(d)
    ok = (dd < h) & (h > 0)
    ratio = np.where(ok, dd / np.where(h > 0, h, 1.0), 1.0)
    return _out(np.where(ok, np.sqrt(np.clip(1.0 - ratio**2, 0.0, 1.0)), -1.0))


def _allowed_deviation(h_lower: np.ndarray, cos_target: np.ndarray) -> np.ndarray:
    """Largest d such that the certificate reaches cos_target: h sqrt(1 - c^2) for c > 0; for c <= 0 any
    d < h certifies, and h is returned as the supremum."""
    c = np.clip(cos_target, -1.0, 1.0)
    return np.where(c > 0, h_lower * np.sqrt(np.clip(1.0 - c**2, 0.0, 1.0)), h_lower)


def _solve_ratio_sq(dmax: np.ndarray, n: int, M: float, iters: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Bracket [lo, hi] of q = (eps/2r)^2 in [0, 1] with 2M I_q(1/2, (n+1)/2) = dmax, by bisection on the
    monotone function (lo is on the safe side: deviation(lo) <= dmax)."""
    target = dmax / (2.0 * M)
    lo = np.zeros_like(target)
    hi = np.ones_like(target)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        ok = special.betainc(0.5, (n + 1) / 2.0, mid) <= target
        lo = np.where(ok, mid, lo)
        hi = np.where(ok, hi, mid)
    return lo, hi


def smoothed_max_eps(h_lower: ArrayLike, radius: ArrayLike, n: int, cos_target: ArrayLike, M: float = 1.0):
    """Largest eps whose certificate reaches cos >= cos_target, given h_lower and r (inverse of the
    forward form, by bisection on the monotone overlap); 0 when even eps = 0 does not (h_lower = 0)."""
    h = _as_array(h_lower)
    r = _as_array(radius)
    dmax = _allowed_deviation(h, _as_array(cos_target))
    lo, _ = _solve_ratio_sq(np.clip(dmax, 0.0, 2.0 * M), int(n), M)
    return _out(np.where(dmax > 0, 2.0 * r * np.sqrt(lo), 0.0))


def smoothed_min_radius(h_lower: ArrayLike, eps: ArrayLike, n: int, cos_target: ArrayLike, M: float = 1.0):
    """Smallest r whose certificate at eps reaches cos >= cos_target, for a given h_lower (h itself
    depends on r: treat the answer as a design guide and re-certify at that r); inf if none does."""
    h = _as_array(h_lower)
    e = _as_array(eps)
    dmax = _allowed_deviation(h, _as_array(cos_target))
    _, hi = _solve_ratio_sq(np.clip(dmax, 0.0, 2.0 * M), int(n), M)
    with np.errstate(divide="ignore"):
        r = np.where(dmax > 0, e / (2.0 * np.sqrt(hi)), np.inf)
    return _out(np.where(e == 0, 0.0, r))


def paper_closed_form_bound(h_norm: ArrayLike, eps: ArrayLike, radius: ArrayLike, n: int, M: float = 1.0):
    """UNVERIFIED closed form attributed to Wang & Kong (2024) by secondary sources:
    T = ||h|| / sqrt(||h||^2 + (M V_U / V_S)^2), read here with V_U / V_S = 1 - rho(eps/r) (the volume of
    B(x) \\ B(x + delta) over the ball's volume).  NOT a valid certificate: tests keep a 2-D counterexample
    where an attack on h reaches cos = -1 while T is about 0.6 (0.37 reading V_U as the symmetric
    difference, 2(1 - rho)): both readings are violated there).  Provided for comparison only."""
    h = _as_array(h_norm)
    vu = M * _non_overlap(_as_array(eps), _as_array(radius), int(n))
    return _out(h / np.sqrt(h**2 + vu**2))


# ---------------------------------------------------------------------------------------------- Monte Carlo


def _uniform_ball(count: int, n: int, radius: float, gen: torch.Generator, dtype, device) -> torch.Tensor:
    """``count`` points uniform in B_2(0, radius) in R^n: Gaussian direction times radius U^(1/n)."""
    z = torch.randn(count, n, generator=gen, dtype=torch.float64)
    u = torch.rand(count, 1, generator=gen, dtype=torch.float64)
    pts = z / z.norm(dim=1, keepdim=True).clamp_min(1e-300) * (radius * u.pow(1.0 / n))
    return pts.to(device=device, dtype=dtype)


def bounded_attribution(g: torch.Tensor, normalize: bool, M: float) -> torch.Tensor:
    """g / ||g|| (zero where g = 0; M = 1) if normalize, else g clipped to norm M (rows of (k, n))."""
    norm = g.norm(dim=1, keepdim=True)
    if normalize:
        return torch.where(norm > 0, g / norm.clamp_min(torch.finfo(g.dtype).tiny), torch.zeros_like(g))
    return g * (M / norm.clamp_min(torch.finfo(g.dtype).tiny)).clamp(max=1.0)


def smoothed_attribution(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, radius: float, n_samples: int,
                         attribution: str = "saliency", normalize: bool = True, clip_norm: float = 1.0,
                         batch_size: int = 4096, seed: int = 0, ig_steps: int = 50) -> torch.Tensor:
    """Monte Carlo estimate h^(x) (B, n) from N noisy copies per sample; all B*N rows run in chunks of
    ``batch_size`` rows (any mix of samples per chunk; sums accumulated with index_add)."""
    batch = x.shape[0]
    n = x[0].numel()
    total = batch * int(n_samples)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    flat = x.detach().reshape(batch, n)
    acc = torch.zeros(batch, n, dtype=x.dtype, device=x.device)
    for startrow in range(0, total, int(batch_size)):
        stop = min(total, startrow + int(batch_size))
        owner = torch.arange(startrow, stop, device=x.device) // int(n_samples)
        noisy = flat[owner] + _uniform_ball(stop - startrow, n, radius, gen, x.dtype, x.device)
        with torch.enable_grad():
            g = compute_attribution(model, noisy.reshape((-1,) + tuple(x.shape[1:])), target[owner], attribution,
                                    steps=int(ig_steps)).detach()
        acc.index_add_(0, owner, bounded_attribution(g.reshape(-1, n), normalize, clip_norm))
    return acc / int(n_samples)


@tf32_off
def smoothed_certificate(
    model: nn.Module,
    x: torch.Tensor,
    eps: float,
    radius: float,
    n_samples: int = 1000,
    alpha: float = 0.001,
    attribution: str = "saliency",
    target: torch.Tensor | int | Sequence[int] | None = None,
    normalize: bool = True,
    batch_size: int = 4096,
    seed: int = 0,
    clip_norm: float = 1.0,
    ig_steps: int = 50,
) -> SmoothedResult:
    """Certified lower bound on cos(h(x), h(x + delta)) over ||delta||_2 <= eps, holding with probability
    >= 1 - alpha over the Monte Carlo draw (per sample).  Wang & Kong 2024; see the module docstring.

    euclidean = d = 2M(1 - rho(eps/r)) (deterministic); cosine = sqrt(1 - d^2/h_lower^2) or -1 (abstain).
    The attribution is computed on the real network (smoothing needs no surrogate).  Results depend on
    (seed, batch_size).  Only the l2 norm is covered (``norm="2"``).
    """
    start = time.perf_counter()
    x = _check_x(x)
    eps = _check_eps(eps)
    name = check_attribution(attribution)
    try:
        radius = float(radius)
    except (TypeError, ValueError):
        raise ValueError(f"radius must be a number, got {radius!r}") from None
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be a finite number > 0, got {radius!r}")
    if int(n_samples) < 1 or int(batch_size) < 1 or int(ig_steps) < 1:
        raise ValueError("n_samples, batch_size and ig_steps must be >= 1")
    if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    M = 1.0 if normalize else float(clip_norm)
    if not (math.isfinite(M) and M > 0):
        raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm!r}")

    x = x.detach()
    target, _ = resolve_target(model, x, target)
    batch, n = x.shape[0], x[0].numel()
    h = smoothed_attribution(model, x, target, radius=radius, n_samples=int(n_samples), attribution=name,
                             normalize=normalize, clip_norm=M, batch_size=int(batch_size), seed=seed,
                             ig_steps=int(ig_steps))
    h_norm = h.norm(dim=1)
    t = mc_radius(int(n_samples), float(alpha), M)
    h_lower = (h_norm - t).clamp_min(0.0)
    d = float(deviation_bound(eps, radius, n, M))
    dev = torch.full((batch,), d, dtype=x.dtype, device=x.device)
    abstain = ~(dev < h_lower)
    cos = torch.sqrt((1.0 - (dev / h_lower.clamp_min(torch.finfo(x.dtype).tiny)) ** 2).clamp(0.0, 1.0))
    cos = torch.where(abstain, torch.full_like(cos, -1.0), cos)
    details = {
        "h": h.reshape(x.shape), "mc_radius": t, "M": M, "overlap": 1.0 - d / (2.0 * M), "n": n,
        "concentration": "McDiarmid bounded differences + Jensen: t = M(1 + sqrt(2 ln(1/alpha)))/sqrt(N)",
        "label_certified": "not assessed by the smoothed certificate (always False)",
        "note": "noisy points are not clipped to the data domain; probability 1 - alpha per sample",
    }
    return SmoothedResult(
        "smoothed", "2", eps, name, dev, cos, torch.zeros(batch, dtype=torch.bool, device=x.device), target,
        time.perf_counter() - start, method=f"uniform-smoothing(r={radius:g},N={int(n_samples)})", network="real",
        details=details, h_norm=h_norm, h_norm_lower=h_lower, abstain=abstain, n_samples=int(n_samples),
        alpha=float(alpha), radius=radius, deviation=dev)
