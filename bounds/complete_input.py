"""Complete verification by branch-and-bound on INPUT regions, for every network ``certified_bound`` accepts.

Problem (per sample, label constraint dropped as in ``certified_bound``):

    D*(x) = max { bad(A(x')) : x' in R },   R = B_p(x, eps) ∩ [lo, hi]^n,  p in {inf, 2},

A the attribution (saliency, gradient x input, IG with ``ig_steps``) as torch evaluates it in the model's
dtype; bad = ||A(x') - A(x)||_2 ("euclidean") or -cos(A(x), A(x')) ("cosine").  Smooth nets (softplus,
tanh, sigmoid) have no finite set of activation phases, so instead of phases (``bounds.complete``) the
search splits the INPUT region into axis-aligned boxes; the bound of a box shrinks with its width, so the
gap shrinks with the budget.

Algorithm (best-first, batched):

1. Root box B0 = [x - eps', x + eps'] ∩ [lo, hi] with eps' = ``certified_box.caller_radius`` (eps widened
   so that every float point a caller accepts is inside).  A subdomain is a box S ⊆ B0; its points are
   R' ∩ S with R' = B_p(x, eps') ∩ domain (l_inf: a box; l2: ball ∩ S).  Splitting S at the midpoint m of
   coordinate j gives S ∩ {x_j <= m} and S ∩ {x_j >= m}: their union is S, so the open and pruned boxes
   always cover R'.  Under l2 a box whose nearest point to x is farther than eps' (float64 distance with
   a relative (n + 2) u margin) contains no point of the ball and is dropped; the others are shrunk to
   (a float-safe superset of) the bounding box S' of ball ∩ S (``shrink_to_ball``, proof there).
2. Bound: ``certified_box.bound_box(..., region=(lo, hi))`` on many boxes in ONE batched call (rows =
   boxes, x repeated).  It bounds R' ∩ S: interval propagation starts from S ∩ box(R') (and, under l2,
   the exact first-layer range over the ball), CROWN takes the box as its l_inf perturbation, or, under
   l2, the ball with S ∩ box(R') as the bound of its identity stem (a sound bound over the ball with
   intermediate bounds sound over ball ∩ S is sound over ball ∩ S: the intersection of sound bounds is
   sound).  Under l2 every box but the root is also bounded as the l_inf box S' (``bound_box`` with
   radius eps' and norm inf: its region is S' ⊇ ball ∩ S) and the two boxes are intersected (both are
   sound over ball ∩ S): CROWN's linear bounds concretised over a small S' are far tighter than over
   the whole ball (measured 15x narrower on a box of width 2e-3).  Every float-safety step of
   ``bound_box`` is kept: the box [L, U] covers torch's float A(x') for every float x' in R' ∩ S.
   Node bound: euclidean  ub = ||max(U - g0, g0 - L)||_2 (1 + (n + 8) u)   (>= |A_j - g0_j| per
   coordinate; the factor covers the float64 norm);  cosine: the better of the box bound of
   ``complete_objective.cos_box_lower`` and the tangent bound sqrt(1 - ub^2 / ||g0||^2) (||g0|| rounded
   down), minus 4 (n + 8) u (badness = -cos).  Saliency: min with the spec-row bounds of
   ``objectives.objective_bounds`` (chord Euclidean, spec-row cosine; proofs there) on the recorded
   CROWN pass (``OBJECTIVE_ROWS``).
3. Incumbent (a reached badness): sampling + PGD on the real net (``complete_input_attack``), PGD
   inside the best open boxes, and the centres of the new boxes, every point projected into the ball ∩
   domain as float64 AND model-dtype checks see it.
4. Prune boxes with ub <= incumbent; branch the ``batch_size`` boxes with the largest ub on the
   coordinate chosen by ``split_rule`` ("widest", the default: the widest coordinate relative to B0;
   "smear": width x Jacobian-column norm of A at the centre; measured on a random softplus 8-32-32 MLP,
   1 s per sample, median upper/lower over two runs: l_inf 1.17-1.23 widest vs 1.19-1.32 smear, l2
   2.59-2.60 vs 2.56-2.61: no clear winner, widest is cheaper).  A child's
   ub is capped by its parent's (a child is a subset).  ``batch_size`` 64: 2-4x the boxes per second of
   16 on small nets (auto_LiRPA's per-call overhead), and a smaller gap at the same budget.

Soundness: every float x' that a caller accepts lies in R' and thus in an open or a pruned box; a pruned
box's badness is <= its ub <= the incumbent at pruning time (as evaluated in a batch), so

    upper = max(incumbent used for pruning, incumbent recomputed alone, max open ub)

bounds the badness at every point (in user terms: euclidean upper = that value, cosine lower = minus it).
``lower`` is the badness at the returned witness recomputed on the real model, the sample alone (batch
of one), exactly as ``complete.py`` recomputes it.

Stop reasons: "gap closed" (euclidean: upper - lower <= tol * upper; cosine: <= tol absolute), "budget",
"memory" (the open list would exceed ``max_memory_mb``: 16 n + 48 bytes per box, half the cap), and
"exhausted" (nothing open, which the gap test already catches).  ``max_memory_mb`` also caps the rows of
one auto_LiRPA call (the ``_crown_args`` estimate: 192 n x (largest op) bytes per row).  The budget
includes building auto_LiRPA's modules on the first call for a network (cached afterwards).

Reach (``benchmarks/results/complete_input.txt``): on small inputs (n <= ~10) the gap shrinks steadily
with the budget (a 2-D float64 softplus net closes to < 1% in well under a second, l_inf and l2); l2
converges more slowly than l_inf (boxes straddling the sphere keep their corners); in float32 the
certified float-error widening of ``bound_box`` leaves a floor (about 1-2% on the tiny test nets).  On
MNIST-sized inputs (784) splitting input coordinates cannot move the bound within seconds: the upper
stays at the root (certified) bound.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from . import crown
from .certified_box import bound_box, caller_radius
from .certified_box import region as ball_box
from .checks import (
    check_attribution,
    check_domain_of,
    check_eps,
    check_norm,
    check_search_args,
    check_x,
    resolve_target,
)
from .complete import CompleteResult
from .complete_input_attack import Deviation, pgd, sample_ball, smear, to_ball, widest
from .complete_objective import OBJECTIVES, Objective
from .floatsafe import COMPUTE_DTYPE, check_model_dtype, tf32_off, unit_roundoff
from .gradgraph import check_chain, model_dtype_device, parse_chain
from .result import tangent_cosine

DT = COMPUTE_DTYPE
SPLIT_RULES = ("smear", "widest")
PGD_EVERY = 4  # iterations between PGD runs inside the best open boxes
ATTACK_SAMPLES, ATTACK_STEPS, BOX_PGD_STEPS = 63, 12, 6  # initial sampling / PGD, PGD inside boxes
SCORE_CENTRES = True  # the centres of new boxes are candidate incumbents
OBJECTIVE_ROWS = True  # saliency: also the spec-row (chord) bounds of ``objectives`` per box
ATTACK_SHARE = 0.3  # at most this share of the budget for the initial attack
# l2: also bound every box S' (shrunk to the ball) as an l_inf box of radius eps' (CROWN's linear bounds
# concretised over S' instead of the whole ball; ``bound_box`` with eps = eps' covers S' entirely)
L2_BOX_PASS = True


class BoxObjective(Objective):
    """``Objective`` on boxes that already cover torch's float attribution (``bound_box``), plus the
    float64 rounding of the node bound itself (module docstring, step 2)."""

    def __init__(self, name: str, g0: torch.Tensor):
        super().__init__(name, g0, torch.zeros_like(g0))
        n, u = g0.numel(), unit_roundoff(DT)
        self.rel, self.abs = 1.0 + (n + 8) * u, 4.0 * (n + 8) * u

    def node(self, gl: torch.Tensor, gu: torch.Tensor) -> torch.Tensor:
        euc = torch.maximum(gu - self.g0, self.g0 - gl).norm(dim=1) * self.rel
        if self.name == "euclidean":
            return torch.nan_to_num(euc, nan=float("inf"))
        # cosine: the better of the box bound and the tangent bound (``result.tangent_cosine``: every g
        # with ||g - g0|| <= r < ||g0|| has cos >= sqrt(1 - r^2 / ||g0||^2); ||g0|| rounded down)
        tan = tangent_cosine(euc, self.g0.norm().expand_as(euc) * (2.0 - self.rel))
        v = -torch.maximum(-super().node(gl, gu), tan) + self.abs
        return torch.nan_to_num(v, nan=float("inf"))


def _check(model, x, eps, norm, attribution, objective, budget_s, tol, domain, max_memory_mb, batch_size,
           ig_steps, split_rule):
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")  # noqa: TRY004
    check_x(x)
    eps, norm, attribution = check_eps(eps), check_norm(norm), check_attribution(attribution)
    if objective not in OBJECTIVES:
        raise ValueError(f"unsupported objective {objective!r}; choose from {', '.join(OBJECTIVES)}")
    if split_rule not in SPLIT_RULES:
        raise ValueError(f"unknown split_rule {split_rule!r}; choose from {', '.join(SPLIT_RULES)}")
    check_search_args(budget_s, tol, max_memory_mb, batch_size=batch_size, ig_steps=ig_steps)
    dom = check_domain_of(x, domain)
    return eps, norm, attribution, dom


@tf32_off
def input_branch_bound(
    model: nn.Module,
    x: torch.Tensor,
    eps: float,
    norm: int | str = "inf",
    attribution: str = "saliency",
    objective: str = "euclidean",
    budget_s: float = 10.0,
    tol: float = 0.01,
    target: torch.Tensor | int | None = None,
    domain: tuple[float, float] | None = (0.0, 1.0),
    seed: int = 0,
    max_memory_mb: float = 512.0,
    batch_size: int = 64,
    threads: int | None = 1,
    ig_steps: int = 50,
    split_rule: str = "widest",
) -> CompleteResult:
    """Branch-and-bound on input boxes (module docstring): per sample a reached badness ``lower`` (with
    its ``witness``), a sound ``upper`` and the gap; ``method`` "input-bab".

    Any network ``certified_bound`` accepts (smooth activations, ReLU, CNNs, max-pool, BatchNorm), norms
    inf and 2, attributions saliency | grad_x_input | ig (``ig_steps`` path points), objectives euclidean
    | cosine.  ``budget_s``: wall-clock seconds per sample; ``tol``: stop when upper - lower <= tol * upper
    (cosine: <= tol); ``batch_size``: boxes branched per bounding call (2 x that many bounded);
    ``threads``: torch threads during the call (restored; None leaves torch's setting); ``split_rule``:
    "smear" or "widest"."""
    t0 = time.perf_counter()
    eps, norm, attribution, dom = _check(model, x, eps, norm, attribution, objective, budget_s, tol, domain,
                                         max_memory_mb, batch_size, ig_steps, split_rule)
    model_dtype, _ = model_dtype_device(model)
    check_model_dtype(model_dtype)
    if x.dtype != model_dtype:
        raise ValueError(f"x has dtype {x.dtype} but the model's parameters are {model_dtype}")
    if x.device.type != "cpu" or model_dtype_device(model)[1].type != "cpu":
        raise ValueError("input_branch_bound runs on the CPU: move the model and x there (model.cpu(), x.cpu())")
    x = x.detach()
    chain = parse_chain(model, tuple(x.shape[1:]), dtype=COMPUTE_DTYPE)
    check_chain(model, chain, x)
    target, _ = resolve_target(model, x, target)
    gen = torch.Generator().manual_seed(int(seed))
    opts = {"eps": eps, "norm": norm, "attribution": attribution, "objective": objective,
            "budget": float(budget_s), "tol": float(tol), "dom": dom, "mem": float(max_memory_mb) * 2**20,
            "batch": int(batch_size), "steps": int(ig_steps), "rule": split_rule, "model_dtype": model_dtype}
    saved = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(max(1, int(threads)))
        per = [_one_sample(model, chain, x[i : i + 1], int(target[i]), gen, **opts) for i in range(x.shape[0])]
    finally:
        torch.set_num_threads(saved)
    g_x = torch.cat([p["g0"] for p in per])
    return CompleteResult.from_samples(
        per,
        objective,
        g_x,
        torch.cat([p["witness"] for p in per]).reshape(x.shape),
        torch.zeros(x.shape[0], dtype=torch.long),
        norm=norm,
        eps=eps,
        attribution=attribution,
        target=target,
        time=time.perf_counter() - t0,
        method="input-bab",
    )


def _one_sample(model, chain, x, target, gen, *, eps, norm, attribution, objective, budget, tol, dom, mem,
                batch, steps, rule, model_dtype) -> dict:
    t_start = time.perf_counter()
    deadline = t_start + budget
    shape, n = tuple(x.shape[1:]), x[0].numel()
    dev = Deviation(model, x, target, attribution, steps, lambda g0: BoxObjective(objective, g0))
    obj = dev.obj
    x64 = x.reshape(-1).to(DT)
    xd = x.reshape(1, -1)
    g0_out = dev.g0.to(x.dtype).reshape(x.shape)
    if eps == 0.0:  # the region is {x}: A(x') = A(x), the same float evaluation
        val = float(dev.badness(xd)[0])
        lower, upper = obj.report(val, val)
        with torch.no_grad():
            logits = model(x)[0]
        others = torch.cat([logits[:target], logits[target + 1 :]])
        label = bool(others.numel() == 0 or logits[target] > others.max())
        return _pack(lower, upper, x.clone(), 0, "gap closed", label, g0_out, {})
    eps_c = caller_radius(eps, norm, x.to(DT), model_dtype)
    rl, ru = ball_box(x64, eps_c, dom)
    root_w = ru - rl
    sizes = crown.op_sizes(chain)
    per_row = 8 * 24 * n * max(sizes) * (steps if attribution == "ig" else 1)
    chunk = max(1, int(mem / 2 / per_row))
    max_open = max(64, int(mem / 2 / (16 * n + 48)))
    stats = {"subs": 0, "bound_time": 0.0, "root_time": 0.0, "pgd_time": 0.0}

    # incumbent: sampling, then PGD from the best samples and random starts
    pts = to_ball(torch.cat([x64.unsqueeze(0), sample_ball(ATTACK_SAMPLES, x64, eps, norm, dom, gen)]), x64, xd,
                  eps, norm, dom)
    vals = dev.badness(pts)
    order = vals.argsort(descending=True)
    best, best_pt = float(vals[order[0]]), pts[order[0]].clone()
    starts = torch.cat([pts[order[:4]].to(DT), sample_ball(4, x64, eps, norm, dom, gen)])
    v, p = pgd(dev, starts, x64, eps, norm, dom, steps=ATTACK_STEPS, deadline=t_start + ATTACK_SHARE * budget)
    if v > best:
        best, best_pt = v, p
    t_attack = time.perf_counter() - t_start

    def bound(lo, hi, cut=False, root=False):
        """(keep mask, ub, label) for boxes (S, n); boxes that miss the l2 ball are dropped (and, l2, lo
        and hi are shrunk IN PLACE to the bounding box of ball ∩ S: ``shrink_to_ball``).  ``cut``: past
        the deadline the remaining chunks get ub = inf, label False (the caller caps them by the
        parent's)."""
        keep = torch.ones(lo.shape[0], dtype=torch.bool)
        if norm == "2":
            keep = shrink_to_ball(lo, hi, x64, eps_c)
        rows = int(keep.sum())
        ub = torch.full((rows,), float("inf"), dtype=DT)
        lab = torch.zeros(rows, dtype=torch.bool)
        if rows == 0:
            return keep, ub, lab
        t = time.perf_counter()
        blo, bhi = lo[keep], hi[keep]
        for s in range(0, rows, chunk):
            if cut and s > 0 and time.perf_counter() > deadline:
                break
            sl = slice(s, min(rows, s + chunk))
            r = sl.stop - sl.start
            xr = x.expand(r, *shape).contiguous()
            tr = torch.full((r,), target, dtype=torch.long)
            reg = (blo[sl].reshape(r, *shape), bhi[sl].reshape(r, *shape))
            st: dict = {}
            with torch.no_grad():
                gl, gu, lc = bound_box(model, chain, xr, tr, eps, norm, attribution, "crown", dom, steps,
                                       chunk, {}, model_dtype, state=st, region=reg)
                if norm == "2" and L2_BOX_PASS and not root:  # S' alone (CROWN l_inf on S'), intersected
                    st = {}
                    bl, bu, bc = bound_box(model, chain, xr, tr, eps_c, "inf", attribution, "crown", dom, steps,
                                           chunk, {}, model_dtype, state=st, region=reg)
                    gl, gu, lc = torch.maximum(gl, bl), torch.minimum(gu, bu), lc.bool() | bc.bool()
                ub[sl] = obj.node(gl.reshape(r, -1), gu.reshape(r, -1))
                if OBJECTIVE_ROWS and attribution == "saliency":
                    sharp = spec_row_bound(st, dev.g0.reshape(1, *shape).expand(r, *shape), gl, gu, model_dtype,
                                           objective)
                    if sharp is not None:
                        ub[sl] = torch.minimum(ub[sl], sharp)
            lab[sl] = lc.bool()
            stats["subs"] += r
        stats["bound_time" if not root else "root_time"] += time.perf_counter() - t
        return keep, ub, lab

    keep, ub, lab = bound(rl.unsqueeze(0), ru.unsqueeze(0), root=True)
    root_ub = float(ub[0]) if ub.numel() else -float("inf")
    o_lo, o_hi, o_ub, o_lab = rl.unsqueeze(0)[keep], ru.unsqueeze(0)[keep], ub, lab
    label_ok = True  # every pruned / dropped box certifies the label
    pruned_at = best
    stop, it = "exhausted", 0
    while True:
        live = o_ub > best
        label_ok &= bool(o_lab[~live].all())
        pruned_at = max(pruned_at, best) if bool((~live).any()) else pruned_at
        o_lo, o_hi, o_ub, o_lab = o_lo[live], o_hi[live], o_ub[live], o_lab[live]
        top = float(o_ub.max()) if o_ub.numel() else -float("inf")
        if obj.closed(max(best, pruned_at, top), best, tol):
            stop = "gap closed"
            break
        if o_ub.numel() == 0:
            break
        if time.perf_counter() > deadline:
            stop = "budget"
            break
        if o_ub.numel() + 2 * batch > max_open:
            stop = "memory"
            break
        it += 1
        k = min(batch, o_ub.numel())
        left = deadline - time.perf_counter()
        if stats["subs"] > 1:  # as many boxes as the time left allows (2 children each; the root call,
            # which may include building auto_LiRPA's modules, is not counted)
            per_box = stats["bound_time"] / (stats["subs"] - 1)
            if left < 2 * per_box:  # not even one split fits: stop instead of overrunning the budget
                stop = "budget"
                break
            k = max(1, min(k, int(left / (2 * per_box))))
        idx = o_ub.topk(k).indices
        rest = torch.ones(o_ub.numel(), dtype=torch.bool)
        rest[idx] = False
        plo, phi, pub, plab = o_lo[idx], o_hi[idx], o_ub[idx], o_lab[idx]
        if it % PGD_EVERY == 1 and left > 0.2 * budget and BOX_PGD_STEPS > 0:  # PGD inside the best boxes
            t = time.perf_counter()
            m = min(4, k)
            v, p = pgd(dev, (plo[:m] + phi[:m]) / 2, x64, eps, norm, dom, steps=BOX_PGD_STEPS,
                       box=(plo[:m], phi[:m]), deadline=deadline)
            if v > best:
                best, best_pt = v, p
            stats["pgd_time"] += time.perf_counter() - t
        j = smear(dev, plo, phi, gen) if rule == "smear" else widest(plo, phi, root_w)
        rows = torch.arange(k)
        mid = (plo[rows, j] + phi[rows, j]) / 2
        clo, chi = plo.repeat(2, 1), phi.repeat(2, 1)
        chi[rows, j] = mid
        clo[rows + k, j] = mid
        keep, cub, clab = bound(clo, chi, cut=True)
        cub = torch.minimum(cub, pub.repeat(2)[keep])
        clab = clab | plab.repeat(2)[keep]
        # the centres of the new boxes are candidate incumbents
        cen = to_ball((clo[keep] + chi[keep]) / 2, x64, xd, eps, norm, dom)
        if cen.shape[0] and SCORE_CENTRES:
            cv = dev.badness(cen)
            i = int(cv.argmax())
            if float(cv[i]) > best:
                best, best_pt = float(cv[i]), cen[i].clone()
        o_lo = torch.cat([o_lo[rest], clo[keep]])
        o_hi = torch.cat([o_hi[rest], chi[keep]])
        o_ub = torch.cat([o_ub[rest], cub])
        o_lab = torch.cat([o_lab[rest], clab])
    # the reported lower: the witness alone, recomputed (reproducible by any caller bit for bit)
    rec = float(dev.badness(best_pt.unsqueeze(0))[0])
    top = float(o_ub.max()) if o_ub.numel() else -float("inf")
    lower, upper = obj.report(rec, max(rec, best, pruned_at, top))
    label_ok &= bool(o_lab.all())
    elapsed = time.perf_counter() - t_start
    details = {
        "open": int(o_ub.numel()),
        "iterations": it,
        "attack_time": t_attack,
        "bound_time": stats["bound_time"],
        "root_time": stats["root_time"],
        "pgd_time": stats["pgd_time"],
        "time": elapsed,
        "subdomains_per_s": (stats["subs"] - 1) / max(stats["bound_time"], 1e-9),
        "root_upper": obj.report(rec, max(root_ub, rec))[1 if objective == "euclidean" else 0],
        "split_rule": rule,
        "radius": eps_c,
    }
    return _pack(lower, upper, best_pt.reshape(x.shape), stats["subs"], stop, label_ok, g0_out, details)


def spec_row_bound(state: dict, g0: torch.Tensor, gl: torch.Tensor, gu: torch.Tensor, model_dtype,
                   objective: str) -> torch.Tensor | None:
    """Badness upper bound per row from ``objectives.objective_bounds`` (the chord Euclidean bound /
    the spec-row cosine bound, one more CROWN pass with 3 spec rows; proofs there, already padded for
    float64 rounding), or None where no CROWN gradient pass was recorded or it fails."""
    if state.get("crown_args") is None or state.get("float_error") is None:
        return None
    try:
        from .certified_box import _LIRPA_ERRORS
        from .objectives import objective_bounds

        ob = objective_bounds(state["crown_args"], state["float_error"], g0, gl, gu, model_dtype,
                              topk_pairs=False)
    except (ImportError, *_LIRPA_ERRORS):
        return None
    out = ob.euclidean if objective == "euclidean" else -ob.cosine
    return torch.nan_to_num(out.to(DT), nan=float("inf"))


def shrink_to_ball(lo: torch.Tensor, hi: torch.Tensor, x: torch.Tensor, r: float) -> torch.Tensor:
    """Shrink boxes (S, n) IN PLACE to (a superset of) the bounding box of ball(x, r) ∩ box; return the
    (S,) mask of boxes that may meet the ball.

    With d_k = dist(x_k, [lo_k, hi_k]) and D = sum_k d_k^2, a point p of the ball ∩ box has
    (p_j - x_j)^2 <= r^2 - sum_{k != j} (p_k - x_k)^2 <= r^2 - (D - d_j^2) =: rho_j^2, so
    x_j - rho_j <= p_j <= x_j + rho_j; D > r^2 means no point.  Float64 rounding is covered outward:
    d_k (1 - 2u), D - d_j^2 lowered by (n + 4) u D, r^2 (1 + 4u), the sqrt (1 + 4u), the end points
    moved out by 4u (|x_j| + rho_j)."""
    n = lo.shape[1]
    u = unit_roundoff(DT)
    d = torch.maximum(torch.maximum(lo - x, x - hi), torch.zeros_like(lo)) * (1 - 2 * u)
    d2 = d * d
    big = d2.sum(dim=1, keepdim=True)
    keep = (big * (1 - (n + 4) * u) <= r * r * (1 + 4 * u)).squeeze(1)
    rest = (big - d2) - (n + 4) * u * big
    rho = (r * r * (1 + 4 * u) - rest).clamp_min(0).sqrt() * (1 + 4 * u)
    pad = 4 * u * (x.abs() + rho)
    lo.copy_(torch.maximum(lo, x - rho - pad))
    hi.copy_(torch.minimum(hi, x + rho + pad))
    return keep & (lo <= hi).all(dim=1)


def _pack(lower, upper, pt, subs, stop, label, g0, details) -> dict:
    return {"lower": lower, "upper": upper, "witness": pt, "subdomains": subs, "stop": stop, "label": label,
            "g0": g0, "details": details}


BRANCHING = ("auto", "phases", "input")


def phase_supported(model: nn.Module, x: torch.Tensor, attribution: str) -> bool:
    """False where branching on activation phases can never apply: attribution other than saliency
    (gradient x input and IG are not constant on activation regions) or smooth activations (no finite
    set of phases).  True otherwise, max-pooling included (its routing becomes ReLU phases:
    ``complete_maxpool``; unsupported pool placements raise ``PhaseBranchingUnsupported`` there), and
    models that do not parse (the phase path then raises its own error).  ``complete_bound(branching=
    "auto")`` sends False to ``input_branch_bound``, tries the phase mode on True and falls back to input
    branching on ``PhaseBranchingUnsupported``."""
    from .gradgraph import Act

    try:
        if check_attribution(attribution) != "saliency":
            return False
        chain = parse_chain(model, tuple(x.shape[1:]))
    except (ValueError, TypeError, AttributeError):
        return True
    return not any(isinstance(op, Act) and op.name != "relu" for op in chain.ops)
