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
   compatible with the phases (each |g_j - g0_j| <= max(gU_j - g0_j, g0_j - gL_j)), and with the
   linear relaxation also the smaller chord bound (``complete_objective.euclid_chord``: one more row).
3. A leaf (every phase known) has the single pattern D: its value v = ||g_D - g0||_2 is exact.  If
   v > incumbent, one program decides it (``complete_leaf.leaf_program``; l_inf an LP, l2 a SOCP):
   empty (a Farkas certificate of the margin-widened constraints, verified in float64 with outward
   rounding) -> dropped; otherwise v is kept in the upper bound, and the program's interior point is
   scored on the real network (usually raising the incumbent to v).
4. Prune subdomains with ub <= incumbent: their points cannot beat a deviation already reached.
   Branch the others on the free unit with the largest score (``branch_scores``).
5. Incumbent: sampling + softplus-surrogate PGD (``complete_attack``) first, then leaf witnesses and,
   whenever the attacks have had less than ``complete_phase.ATTACK_SHARE`` of the elapsed time, a
   round of PGD inside the open subdomains with the largest bounds (``subdomain_attack``: surrogate
   ascent plus a hinge pulling the split units to their phases); every incumbent is a point scored on
   the real network.
6. Upper cap: ``certified_bound`` (CROWN on the gradient graph, same region) per sample; the reported
   upper is the smaller of the two sound bounds (cosine: the larger certified cosine), and
   details["upper_from"] says which one it is.

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

