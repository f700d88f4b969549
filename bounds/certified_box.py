"""The elementwise box lower <= g(x') <= upper behind ``certified_bound`` (SPEC 3.2, 9.1).

Steps, for every x' of the region R = B_p(x, eps') ∩ [lo, hi]^n (eps' = eps widened by the relative
error with which a float32 caller computes ||x' - x||_p, so every point a caller accepts is inside):

1. bounds on the exact (real-arithmetic) input of every op: IBP (``interval.forward_bounds``)
   intersected with auto_LiRPA CROWN, whose pass also bounds the margins f_y - f_j;
2. ``floatsafe.forward_errors``: E_i >= |float evaluation - exact value|; every discrete decision is
   taken on [l - 2E, u + 2E]: the ReLU phase (relu'(0) = 0), the max-pool routing (first maximum),
   the label (certified iff the margin's lower bound exceeds 2 (E_y + E_j) for every j);
3. derivative-factor boxes from the widened bounds, then the interval backward pass (``gradient_box``)
   and, for method "crown", CROWN on ``GradNet`` (``crown.crown_gradient``; its upstream-gradient
   nodes bounded by CROWN ∩ the interval pass's boxes, ``crown.FULL_CROWN``), intersected (method
   "alpha-crown": alpha-CROWN in steps 1 and 3, ``alpha_crown``);
4. the final box widened by 2 x ``floatsafe.backward_error`` (the float evaluation of the backward
   pass, the product with x for gradient x input, the mean over path points for IG).

IG: the gradient box at every path point (s/m) x' (the region scaled by s/m; the float path point
fl(fl(s/m) x') is within 2u |(s/m) x'| of it: an input error), averaged, times the interval of x' - b.
"""

from __future__ import annotations

import numpy as np
import torch

from . import crown
from .alpha_crown import ALPHA_ITERS
from .crown_upstream import upstream_rows
from .floatsafe import (
    COMPUTE_DTYPE,
    MARGIN_FACTOR,
    backward_error,
    effective_unit,
    forward_errors,
    gamma,
    underflow_unit,
    unit_roundoff,
    widen,
)
from .gradgraph import Act, MaxPool
from .interval import Box, factor_boxes, forward_bounds, gradient_box, mul

_LIRPA_ERRORS = (NotImplementedError, AssertionError, RuntimeError, IndexError, KeyError, TypeError, ValueError)


