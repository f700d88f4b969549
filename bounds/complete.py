"""Complete verification of the worst-case saliency deviation of ReLU networks by branch-and-bound (SPEC 9.2).

Problem (per sample, label constraint dropped as in ``certified_bound``):

    D*(x) = max { ||g(x') - g(x)||_2 : ||x' - x||_p <= eps, lo <= x' <= hi },   g = d f_y / dx,  p in {inf, 2},

with g evaluated as torch does (the model's dtype, relu'(0) = 0).  For a ReLU MLP g is constant on every
activation region, g = g_D = W_1^T D_1 ... W_K^T D_K w, so D* is a maximum over the patterns D that the
ball reaches.  ``complete_bound`` returns per sample

* ``lower``: ||g(x*) - g(x)||_2 recomputed by autograd on the real model at a returned point x* of the
  ball (``witness``): a deviation that is actually reached;
* ``upper``: a proof that no point of the ball does better; ``gap = upper - lower``.

Algorithm (best-first branch-and-bound on ReLU phases, batched):

1. A subdomain is a split vector s (+1: torch's z_i > 0, -1: z_i <= 0, 0: free).  Splits are taken with
   the float margins of ``complete_mlp`` (active = exact z_i >= -m_i, inactive = exact z_i <= m_i), so
   the two children of a split cover every point together with the phase torch picks there.
2. Bound a batch of subdomains at once (``complete_mlp``): pre-activation bounds under the splits
   (interval for layer 1 - exact on a box -, CROWN intersected with interval propagation after; a
   split clamps its unit's bounds), subdomains with crossing bounds are empty and dropped; phases
   (split, or stable by more than the margin); the gradient box [gL, gU]: the interval backward pass
   intersected with a linear relaxation (mixed McCormick planes of every product d * v, the d's free
   in their boxes: ``gradient_box_linear``);
   the subdomain's bound  ub = || max(gU - g0, g0 - gL) ||_2  >= ||g_D - g0|| for every pattern D
   compatible with the phases (each |g_j - g0_j| <= max(gU_j - g0_j, g0_j - gL_j)).
3. A leaf (every phase known) has the single pattern D: its value v = ||g_D - g0||_2 is exact.  If
   v > incumbent, one program decides it (``complete_leaf.leaf_program``; l_inf an LP, l2 a SOCP):
   empty (a Farkas certificate of the margin-widened constraints, verified in float64 with outward
   rounding) -> dropped; otherwise v is kept in the upper bound, and the program's interior point is
   scored on the real network (usually raising the incumbent to v).
4. Prune subdomains with ub <= incumbent: their points cannot beat a deviation already reached.
   Branch the others on the free unit with the largest score (``branch_scores``).
5. Incumbent: sampling + softplus-surrogate PGD (``complete_attack``) first, then leaf witnesses.

Soundness: every point x' of the ball lies, with torch's pattern P(x'), in some leaf of the split tree
(step 1); a dropped subdomain contains no such point (crossing exact bounds, or a verified Farkas
certificate with margins), a pruned one has all its patterns' values <= ub <= lower; so the float64 deviation of the
pattern, ||g_P - g0||, is at most max(incumbent, kept leaf values, open ub) (the incumbent as used for
pruning).  Torch's float g(x') differs from g_P by at most the vector ``gradient_float_error`` (err), so
    upper = max(incumbent, kept leaf values, open ub) + ||err||_2.
No solver tolerance enters an "empty" decision: the solver only proposes the dual multipliers, and
``complete_leaf.farkas_verified`` checks them (module docstring there).  "gap closed": gap <= max(tol * upper, 2 ||err||_2) (a gap of the
size of the float widening cannot be closed by branching: e.g. a ball with one activation pattern has
lower = 0 and upper = ||err||_2).  "exhausted": nothing left to
branch: every open subdomain is a leaf whose value is kept in ``upper`` because no point realising
its pattern in float was found and its emptiness could not be proven (feasible only within the float
margins, "unsure" Farkas check); the gap can then exceed the float widening (e.g. x at a domain corner
with every first-layer unit at z = 0).  "budget": out of time; "memory": the open list hit ``max_memory_mb``.

Objective "cosine" (``complete_objective``): the same search on the badness -cos(g(x), g(x')); then
``lower`` is a certified lower bound on min cos over the ball, ``upper`` the cosine reached at the
witness, and "gap closed" means upper - lower <= tol (absolute).  Torch's float error enters the node and
leaf bounds directly (boxes widened by err).

l2 (``norm=2``): the region is ball ∩ box.  Layer-1 bounds intersect the box range with
w x0 + b +- r ||w||_2; CROWN concretises with min(box, ball) maxima; leaves are SOCPs; every bound uses
the outer radius r = eps (1 + 4 gamma_{n+4}) (every point a float check ||x' - x||_2 <= eps accepts),
witnesses the inner radius eps (1 - max(1e-4, 4 gamma_{n+4})) and are rounded towards x
(``complete_attack.ball_radii`` / ``project``), so they pass that check in float32 and float64.

Supported: ReLU networks without max-pooling (Linear, Conv2d, AvgPool2d, BatchNorm folded, Flatten:
``complete_net`` turns every affine op into an exact dense float64 matrix; the float margins count each
op's true fan-in), l_inf and l2, saliency, objectives "euclidean" and "cosine".  Other networks and
attributions raise ``checks.PhaseBranchingUnsupported`` (``branching="auto"`` then uses input
branching, ``complete_input``); bad arguments raise ValueError.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .attribution import logit_gradient
from .certified_box import caller_radius
from .checks import (
    PhaseBranchingUnsupported,
    check_attribution,
    check_domain_of,
    check_eps,
    check_norm,
    check_search_args,
    check_x,
    resolve_target,
)
from .complete_attack import attack, ball_radii, project, real_badness, witness_box
from .complete_leaf import leaf_program
from .complete_mlp import (
    DT,
    ReluMLP,
    _crown_upper,
    branch_scores,
    gradient_box,
    gradient_box_linear,
    gradient_float_error,
    leaf_gradient,
    margins,
    output_error,
    phases,
    preact_bounds,
    relu_mlp_from_chain,
)
from .complete_objective import OBJECTIVES, Objective
from .floatsafe import tf32_off
from .gradgraph import check_chain, parse_chain
from .result import BoundResult, tangent_cosine

# one LP per live child (and layer-first branching): drops subdomains whose split constraints that are
# linear in x are infeasible.  10x fewer subdomains measured, but about 10 ms per LP on a loaded 2-core
# machine made it slower on hard nets; off by default.
NODE_LP = False
BETA_ITERS = 0  # steps of the layer-1 split dual (complete_mlp._split_dual) per bound; 0: plain CROWN


@dataclass
class CompleteResult(BoundResult):
    """A ``BoundResult`` (kind "complete"; ``euclidean`` = ``upper``) plus, per sample:

    lower:       deviation reached at ``witness`` (autograd on the real model), (B,)
    upper:       sound bound on max ||g(x') - g(x)||_2 over the ball ∩ domain, (B,)
    gap:         upper - lower, (B,)
    witness:     x* (shape of x), in the ball ∩ domain, the model's dtype
    subdomains:  subdomains bounded, (B,);  lp_calls: leaf programs solved, (B,)
    stop_reason: "gap closed" | "exhausted" | "budget" | "memory" per sample
    """

    lower: torch.Tensor | None = None
    upper: torch.Tensor | None = None
    gap: torch.Tensor | None = None
    witness: torch.Tensor | None = None
    subdomains: torch.Tensor | None = None
    lp_calls: torch.Tensor | None = None
    stop_reason: list[str] = field(default_factory=list)
    attribution_at_x: torch.Tensor | None = None

    def rows(self) -> list[dict]:
        out = super().rows()
        for i, row in enumerate(out):
            row.update(
                lower=float(self.lower[i]),
                upper=float(self.upper[i]),
                gap=float(self.gap[i]),
                subdomains=int(self.subdomains[i]),
                stop_reason=self.stop_reason[i],
            )
        return out


def _check(model, x, eps, norm, attribution, objective, budget_s, tol, domain, max_memory_mb):
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")  # noqa: TRY004
    check_x(x)
    eps = check_eps(eps)
    norm = check_norm(norm)
    attribution = check_attribution(attribution)
    if attribution != "saliency":
        raise PhaseBranchingUnsupported(
            f"complete_bound's phase branching supports attribution='saliency' only (got {attribution!r}): "
            "gradient x input and IG are not constant on activation regions; use branching='input' or 'auto'"
        )
    if objective not in OBJECTIVES:
        raise ValueError(
            f"unsupported objective {objective!r}; complete_bound supports {', '.join(OBJECTIVES)}"
        )
    check_search_args(budget_s, tol, max_memory_mb)
    dom = check_domain_of(x, domain, slack=1e-6)
    return eps, norm, attribution, dom


@tf32_off
def complete_bound(
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
    batch_size: int = 256,
    threads: int | None = 1,
    gradient_bound: str = "linear",
    branching: str = "auto",
    ig_steps: int = 50,
) -> CompleteResult:
    """Branch-and-bound on ReLU phases: per sample a reached deviation ``lower``, a sound ``upper`` and
    the gap (see the module docstring for the proof).  ``budget_s``: wall-clock seconds per sample;
    ``tol``: stop when upper - lower <= tol * upper (cosine: <= tol); ``max_memory_mb``: cap on the
    open list and on the bounding batch; ``batch_size``: subdomains branched per bounding call;
    ``threads``: torch threads during the call (restored after; default 1: the many small tensor ops
    of branch-and-bound ran 8-30x faster single-threaded on a shared 2-core machine; None leaves
    torch's setting);
    ``gradient_bound``: "linear" (interval box intersected with the linear relaxation
    ``gradient_box_linear``, default) or "interval" (the interval box alone).
    ``branching``: "phases" (this module), "input" (``complete_input.input_branch_bound``: boxes of the
    input region, any network ``certified_bound`` accepts, norms inf / 2, every attribution, IG with
    ``ig_steps``; method "input-bab") or "auto": input branching where phases can never apply
    (``complete_input.phase_supported``: smooth activations, max-pool, attribution != saliency), else
    the phase mode, falling back to input branching when it raises ``PhaseBranchingUnsupported``."""
    from . import complete_input as ci

    if branching not in ci.BRANCHING:
        raise ValueError(f"branching must be one of {', '.join(ci.BRANCHING)}, got {branching!r}")
    if branching != "phases":
        args = (model, x, eps, norm, attribution, objective, budget_s, tol, target, domain, seed, max_memory_mb,
                batch_size, threads, ig_steps)
        if branching == "input" or not ci.phase_supported(model, x, attribution):
            return ci.input_branch_bound(*args)
        try:
            return complete_bound(*args[:14], gradient_bound, branching="phases")
        except PhaseBranchingUnsupported:
            return ci.input_branch_bound(*args)
    if gradient_bound not in ("linear", "interval"):
        raise ValueError(f"gradient_bound must be 'linear' or 'interval', got {gradient_bound!r}")
    t0 = time.perf_counter()
    eps, norm, attribution, dom = _check(
        model, x, eps, norm, attribution, objective, budget_s, tol, domain, max_memory_mb
    )
    x = x.detach()
    chain = parse_chain(model, tuple(x.shape[1:]))
    mlp = relu_mlp_from_chain(chain, x.dtype)
    check_chain(model, chain, x)
    batch = x.shape[0]
    target, _ = resolve_target(model, x, target)
    # g(x) of each sample alone (batch of one), as a caller recomputing lower would
    g_x = torch.cat([logit_gradient(model, x[i : i + 1], target[i : i + 1]).detach() for i in range(batch)])
    rng = torch.Generator().manual_seed(int(seed))
    saved_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(max(1, int(threads)))
        per = [
            _one_sample(
                model,
                mlp,
                x[i],
                int(target[i]),
                g_x[i],
                eps,
                dom,
                objective,
                norm,
                float(budget_s),
                float(tol),
                rng,
                float(max_memory_mb),
                int(batch_size),
                gradient_bound,
            )
            for i in range(batch)
        ]
    finally:
        torch.set_num_threads(saved_threads)
    lower = torch.tensor([p["lower"] for p in per], dtype=DT)
    upper = torch.tensor([p["upper"] for p in per], dtype=DT)
    norm_g = g_x.flatten(1).to(DT).norm(dim=1)
    if objective == "euclidean":
        euclid = upper
        cosine = torch.where(upper == 0, torch.ones_like(upper), tangent_cosine(upper, norm_g))
    else:  # a cosine bound says nothing finite about the Euclidean deviation
        euclid, cosine = torch.full_like(lower, float("inf")), lower
    return CompleteResult(
        kind="complete",
        norm=norm,
        eps=eps,
        attribution=attribution,
        euclidean=euclid,
        cosine=cosine,
        label_certified=torch.tensor([p["label"] for p in per]),
        target=target,
        time=time.perf_counter() - t0,
        method="bab",
        network="real",
        details={"per_sample": [p["details"] for p in per]},
        lower=lower,
        upper=upper,
        gap=upper - lower,
        witness=torch.stack([p["witness"] for p in per]).reshape(x.shape),
        subdomains=torch.tensor([p["subdomains"] for p in per]),
        lp_calls=torch.tensor([p["lp_calls"] for p in per]),
        stop_reason=[p["stop"] for p in per],
        attribution_at_x=g_x,
    )


def _label_certified(mlp: ReluMLP, lows, highs, marg, xl, xu, target: int, ball=None) -> bool:
    """CROWN lower bound of every margin f_y - f_j > its float evaluation error (logit errors as in
    ``complete_mlp.margins``, ``output_error``; the region: box, or ball ∩ box)."""
    w, b = mlp.weights[-1], mlp.biases[-1]
    if w.shape[0] < 2:
        return True
    others = [j for j in range(w.shape[0]) if j != target]
    lam = (w[others] - w[target]).unsqueeze(0)  # upper bound of f_j - f_y
    bias = (b[others] - b[target]).unsqueeze(0)
    ub = _crown_upper(mlp, lam, bias, lows, highs, len(mlp.widths) - 1, xl, xu, ball=ball)[0]
    err = output_error(mlp, marg[-1], highs[-1][0].clamp_min(0))
    return bool((ub + err[others] + err[target] < 0).all())


def _one_sample(
    model, mlp, x, target, g0_t, eps, dom, objective, norm, budget, tol, rng, mem_mb, batch_size, gradient_bound
) -> dict:
    t_start = time.perf_counter()
    shape, dtype = tuple(x.shape), x.dtype
    x64 = x.reshape(-1).to(DT)
    ball = leaf_ball = wit_ball = None
    # bounds over the radius of every point a float caller accepts (certified_box.caller_radius: the
    # float norm check and the float projection clamp); witnesses stay in the true ball
    wide = caller_radius(eps, norm, x64.view(1, -1), dtype)
    if norm == "2":
        eps_in, eps_out = ball_radii(eps, x64.numel(), dtype)
        eps_out = max(eps_out, wide)
        ball, wit_ball, leaf_ball = (x64, eps_out), (x64, eps_in), (x64, eps_in, eps_out)
        wide = eps_out
    xl, xu = x64 - wide, x64 + wide
    if dom is not None:
        xl, xu = xl.clamp_min(dom[0]), xu.clamp_max(dom[1])
        xl, xu = torch.minimum(xl, x64), torch.maximum(xu, x64)
    wl, wu = witness_box(x64, eps, xl, xu) if norm == "inf" else (xl, xu)
    g0 = g0_t.reshape(-1).to(DT)
    marg = margins(mlp, xl, xu)
    obj = Objective(objective, g0, gradient_float_error(mlp, target))
    widen = obj.widen
    root = torch.zeros(1, mlp.units, dtype=torch.int8)
    lows, highs, _ = preact_bounds(mlp, root, xl, xu, marg, ball=ball)
    label = _label_certified(mlp, lows, highs, marg, xl, xu, target, ball)
    root_bounds = (lows, highs)  # valid on every subdomain (subsets of the root)
    if eps == 0.0:  # the ball is {x}: g(x') = g(x) exactly (same float evaluation)
        pt = x.reshape(-1).clone()
        val = float(real_badness(model, pt.unsqueeze(0), target, obj, shape)[0][0])
        lower, upper = obj.report(val, val - widen)
        return _pack(lower, upper, pt, 0, 0, "gap closed", label, {})
    best, best_pt = attack(model, mlp, x64, wl, wu, target, obj, shape, dtype, rng, ball=wit_ball)
    t_attack = time.perf_counter() - t_start

    state = {"best": best, "pt": best_pt, "kept": -float("inf"), "lp": 0, "subs": 0, "lp_time": 0.0}
    deadline = t_start + budget
    bytes_per_node = mlp.units + 24
    max_open = max(1024, int(mem_mb * 2**20 / 2 / bytes_per_node))
    # bytes per subdomain in one bounding call: CROWN's (2 h_k, h_j) and (2 h_k, n) float64 coefficient
    # matrices, about 6 live copies
    dims = [mlp.n] + mlp.widths
    per_bound = 8 * 6 * sum(2 * dims[k + 1] * (dims[k] + 2 * mlp.n) for k in range(len(mlp.widths)))
    linear = gradient_bound == "linear"
    chunk = max(2, min(2 * batch_size, int(mem_mb * 2**20 / 2 / per_bound)))

    def bound(splits, parent_ub=None):
        """Bound children; handle leaves at once; return (splits, ub, branch unit) of the open ones.
        A child's ub is capped by its parent's (the child's set is a subset of the parent's)."""
        keep_s, keep_ub, keep_br = [], [], []
        for start in range(0, splits.shape[0], chunk):
            s = splits[start : start + chunk]
            if parent_ub is not None and time.perf_counter() > deadline:
                # out of time: the rest stay open with their parent's bound (sound), never branched
                keep_s.append(splits[start:])
                keep_ub.append(parent_ub[start:])
                keep_br.append(torch.full((splits.shape[0] - start,), -1, dtype=torch.long))
                break
            state["subs"] += s.shape[0]
            lo, hi, empty = preact_bounds(mlp, s, xl, xu, marg, BETA_ITERS, ball, prior=root_bounds)
            ph = phases(mlp, s, lo, hi, marg)
            rec: list = []
            gl, gu = gradient_box(mlp, ph, target, rec)
            if linear:
                ll, lu = gradient_box_linear(mlp, ph, target, rec)
                gl, gu = torch.maximum(gl, ll), torch.minimum(gu, lu)
            ub = obj.node(gl, gu)
            if parent_ub is not None:
                ub = torch.minimum(ub, parent_ub[start : start + chunk])
            leaf = (ph != 0).all(dim=1) & ~empty
            if leaf.any():
                _leaves(s[leaf], ph[leaf])
            live = ~empty & ~leaf & (ub > state["best"])
            if NODE_LP and parent_ub is not None and live.any():
                for i in torch.nonzero(live).flatten().tolist():
                    if time.perf_counter() > deadline:
                        break
                    state["lp"] += 1
                    if leaf_program(mlp, ph[i], s[i], xl, xu, marg, leaf_ball)[0] == "empty":
                        live[i] = False
            if live.any():
                sc = branch_scores(
                    mlp,
                    ph[live],
                    [a[live] for a in lo],
                    [a[live] for a in hi],
                    [(a[live], b[live]) for a, b in rec],
                    layer_first=NODE_LP,
                )
                keep_s.append(s[live])
                keep_ub.append(ub[live])
                keep_br.append(sc.argmax(dim=1))
        if not keep_s:
            return None
        return torch.cat(keep_s), torch.cat(keep_ub), torch.cat(keep_br)

    def _leaves(s, ph):
        vals = obj.leaf(leaf_gradient(mlp, ph, target))
        for i in vals.argsort(descending=True).tolist():
            v = float(vals[i])
            if v <= state["best"]:
                break
            if time.perf_counter() > deadline:  # no time for the LP: keep the value (sound)
                state["kept"] = max(state["kept"], v)
                break
            t_lp = time.perf_counter()
            status, xs, _t = leaf_program(mlp, ph[i], s[i], xl, xu, marg, leaf_ball)
            state["lp_time"] += time.perf_counter() - t_lp
            state["lp"] += 1
            state["empty_leaves"] = state.get("empty_leaves", 0) + (status == "empty")
            if status == "empty":
                continue
            state["kept"] = max(state["kept"], v)  # (initial -inf)
            if xs is not None:
                _witness(torch.as_tensor(xs), v)

    def _witness(xs, v):
        """Score the LP point on the real net; if torch's pattern there is not the leaf's (a thin region,
        float rounding), also try points jittered by 1e-7 .. 1e-3 around it."""
        pts = project(xs.unsqueeze(0), wl, wu, dtype, wit_ball)
        dev, _ = real_badness(model, pts, target, obj, shape)
        if float(dev[0]) < v - 2 * widen - 1e-3 * abs(v):
            scale = torch.logspace(-7, -3, 64, dtype=DT).unsqueeze(1)
            noise = (torch.rand(64, xs.numel(), generator=rng, dtype=DT) * 2 - 1) * scale
            pts = project(xs.unsqueeze(0) + noise, wl, wu, dtype, wit_ball)
            dev, _ = real_badness(model, pts, target, obj, shape)
        i = int(dev.argmax())
        if float(dev[i]) > state["best"]:
            state["best"], state["pt"] = float(dev[i]), pts[i].clone()

    out = bound(root)
    open_s = out[0] if out else root[:0]
    open_ub = out[1] if out else torch.zeros(0, dtype=DT)
    open_br = out[2] if out else torch.zeros(0, dtype=torch.long)
    stop = "exhausted"
    while True:
        keep = open_ub > state["best"]
        open_s, open_ub, open_br = open_s[keep], open_ub[keep], open_br[keep]
        top = float(open_ub.max()) if open_ub.numel() else -float("inf")
        if obj.closed(max(state["best"], state["kept"], top), state["best"], tol):
            stop = "gap closed"
            break
        if open_s.shape[0] == 0:
            stop = "exhausted"
            break
        if time.perf_counter() > deadline:
            stop = "budget"
            break
        if open_s.shape[0] > max_open:
            stop = "memory"
            break
        k = min(batch_size, open_s.shape[0])
        idx = open_ub.topk(k).indices
        rest = torch.ones(open_s.shape[0], dtype=torch.bool)
        rest[idx] = False
        parents, br, pub = open_s[idx], open_br[idx], open_ub[idx]
        kids = parents.repeat(2, 1)
        rows = torch.arange(2 * k)
        kids[rows, br.repeat(2)] = torch.cat([torch.ones(k), -torch.ones(k)]).to(torch.int8)
        open_s, open_ub, open_br = open_s[rest], open_ub[rest], open_br[rest]
        out = bound(kids, pub.repeat(2))
        if out is not None:
            open_s = torch.cat([open_s, out[0]])
            open_ub = torch.cat([open_ub, out[1]])
            open_br = torch.cat([open_br, out[2]])
    # the reported lower: the witness alone, recomputed (reproducible by any caller bit for bit)
    # (pruning used the incumbent as evaluated in a batch: keep that level in the upper bound too)
    pruned_at = state["best"]
    dev, _ = real_badness(model, state["pt"].unsqueeze(0), target, obj, shape)
    state["best"] = float(dev[0])
    top = float(open_ub.max()) if open_ub.numel() else -float("inf")
    lower, upper = obj.report(state["best"], max(state["best"], pruned_at, state["kept"], top))
    details = {
        "open": int(open_s.shape[0]),
        "attack_time": t_attack,
        "lp_time": state["lp_time"],
        "empty_leaves": state.get("empty_leaves", 0),
        "time": time.perf_counter() - t_start,
        "float_widening": widen,
        "units": mlp.units,
        "unstable_at_root": int((phases(mlp, root, lows, highs, marg) == 0).sum()),
    }
    return _pack(lower, upper, state["pt"], state["subs"], state["lp"], stop, label, details)


def _pack(lower, upper, pt, subs, lp, stop, label, details) -> dict:
    return {
        "lower": lower,
        "upper": upper,
        "witness": pt,
        "subdomains": subs,
        "lp_calls": lp,
        "stop": stop,
        "label": label,
        "details": details,
    }
