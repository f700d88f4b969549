"""Certified (sound) attribution-deviation bounds by bound propagation (SPEC 3.2).

For every x' in the ball B_p(x, eps) ∩ [lo, hi]^n (the label constraint is dropped, so the bounds
hold a fortiori on the threat model) we compute an elementwise box  lower <= g(x') <= upper  on the
attribution, from

1. pre-activation bounds of every layer: auto_LiRPA CROWN (Zhang et al. 2018) intersected with
   interval bounds (IBP, Gowal et al. 2018); the same CROWN pass bounds the margins f_y - f_j;
2. sound boxes on every derivative factor (``interval.derivative_box``, max-pool routing);
3. either an interval backward pass (method "ibp", ``interval.gradient_box``) or CROWN on the
   gradient written as a forward module (method "crown", ``gradgraph.GradNet``), intersected with
   the interval box.  For CROWN, auto_LiRPA is handed the bounds we already have as intermediate
   bounds (pre-activations from step 1, upstream gradients from the interval pass), so only the
   output needs a backward pass.  IG: the gradient box at every path point (s/m) x' (the ball
   scaled by s/m), averaged, times the interval of x' - b.

From the box: Euclidean ||max(upper - g, g - lower)||_2; cosine = max(box bound, tangent bound
(``tangent_cosine``)); certified top-k intersection of the maps (``CertifiedResult.topk_intersection``).
With a CROWN gradient pass (saliency, gradient x input, IG): sharpened by spec rows on that pass
(``objectives``: the chord bound of the squared deviation, a cosine from <g0, g'> and ||g'||^2 rows,
top-k pair rows; gradient x input and IG through GradNet's product with x'), each min/max-ed with its
box counterpart; ``details["objectives"]`` records which bound was used.
Exact ties (ReLU input 0, equal max-pool entries) follow autograd: relu'(0) = 0, first maximum.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from .alpha_crown import ALPHA_ITERS, check_alpha_iters
from .attribution import attribution as compute_attribution
from .certified_box import bound_box, map_box
from .checks import check_attribution, check_domain_of, check_eps, check_norm, check_x, resolve_target
from .floatsafe import (
    COMPUTE_DTYPE,
    check_model_dtype,
    no_tf32,
    round_down,
    round_outward,
    round_up,
    unit_roundoff,
)
from .gradgraph import check_chain, model_dtype_device, parse_chain
from .objectives import pair_certified_count, sharpen
from .result import BoundResult, tangent_cosine

METHODS = ("crown", "alpha-crown", "ibp")


# ----------------------------------------------------------------------------------------------
# result
# ----------------------------------------------------------------------------------------------
def attribution_map(g: torch.Tensor) -> torch.Tensor:
    """m = sum_c |g_c| flattened to (B, pixels) (a (B, n) attribution is its own map)."""
    if g.dim() >= 3:
        return g.abs().sum(dim=1).flatten(1)
    return g.abs().flatten(1)


def certainly_in_topk(m_lo: torch.Tensor, m_hi: torch.Tensor, k: int) -> torch.Tensor:
    """(B, n) bool: entries that are in the top k for every map m with m_lo <= m <= m_hi, whatever
    the tie-breaking: m_lo_i > the k-th largest m_hi among the *other* entries."""
    n = m_hi.shape[1]
    if k >= n:
        return torch.ones_like(m_hi, dtype=torch.bool)
    vals = m_hi.topk(k + 1, dim=1).values  # (B, k+1), descending
    kth, next_ = vals[:, k - 1 : k], vals[:, k : k + 1]
    # removing entry i: the k-th largest of the others is vals[k] if m_hi_i is one of the k largest
    others_kth = torch.where(m_hi >= kth, next_, kth)
    return m_lo > others_kth


@dataclass
class CertifiedResult(BoundResult):
    """A ``BoundResult`` (kind "certified") plus the elementwise box on the attribution.

    lower, upper:      lower <= g(x') <= upper for every x' in the ball ∩ domain, shape of x
    attribution_at_x:  g(x)
    """

    lower: torch.Tensor | None = None
    upper: torch.Tensor | None = None
    attribution_at_x: torch.Tensor | None = None
    topk_pairs: torch.Tensor | None = None  # (P, 3) [sample, i, j]: m_j < m_i on the whole region

    def topk_intersection(self, k: int) -> torch.Tensor:
        """(B,) certified lower bound on |T_k(m(x)) ∩ T_k(m(x'))| / k over the ball (m = sum_c |g|).

        Counts the pixels certainly in the top k of every map in the box (map lower bound above the
        k-th largest map upper bound of the other pixels; such pixels are also certainly in T_k(m(x))).
        With ``topk_pairs`` (``objectives``): fewer than k other pixels can reach the pixel (the box's
        reaching pixels minus those a CROWN pair row refuted)."""
        k = int(k)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        m_lo, m_hi = map_box(self.lower, self.upper)
        if k > m_hi.shape[1]:
            raise ValueError(f"k={k} exceeds the number of map entries {m_hi.shape[1]}")
        m_x = attribution_map(self.attribution_at_x)
        if self.topk_pairs is not None:
            pairs = self.topk_pairs.to(m_lo.device)
            in_region = pair_certified_count(m_lo.double(), m_hi.double(), pairs) < k
        else:
            in_region = certainly_in_topk(m_lo, m_hi, k)
        sure = in_region & certainly_in_topk(m_x, m_x, k)
        # count / k rounded down into the map's dtype: below the true overlap, and below any correctly
        # rounded evaluation of it in that dtype or wider (rounding is monotone)
        return round_down(sure.sum(dim=1).to(torch.float64) / k, m_hi.dtype)


# ----------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------
def _check_args(model, x, eps, norm, attribution, method, domain, ig_steps):
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")  # noqa: TRY004
    check_x(x)
    eps = check_eps(eps)
    norm = check_norm(norm)
    attribution = check_attribution(attribution)
    method = str(method).lower()
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    dom = check_domain_of(x, domain)
    steps = int(ig_steps)
    if steps < 1:
        raise ValueError(f"ig_steps must be >= 1, got {ig_steps}")
    return eps, norm, attribution, method, dom, steps


# ----------------------------------------------------------------------------------------------
# main entry
# ----------------------------------------------------------------------------------------------
def certified_bound(
    model: nn.Module,
    x: torch.Tensor,
    eps: float,
    norm: int | str = 2,
    attribution: str = "saliency",
    target: torch.Tensor | int | None = None,
    method: str = "crown",
    domain: tuple[float, float] | None = (0.0, 1.0),
    ig_steps: int = 50,
    chunk_size: int | None = None,
    alpha_iters: int = ALPHA_ITERS,
) -> CertifiedResult:
    """Sound bounds on how far the attribution g can move over B_p(x, eps) ∩ [lo, hi]^n.

    model: feed-forward chain (nn.Sequential) of the supported layers, in eval mode, float32 or
    float64; x: (B, ...) inside the domain; norm: 2 or "inf"; attribution: saliency | grad_x_input |
    ig (right Riemann sum, ``ig_steps``, baseline 0); target: the logit explained (default argmax
    f(x)); method: "crown" (CROWN on the gradient graph, intersected with intervals), "alpha-crown"
    (alpha-CROWN, Xu et al. 2021: the same, with the relaxations optimised by ``alpha_iters`` projected
    Adam steps per objective -- forward net: auto_LiRPA's CROWN-Optimized for the pre-activation
    bounds and margins; gradient graph: the McCormick mixing weights of the derivative-factor x
    upstream-gradient products whose factor depends on x (smooth activations; a ReLU derivative keeps
    CROWN's plane, already the best there) and the slopes of smooth activations; every iterate is sound
    and iterate 0 is CROWN, so it is never looser than CROWN on the same intermediate bounds; where
    auto_LiRPA's optimisation fails it falls back to CROWN, recorded in ``details``; 2-11x CROWN's
    time on MNIST nets at the default 5 steps, ``bounds.alpha_crown``, benchmarks/results/alpha.txt)
    or "ibp" (interval backward pass); all use CROWN pre-activation bounds.  ``domain``: (lo, hi) or
    None (unbounded).  ``chunk_size``: samples per auto_LiRPA call (default from the layer sizes).

    The bounds hold for g as torch evaluates it in the model's dtype (``floatsafe``: propagation in
    float64, every discrete decision and the final box widened by a proven rounding-error bound).
    On CUDA the whole computation runs with TF32 off (the caller's flags are restored).
    """
    with no_tf32():
        return _certified_bound(model, x, eps, norm, attribution, target, method, domain, ig_steps, chunk_size,
                                alpha_iters)


def _certified_bound(model, x, eps, norm, attribution, target, method, domain, ig_steps, chunk_size,
                     alpha_iters=ALPHA_ITERS):
    t0 = time.perf_counter()
    eps, norm, attribution, method, dom, steps = _check_args(
        model, x, eps, norm, attribution, method, domain, ig_steps
    )
    alpha_iters = check_alpha_iters(alpha_iters)
    model_dtype, _ = model_dtype_device(model)
    check_model_dtype(model_dtype)
    if x.dtype != model_dtype:
        raise ValueError(f"x has dtype {x.dtype} but the model's parameters are {model_dtype}")
    x = x.detach()
    chain = parse_chain(model, tuple(x.shape[1:]), dtype=COMPUTE_DTYPE)
    check_chain(model, chain, x)
    target, logits = resolve_target(model, x, target)
    with torch.enable_grad():  # also when called under torch.no_grad()
        g_x = compute_attribution(model, x, target, attribution, steps=steps).detach()
    details: dict = {"notes": list(chain.notes), "float_contract": f"{model_dtype}, outward margins"}

    state: dict = {}
    if eps == 0.0:
        lower, upper = g_x.to(COMPUTE_DTYPE), g_x.to(COMPUTE_DTYPE)
        others = logits.clone()
        others.scatter_(1, target.view(-1, 1), float("-inf"))
        label_certified = logits.gather(1, target.view(-1, 1)).squeeze(1) > others.max(dim=1).values
    else:
        with torch.no_grad():
            lower, upper, label_certified = bound_box(
                model, chain, x, target, eps, norm, attribution, method, dom, steps, chunk_size, details,
                model_dtype, state=state, alpha_iters=alpha_iters,
            )
        # g(x) itself is in the region
        gx = g_x.to(COMPUTE_DTYPE)
        lower, upper = torch.minimum(lower, gx), torch.maximum(upper, gx)

    gx = g_x.to(COMPUTE_DTYPE)
    n = gx[0].numel()
    slack = 1.0 + (n + 8) * unit_roundoff(COMPUTE_DTYPE)  # the float64 norm's own rounding
    dev = torch.maximum(upper - gx, gx - lower).flatten(1)
    euclidean = dev.norm(dim=1) * slack
    sharp = None
    if eps != 0.0:  # spec-row objectives (``objectives``): Euclidean chord, cosine, top-k pairs
        t_obj = time.perf_counter()
        with torch.no_grad():
            sharp = sharpen(state, attribution, gx, lower, upper, model_dtype, details)
    if sharp is not None:
        box_euclidean, euclidean = euclidean, torch.minimum(euclidean, sharp.euclidean)
    cosine = _cosine_bound(gx, lower, upper, euclidean) - 4 * (n + 8) * unit_roundoff(COMPUTE_DTYPE)
    if sharp is not None:
        details["objectives"] = {
            "euclidean": ["chord" if bool(v) else "box" for v in sharp.euclidean < box_euclidean],
            "cosine": ["spec" if bool(v) else "box" for v in sharp.cosine > cosine],
            "topk_pairs_refuted": 0 if sharp.pairs is None else int(sharp.pairs.shape[0]),
            "spec_rows": sharp.rows, "time": time.perf_counter() - t_obj,
        }
        cosine = torch.maximum(cosine, sharp.cosine)
    cosine = torch.where(euclidean == 0, torch.ones_like(cosine), cosine.clamp(-1.0, 1.0))
    lower, upper = round_outward(lower, upper, model_dtype)
    return CertifiedResult(
        kind="certified",
        norm=norm,
        eps=eps,
        attribution=attribution,
        euclidean=round_up(euclidean, model_dtype),
        cosine=round_down(cosine, model_dtype),
        label_certified=label_certified.bool(),
        target=target,
        time=time.perf_counter() - t0,
        method=details.pop("method", method),
        network="real",
        details=details,
        lower=lower,
        upper=upper,
        attribution_at_x=g_x,
        topk_pairs=None if sharp is None else sharp.pairs,
    )


def _cosine_bound(
    g: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, euclidean: torch.Tensor
) -> torch.Tensor:
    """max(box bound, tangent bound) on cos(g, g').

    Box: cos = <g, g'> / (|g| |g'|) with <g, g'> >= sum_i min(g_i l_i, g_i u_i) =: N; if N >= 0 divide
    by the largest |g'| in the box, else by the smallest.  Tangent: ``tangent_cosine``."""
    gf, lf, uf = g.flatten(1), lower.flatten(1), upper.flatten(1)
    norm_g = gf.norm(dim=1)
    num_lo = torch.minimum(gf * lf, gf * uf).sum(dim=1)
    max_norm = torch.maximum(lf.abs(), uf.abs()).norm(dim=1)
    gap = torch.where((lf <= 0) & (uf >= 0), torch.zeros_like(lf), torch.minimum(lf.abs(), uf.abs()))
    min_norm = gap.norm(dim=1)
    tiny = torch.finfo(g.dtype).tiny
    pos = num_lo / (norm_g * max_norm).clamp_min(tiny)
    neg = torch.where(
        min_norm > 0, num_lo / (norm_g * min_norm).clamp_min(tiny), torch.full_like(num_lo, -1.0)
    )
    box = torch.where(num_lo >= 0, pos, neg).clamp(-1.0, 1.0)
    box = torch.where(norm_g > 0, box, torch.full_like(box, -1.0))
    return torch.maximum(box, tangent_cosine(euclidean, norm_g))