def map_box(lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds on the map m = sum_c |g_c| from a box on g: |g| >= 0 if l <= 0 <= u else min(|l|, |u|);
    |g| <= max(|l|, |u|); channels summed."""
    lo_abs = torch.where(
        (lower <= 0) & (upper >= 0), torch.zeros_like(lower), torch.minimum(lower.abs(), upper.abs())
    )
    hi_abs = torch.maximum(lower.abs(), upper.abs())
    if lower.dim() >= 3:
        return lo_abs.sum(dim=1).flatten(1), hi_abs.sum(dim=1).flatten(1)
    return lo_abs.flatten(1), hi_abs.flatten(1)


def region(x: torch.Tensor, eps: float, domain: tuple[float, float] | None) -> Box:
    """Per-coordinate bounds of B_p(x, eps) ∩ [lo, hi]^n (the l_inf box contains the l2 ball)."""
    lo, hi = x - eps, x + eps
    if domain is not None:
        lo, hi = lo.clamp_min(domain[0]), hi.clamp_max(domain[1])
    return lo, hi


def caller_radius(eps: float, norm: str, x: torch.Tensor, model_dtype: torch.dtype) -> float:
    """eps widened so that every float point a caller builds in the ball is inside: a projection
    clamp(x', x - eps, x + eps) computed in floats is off by up to 2u (|x_i| + eps) per coordinate, and a
    computed ||x' - x||_p <= eps errs by gamma_{n+4} relative (l2: n squares, a sum, a sqrt) or 2u (l_inf)."""
    u = unit_roundoff(model_dtype)
    n = x[0].numel()
    slack = 2.0 * u * (float(x.abs().max()) + eps)
    if norm == "2":
        return eps * (1.0 + 2.0 * gamma(n + 4, u)) + slack * n**0.5
    return eps * (1.0 + 4.0 * u) + slack


_ball_box = region  # ``bound_box`` has a keyword named ``region``


def _no_nan(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CROWN bounds with NaN (inf - inf or 0 * inf inside auto_LiRPA on huge regions) read as "no
    information" (-inf / +inf), so that intersecting them with the interval bounds keeps those."""
    return (torch.where(torch.isnan(lo), torch.full_like(lo, -float("inf")), lo),
            torch.where(torch.isnan(hi), torch.full_like(hi, float("inf")), hi))


def _others(t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(rows, classes) -> (rows, classes - 1): the columns j != target (ascending j, as margin_spec)."""
    keep = torch.ones_like(t, dtype=torch.bool)
    keep.scatter_(1, target.view(-1, 1), False)
    return t[keep].view(t.shape[0], t.shape[1] - 1)


def _label_certified(margins, bounds_logits, logit_err, tr, batch) -> torch.Tensor:
    """Margin lower bounds (exact function) minus MARGIN_FACTOR (E_y + E_j): the float logits keep the order."""
    if logit_err.shape[1] == 1:  # one logit: argmax is constant
        return torch.ones(batch, dtype=torch.bool, device=tr.device)
    e_y = logit_err.gather(1, tr.view(-1, 1))
    slack = MARGIN_FACTOR * (e_y + _others(logit_err, tr))
    if margins is None:  # IBP fallback: y's lower bound against every other upper bound
        lo, hi = bounds_logits
        margins = lo.gather(1, tr.view(-1, 1)) - _others(hi, tr)
    return (margins - slack > 0).all(dim=1)[-batch:]


def bound_box(model, chain, x, target, eps, norm, attribution, method, domain, steps, chunk_size, details,
              model_dtype, state=None, region=None, alpha_iters=ALPHA_ITERS):
    """(lower, upper, label_certified) in float64; see the module docstring.

    ``method`` "alpha-crown": steps 1 and 3 by alpha-CROWN (``alpha_crown``) with ``alpha_iters`` steps.

    ``region``: None or (lo, hi) of x's shape: a per-row box S intersected with the region (the rows are
    then bounded over B_p(x, eps') ∩ domain ∩ S; ``complete_input``).
    ``state``: a dict that receives what a further CROWN pass on GradNet needs (``crown_args``: the
    keyword arguments of ``crown.crown_gradient`` except ``spec``; ``float_error``: the vector E with
    |torch's g - exact g| <= E elementwise at every row (path point), ``attr_error``: the vector E_a with
    |torch's attribution - exact attribution| <= E_a elementwise, shape of x (saliency: E; gradient x
    input: the product's; IG: the path mean's), both before the MARGIN_FACTOR widening, ``box``: the
    region)."""
    batch = x.shape[0]
    x64 = x.to(COMPUTE_DTYPE)
    eps_c = caller_radius(eps, norm, x64, model_dtype)
    box = _ball_box(x64, eps_c, domain)
    if region is not None:  # a sub-box S per row (input branch-and-bound): bound R ∩ S (intervals use S,
        # CROWN the ball (l2) or the box (l_inf); the intersection of sound bounds is sound)
        box = (torch.maximum(box[0], region[0].to(COMPUTE_DTYPE)),
               torch.minimum(box[1], region[1].to(COMPUTE_DTYPE)))
    if attribution == "ig":
        alphas = torch.arange(1, steps + 1, dtype=COMPUTE_DTYPE, device=x.device) / steps
    else:
        alphas = torch.ones(1, dtype=COMPUTE_DTYPE, device=x.device)
    reps = alphas.numel()
    view = (-1,) + (1,) * (x.dim() - 1)
    tile = (reps,) + (1,) * (x.dim() - 1)
    # path point s: x' -> alpha_s x' ranges over the scaled region; rows ordered (s, sample)
    ar = alphas.repeat_interleave(batch).view(view)
    center = x64.repeat(tile) * ar
    sbox = (box[0].repeat(tile) * ar, box[1].repeat(tile) * ar)
    eps_rows = (eps_c * ar).flatten()
    tr = target.repeat(reps)
    group = batch if norm == "2" else center.shape[0]
    sizes = crown.op_sizes(chain)
    u, eta = effective_unit(model_dtype, chain), underflow_unit(model_dtype)

    # 1. bounds on the exact values: IBP ∩ CROWN (whose pass also bounds the margins)
    l2 = {"l2_center": center, "l2_eps": eps_rows} if norm == "2" else {}
    bounds = list(forward_bounds(chain, sbox, **l2))
    fwd_chunk = chunk_size or max(1, int(2e8 / (8 * max(sizes) * 32)))
    margins = None
    try:
        optimize = alpha_iters if method == "alpha-crown" else 0
        try:
            cb, margins = crown.crown_forward(chain, center, sbox, eps_rows, norm, tr, group, fwd_chunk, optimize)
        except RuntimeError as exc:  # alpha-CROWN failed (auto_LiRPA 0.3 bugs): CROWN's bounds instead
            if not optimize:
                raise
            details["alpha_forward_error"] = str(exc)[:500]
            cb, margins = crown.crown_forward(chain, center, sbox, eps_rows, norm, tr, group, fwd_chunk)
        for i, (clo, chi) in cb.items():
            clo, chi = _no_nan(clo, chi)
            bounds[i] = (torch.maximum(bounds[i][0], clo), torch.minimum(bounds[i][1], chi))
        details["preactivation"] = "crown+ibp"
    except RuntimeError as exc:
        details["preactivation"] = "ibp"
        details["crown_error"] = str(exc)[:500]

    # 2. float evaluation errors and widened decisions
    if attribution == "ig":  # the float path point fl(fl(s/m) x') is within 2u |alpha x'| of alpha x'
        input_err = 2 * unit_roundoff(model_dtype) * torch.maximum(sbox[0].abs(), sbox[1].abs())
    else:
        input_err = torch.zeros_like(center)
    errs = forward_errors(chain, bounds, input_err, u, eta)
    wide = [widen(b, e) for b, e in zip(bounds, errs)]
    label_certified = _label_certified(margins, bounds[-1], errs[-1], tr, batch)
    details["max_forward_error"] = float(max(float(e.max()) for e in errs))

    # 3. derivative-factor boxes and the gradient box
    factors = factor_boxes(chain, wide)
    upstream: dict = {}
    glo, ghi = gradient_box(chain, factors, tr, record=upstream)
    details["gradient"] = "interval"
    times_input = attribution == "grad_x_input"
    used = "ibp"
    if method in ("crown", "alpha-crown"):
        try:
            crown_args = _crown_args(chain, center, sbox, eps_rows, norm, tr, wide, factors, upstream, (glo, ghi),
                                     times_input, group, chunk_size, sizes, model_dtype)
            if method == "alpha-crown":  # optimised for this objective (and any later spec rows)
                crown_args["optimize"] = alpha_iters
            tightened: dict = {}
            plain = None
            if crown_args.get("optimize") and crown_args.get("upstream_crown"):
                # alpha-CROWN starts from the plain CROWN pass's upstream boxes (CROWN ∩ interval) and its
                # box is intersected with that pass's: never looser than method "crown"
                plain = crown.crown_gradient(**{**crown_args, "optimize": 0}, tightened=tightened)
                _reuse_tightened(crown_args, tightened, details)
                tightened = {}
            try:
                clo, chi = crown.crown_gradient(**crown_args, tightened=tightened)
            except _LIRPA_ERRORS as exc:  # the optimisation failed: CROWN's box (sound)
                if not crown_args.get("optimize"):
                    raise
                details["alpha_gradient_error"] = f"{type(exc).__name__}: {exc}"[:500]
                crown_args["optimize"] = 0
                clo, chi = crown.crown_gradient(**crown_args, tightened=tightened)
            if crown_args.get("upstream_crown"):  # later spec passes reuse the CROWN ∩ interval boxes
                _reuse_tightened(crown_args, tightened, details)
            if plain is not None:
                clo, chi = torch.maximum(clo, plain[0]), torch.minimum(chi, plain[1])
            clo, chi = _no_nan(clo, chi)
            if state is not None:
                state["crown_args"] = crown_args
            details["gradient"] = f"{method}+interval"
            used = method
        except _LIRPA_ERRORS as exc:  # still sound: the interval box alone
            details["crown_gradient_error"] = f"{type(exc).__name__}: {exc}"[:500]
    details["method"] = used

    # 4. the float evaluation of the backward pass
    mag, ferr = backward_error(chain, factors, errs, center.shape[0], u, eta, COMPUTE_DTYPE, x.device)
    if state is not None:
        state.update(float_error=ferr, box=box, method=used)
    xmag = torch.maximum(box[0].abs(), box[1].abs())
    if times_input:
        ilo, ihi = mul((glo, ghi), box)
        if used != "ibp":
            ilo, ihi = torch.maximum(ilo, clo), torch.minimum(ihi, chi)
        err = xmag * ferr + unit_roundoff(model_dtype) * xmag * (mag + ferr)
        if state is not None:
            state["attr_error"] = err
        return (*widen((ilo, ihi), err), label_certified)
    if used != "ibp":
        glo, ghi = torch.maximum(glo, clo), torch.minimum(ghi, chi)
    if attribution == "saliency":
        if state is not None:
            state["attr_error"] = ferr
        return (*widen((glo, ghi), ferr), label_certified)
    # IG: average the path-point boxes, times the interval of x' - b (b = 0)
    shape = (reps, batch, *chain.in_shape)
    glo, ghi = glo.view(shape).mean(dim=0), ghi.view(shape).mean(dim=0)
    f_mean = ferr.view(shape).mean(dim=0)
    m_mean = mag.view(shape).mean(dim=0)
    f_mean = f_mean + gamma(reps + 1, unit_roundoff(model_dtype)) * (m_mean + f_mean)
    err = xmag * f_mean + unit_roundoff(model_dtype) * xmag * (m_mean + f_mean)
    if state is not None:
        state["attr_error"] = err
    return (*widen(mul((glo, ghi), box), err), label_certified)


def _crown_args(chain, center, sbox, eps_rows, norm, tr, wide, factors, upstream, gbox, times_input, group,
                chunk_size, sizes, model_dtype) -> dict:
    """Arguments of ``crown.crown_gradient``; the ReLU factors and max-pool routings enter GradNet as
    free inputs in their boxes."""
    dtype = center.dtype
    onehot = torch.zeros(tr.shape[0], chain.num_classes, dtype=dtype, device=center.device)
    onehot.scatter_(1, tr.view(-1, 1), 1.0)
    with torch.no_grad():
        exact = [center.to(model_dtype)] + chain.leaf_values(center.to(model_dtype))[:-1]
    flist = []
    for i, op in enumerate(chain.ops):
        if isinstance(op, Act) and op.name == "relu":
            value = (exact[i] > 0).to(dtype)
            flist.append((value.clamp(factors[i][0], factors[i][1]), factors[i]))
        elif isinstance(op, MaxPool):
            r = op.routing_at(exact[i].to(dtype))
            shape = (r.shape[0], -1) + tuple(op.out_shape[1:])
            flo, fhi = factors[i][0].reshape(shape), factors[i][1].reshape(shape)
            flist.append((r.reshape(shape).clamp(flo, fhi), (flo, fhi)))
    n = int(np.prod(chain.in_shape))
    biggest = max(sizes)
    # bytes per sample: about 24 live float64 copies of the largest (n, size) coefficient matrix
    # (measured in BoundMul's relaxation), plus (size, size) ones when auto_LiRPA computes the
    # intermediate bounds itself ("intersect": (rows, size) for the upstream nodes it bounds)
    extra = {True: biggest, "intersect": upstream_rows(chain)}.get(crown.FULL_CROWN, 0)
    per_sample = 8 * 24 * (n * biggest + biggest * extra)
    grad_chunk = chunk_size or max(1, int(crown.MEMORY_BUDGET / per_sample))
    supplied = None if crown.FULL_CROWN is True else (wide, upstream, gbox)
    return {
        "chain": chain, "center": center, "box": sbox, "eps_rows": eps_rows, "norm": norm, "onehot": onehot,
        "factor_list": flist, "times_input": times_input, "group": group, "chunk": grad_chunk, "supplied": supplied,
        "upstream_crown": crown.FULL_CROWN == "intersect",
    }


def _reuse_tightened(crown_args: dict, tightened: dict, details: dict) -> None:
    """``crown.FULL_CROWN == "intersect"``: the upstream-gradient boxes CROWN ∩ interval of the first pass
    replace the interval ones in ``supplied`` (both sound for the same rows), and later passes (spec rows)
    take them as fixed intermediate bounds instead of recomputing them."""
    wide, upstream, gbox = crown_args["supplied"]
    if tightened:
        tightened = {i: (lo.reshape(upstream[i][0].shape), hi.reshape(upstream[i][1].shape))
                     for i, (lo, hi) in tightened.items()}
        narrowed = [float((hi - lo).sum()) for lo, hi in tightened.values()]
        before = [float((upstream[i][1] - upstream[i][0]).sum()) for i in tightened]
        details["upstream_width_ratio"] = sum(narrowed) / max(sum(before), 1e-300)
        upstream = {**upstream, **tightened}
    crown_args["supplied"] = (wide, upstream, gbox)
    crown_args["upstream_crown"] = False