Supported: ReLU networks (Linear, Conv2d, AvgPool2d, BatchNorm folded, Flatten: ``complete_net`` turns
every affine op into an exact dense float64 matrix; the float margins count each op's true fan-in;
MaxPool2d of ReLU outputs as ReLU sub-networks whose phases are the routing, ``complete_maxpool``, with
the routing phases their entries imply filled in and contradicting subdomains dropped: ``derive_phases``),
l_inf and l2, saliency, objectives "euclidean" and "cosine".  Other networks and
attributions raise ``checks.PhaseBranchingUnsupported`` (``branching="auto"`` then uses input
branching, ``complete_input``); bad arguments raise ValueError.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .attribution import logit_gradient
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
from .complete_beta import SUBDOMAIN_BOUNDS, opt_iters_for
from .complete_mlp import (
    DT,
)
from .complete_net import relu_mlp_from_chain
from .complete_objective import OBJECTIVES
from .complete_phase import phase_search
from .floatsafe import tf32_off
from .gradgraph import check_chain, parse_chain
from .result import BoundResult, tangent_cosine


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

    @classmethod
    def from_samples(cls, per: list[dict], objective: str, g_x: torch.Tensor, witness: torch.Tensor,
                     lp_calls: torch.Tensor, **meta) -> CompleteResult:
        """The result of either engine from its per-sample dicts (lower, upper, label, details, subdomains,
        stop): ``euclidean`` = upper and the tangent cosine bound for objective "euclidean"; for "cosine"
        the certified cosine is ``lower`` and the Euclidean bound is +inf (a cosine bound says nothing
        finite about it).  ``meta``: kind-independent fields (norm, eps, attribution, target, time, method)."""
        lower = torch.tensor([p["lower"] for p in per], dtype=DT)
        upper = torch.tensor([p["upper"] for p in per], dtype=DT)
        if objective == "euclidean":
            norm_g = g_x.flatten(1).to(DT).norm(dim=1)
            euclid = upper
            cosine = torch.where(upper == 0, torch.ones_like(upper), tangent_cosine(upper, norm_g))
        else:
            euclid, cosine = torch.full_like(lower, float("inf")), lower
        return cls(
            kind="complete",
            euclidean=euclid,
            cosine=cosine,
            label_certified=torch.tensor([p["label"] for p in per]),
            network="real",
            details={"per_sample": [p["details"] for p in per]},
            lower=lower,
            upper=upper,
            gap=upper - lower,
            witness=witness,
            subdomains=torch.tensor([p["subdomains"] for p in per]),
            lp_calls=lp_calls,
            stop_reason=[p["stop"] for p in per],
            attribution_at_x=g_x,
            **meta,
        )

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
    subdomain_bound: str = "auto",
) -> CompleteResult:
    """Branch-and-bound on ReLU phases: per sample a reached deviation ``lower``, a sound ``upper`` and
    the gap (see the module docstring for the proof).  ``budget_s``: wall-clock seconds per sample;
    ``tol``: stop when upper - lower <= tol * upper (cosine: <= tol); ``max_memory_mb``: cap on the
    open list and on the bounding batch; ``batch_size``: subdomains branched per bounding call;
    ``threads``: torch threads during the call (restored after; default 1: the many small tensor ops
    of branch-and-bound ran 8-30x faster single-threaded on a shared 2-core machine; None leaves
    torch's setting);
    ``gradient_bound``: "linear" (interval box intersected with the linear relaxation
    ``gradient_box_linear``, default) or "interval" (the interval box alone).  ``subdomain_bound``:
    pre-activation bounds of layers >= 2 by "crown", "alpha-beta" (``complete_beta``: alpha-beta-CROWN
    under the splits of every earlier layer, on the units CROWN leaves open) or "auto" (default:
    alpha-beta up to ``complete_beta.AUTO_MAX_UNITS`` ReLUs, else crown; numbers in
    benchmarks/results/complete_beta.txt).
    ``branching``: "phases" (this module), "input" (``complete_input.input_branch_bound``: boxes of the
    input region, any network ``certified_bound`` accepts, norms inf / 2, every attribution, IG with
    ``ig_steps``; method "input-bab") or "auto": input branching where phases can never apply
    (``complete_input.phase_supported``: smooth activations, attribution != saliency), else
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
            return complete_bound(*args[:14], gradient_bound, "phases", subdomain_bound=subdomain_bound)
        except PhaseBranchingUnsupported:
            return ci.input_branch_bound(*args)
    if gradient_bound not in ("linear", "interval"):
        raise ValueError(f"gradient_bound must be 'linear' or 'interval', got {gradient_bound!r}")
    if subdomain_bound not in SUBDOMAIN_BOUNDS:
        raise ValueError(f"subdomain_bound must be one of {SUBDOMAIN_BOUNDS}, got {subdomain_bound!r}")
    t0 = time.perf_counter()
    eps, norm, attribution, dom = _check(
        model, x, eps, norm, attribution, objective, budget_s, tol, domain, max_memory_mb
    )
    x = x.detach()
    chain = parse_chain(model, tuple(x.shape[1:]))
    mlp = relu_mlp_from_chain(chain, x.dtype, max_memory_mb)
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
        t_cap = time.perf_counter()
        caps = _certified_caps(model, x, eps, norm, objective, target, domain)
        spent = (time.perf_counter() - t_cap) / batch
        per = [
            phase_search(
                model,
                mlp,
                x[i],
                int(target[i]),
                g_x[i],
                eps,
                dom,
                objective,
                norm,
                max(float(budget_s) - spent, 0.0),
                float(tol),
                rng,
                float(max_memory_mb),
                int(batch_size),
                gradient_bound,
                opt_iters_for(subdomain_bound, mlp.units),
                cap=float(caps[i]),
            )
            for i in range(batch)
        ]
    finally:
        torch.set_num_threads(saved_threads)
    return CompleteResult.from_samples(
        per,
        objective,
        g_x,
        torch.stack([p["witness"] for p in per]).reshape(x.shape),
        torch.tensor([p["lp_calls"] for p in per]),
        norm=norm,
        eps=eps,
        attribution=attribution,
        target=target,
        time=time.perf_counter() - t0,
        method="bab",
    )


def _certified_caps(model, x, eps, norm, objective, target, domain) -> torch.Tensor:
    """certified_bound (CROWN on the gradient graph, same ball, domain, target and float contract) per
    sample: its Euclidean bound caps ``upper`` (euclidean), its certified cosine floors ``lower`` (cosine).
    Both are sound bounds of the same quantity over the same region, so the minimum (maximum) is too."""
    from .certified import certified_bound

    r = certified_bound(model, x, eps, norm, "saliency", target=target, method="crown", domain=domain)
    return (r.euclidean if objective == "euclidean" else r.cosine).to(DT)
