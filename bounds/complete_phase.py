"""One sample's phase branch-and-bound (the engine behind ``bounds.complete.complete_bound``'s phase
mode; the algorithm and its soundness proof are in ``bounds.complete``'s module docstring).

``phase_search`` runs the best-first search for one sample: root bounds, label check, incumbent attacks,
batched subdomain bounds (``complete_mlp`` pre-activation bounds, alpha-beta-CROWN where
``complete_beta`` is on, derived max-pool routing phases, the gradient box and its chord), exact leaves
(``complete_leaf``), PGD inside the most promising subdomains, and the final (lower, upper) with the
certified_bound cap.
"""

from __future__ import annotations

import math
import time

import torch

from .certified_box import caller_radius
from .complete_attack import attack, ball_radii, project, real_badness, subdomain_attack, witness_box
from .complete_leaf import leaf_program
from .complete_maxpool import derive_phases, leaf_splits, mask_branch
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
)
from .complete_objective import Objective, euclid_chord

# one LP per live child (and layer-first branching): drops subdomains whose split constraints that are
# linear in x are infeasible.  10x fewer subdomains measured, but about 10 ms per LP on a loaded 2-core
# machine made it slower on hard nets; off by default.
NODE_LP = False
BETA_ITERS = 0  # steps of the layer-1 split dual (complete_mlp._split_dual) per bound; 0: plain CROWN
# share of the elapsed time given to PGD inside the most promising open subdomains
# (complete_attack.subdomain_attack: 8 subdomains x 2 starts per round)
ATTACK_SHARE = 0.2


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


def phase_search(
    model, mlp, x, target, g0_t, eps, dom, objective, norm, budget, tol, rng, mem_mb, batch_size, gradient_bound,
    opt_iters=0,
    cap=float("inf"),
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
    # the certified_bound cap in badness terms (report adds widen back for euclidean; cosine: -cos)
    cap = float("inf") if math.isnan(cap) else cap  # a NaN certificate says nothing
    cap_bad = cap - widen if objective == "euclidean" else -cap
    root = torch.zeros(1, mlp.units, dtype=torch.int8)
    lows, highs, _ = preact_bounds(mlp, root, xl, xu, marg, ball=ball, opt_iters=opt_iters)
    label = _label_certified(mlp, lows, highs, marg, xl, xu, target, ball)
    root_bounds = (lows, highs)  # valid on every subdomain (subsets of the root)
    if eps == 0.0:  # the ball is {x}: g(x') = g(x) exactly (same float evaluation)
        pt = x.reshape(-1).clone()
        val = float(real_badness(model, pt.unsqueeze(0), target, obj, shape)[0][0])
        lower, upper = obj.report(val, val - widen)
        return _pack(lower, upper, pt, 0, 0, "gap closed", label, {})
    best, best_pt = attack(model, mlp, x64, wl, wu, target, obj, shape, dtype, rng, ball=wit_ball)
    t_attack = time.perf_counter() - t_start

    state = {"best": best, "pt": best_pt, "kept": -float("inf"), "lp": 0, "subs": 0, "lp_time": 0.0, "att": t_attack}
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
            lo, hi, empty = preact_bounds(mlp, s, xl, xu, marg, BETA_ITERS, ball, root_bounds, opt_iters)
            # max-pool routing units: phases implied by their entries filled, contradictions empty
            ph, clash = derive_phases(mlp, phases(mlp, s, lo, hi, marg))
            empty = empty | clash
            rec: list = []
            gl, gu = gradient_box(mlp, ph, target, rec)
            if linear:
                ll, lu = gradient_box_linear(mlp, ph, target, rec)
                gl, gu = torch.maximum(gl, ll), torch.minimum(gu, lu)
            ub = obj.node(gl, gu)
            if linear and objective == "euclidean":  # the chord of the squared norm: one more row
                ucg = gradient_box_linear(mlp, ph, target, rec, (gl + gu - 2 * g0).unsqueeze(1))[:, 0]
                ub = torch.minimum(ub, euclid_chord(ucg, gl, gu, g0))
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
                    si = leaf_splits(mlp, ph[i], s[i])
                    if leaf_program(mlp, ph[i], si, xl, xu, marg, leaf_ball)[0] == "empty":
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
                keep_br.append(mask_branch(mlp, sc).argmax(dim=1))
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
            status, xs, _t = leaf_program(mlp, ph[i], leaf_splits(mlp, ph[i], s[i]), xl, xu, marg, leaf_ball)
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

    def _attack_open(open_s, open_ub):
        """One round of subdomain_attack from the incumbent and a random point of the region, in the
        8 open subdomains with the largest bounds; its time counts in state["att"]."""
        t_a = time.perf_counter()
        top = open_ub.topk(min(8, open_ub.numel())).indices
        k = top.numel()
        rand = wl + torch.rand(k, wl.numel(), generator=rng, dtype=DT) * (wu - wl)
        starts = torch.cat([state["pt"].to(DT).expand(k, -1), rand])
        if wit_ball is not None:
            starts = project(starts, wl, wu, DT, wit_ball)
        val, pt = subdomain_attack(
            model, mlp, starts, open_s[top].repeat(2, 1), wl, wu, target, obj, shape, dtype, ball=wit_ball
        )
        if pt is not None and val > state["best"]:
            state["best"], state["pt"] = val, pt
        state["att"] += time.perf_counter() - t_a

    out = bound(root)
    open_s = out[0] if out else root[:0]
    open_ub = out[1] if out else torch.zeros(0, dtype=DT)
    open_br = out[2] if out else torch.zeros(0, dtype=torch.long)
    stop = "exhausted"
    while True:
        keep = open_ub > state["best"]
        open_s, open_ub, open_br = open_s[keep], open_ub[keep], open_br[keep]
        top = float(open_ub.max()) if open_ub.numel() else -float("inf")
        if obj.closed(min(cap_bad, max(state["best"], state["kept"], top)), state["best"], tol):
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
        now = time.perf_counter()
        if open_s.shape[0] and now < deadline and state["att"] < ATTACK_SHARE * (now - t_start):
            _attack_open(open_s, open_ub)
    # the reported lower: the witness alone, recomputed (reproducible by any caller bit for bit)
    # (pruning used the incumbent as evaluated in a batch: keep that level in the upper bound too)
    pruned_at = state["best"]
    dev, _ = real_badness(model, state["pt"].unsqueeze(0), target, obj, shape)
    state["best"] = float(dev[0])
    top = float(open_ub.max()) if open_ub.numel() else -float("inf")
    upper_bad = max(state["best"], pruned_at, state["kept"], top)
    lower, upper = obj.report(state["best"], max(state["best"], min(cap_bad, upper_bad)))
    details = {
        "open": int(open_s.shape[0]),
        "attack_time": state["att"],
        "lp_time": state["lp_time"],
        "empty_leaves": state.get("empty_leaves", 0),
        "time": time.perf_counter() - t_start,
        "float_widening": widen,
        "units": mlp.units,
        "unstable_at_root": int((phases(mlp, root, lows, highs, marg) == 0).sum()),
        "upper_from": "certified_bound" if cap_bad < upper_bad else "branch-and-bound",
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
