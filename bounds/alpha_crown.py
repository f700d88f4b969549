"""alpha-CROWN (optimised linear relaxations; Xu et al., ICLR 2021) for the certified bound.

CROWN (Zhang et al. 2018) bounds a network's output by propagating linear bounds backwards, each
nonlinearity replaced by a pair of valid linear planes (a lower and an upper relaxation).  Which valid
plane is used is a free choice: every choice gives a sound bound, so the choice can be optimised for
the objective at hand by projected gradient steps (alpha-CROWN), and every iterate is itself a sound
bound.  Here:

* **forward net** (pre-activation bounds and label margins, ``crown.crown_forward``): auto_LiRPA 0.3's
  "CROWN-Optimized" (``forward_bounds``).  It optimises the lower-slope alpha in [0, 1] of every
  unstable ReLU (and the tangent points of the S-shaped activations) per start node, maximising the
  sum of the margin lower bounds; the intermediate bounds it reports are, per element, the best over
  iterates of bounds each of which is a CROWN bound under a valid relaxation (``keep_best``), so they
  are sound; iterate 0 is plain CROWN, so they are never looser than CROWN's.  auto_LiRPA needs
  autograd: the call runs under ``torch.enable_grad()`` (certified_bound calls us under no_grad).

* **gradient graph** (``gradgraph.GradNet``, ``crown.crown_gradient``; ``optimize_bounds``): the
  bilinear products a * b of a derivative factor a in [l_a, u_a] and an upstream gradient
  b in [l_b, u_b] (``lirpa_compat.BoundProduct``) are relaxed by
      lower = lam L1 + (1 - lam) L2,   upper = mu U1 + (1 - mu) U2,   lam, mu in [0, 1],
  convex combinations of the valid McCormick planes (L1: (a - l_a)(b - l_b) >= 0, L2: (u_a - a)(u_b - b)
  >= 0, U1: (a - l_a)(u_b - b) >= 0, U2: (u_a - a)(b - l_b) >= 0), hence valid for every lam, mu in
  [0, 1].  CROWN's default is lam = u_b / (u_b - l_b), mu = -l_b / (u_b - l_b).  We make lam, mu free
  per element and per output spec row (``PER_SPEC``; shared over the rows when the matrices would
  exceed ``MEMORY_BUDGET``), and maximise sum(lower bounds) and minimise sum(upper bounds) in two
  separate runs with Adam, projecting onto [0, 1] after every step.  Products whose factor is a free
  input of GradNet (ReLU derivatives, max-pool routings) keep CROWN's weights
  (``OPTIMIZE_FREE_PRODUCTS``): there CROWN's plane is already the best (see the constant), so on ReLU
  nets the gradient graph costs one CROWN pass and alpha-CROWN acts through the forward bounds (and
  through the forward net inside GradNet of mixed nets).  Smooth nets: the slopes of the
  S-shaped activations inside GradNet (auto_LiRPA's own alphas, clipped by ``clip_alpha_``) join the
  optimisation.  Every iterate is a CROWN bound under valid relaxations with the same (sound)
  intermediate bounds, so the elementwise max of the lower / min of the upper bounds over all iterates
  is sound; iterate 0 is CROWN with its default planes, so the result is never looser than CROWN's.

All bounds are on the exact (real-arithmetic) function in float64, as CROWN's: the float-error
widening of ``certified_box`` applies unchanged.
"""

from __future__ import annotations

import contextlib

import torch

# optimisation steps (default of certified_bound(method="alpha-crown")): on a trained MNIST cnn-small
# (l_inf 0.005, l2 0.3) 2-5 steps reached the same mean box width as 20 (within 0.1%) at 1/3-1/4 of
# the time (benchmarks/results/alpha.txt has 5 and 20)
ALPHA_ITERS = 5
FORWARD_LR = 0.5  # auto_LiRPA's lr_alpha for the forward net's ReLU slopes
GRADIENT_LR = 0.2  # Adam step for the McCormick mixing weights in [0, 1]
ACT_LR = 0.1  # Adam step for auto_LiRPA's activation slopes inside GradNet
PER_SPEC = True  # one mixing weight per element and per spec row (else shared over the rows)
MEMORY_BUDGET = 1.5e9  # bytes for the optimised parameters and the autograd graph of one call
# Products whose factor is a free input of GradNet (ReLU derivatives, max-pool routings): CROWN's
# mixed plane has a zero coefficient on the factor and is the chord of the concave min(l_a b, u_a b),
# which dominates, as a function of b, every valid plane with the factor concretised over its box;
# optimising them bought exactly 0 on ReLU MLPs (saliency, grad x input, lr 0.01-0.2) at ~20x the
# cost, so they keep CROWN's weights unless this is True.
OPTIMIZE_FREE_PRODUCTS = False


def check_alpha_iters(alpha_iters) -> int:
    """``alpha_iters`` as an int >= 1 (bool and non-integral values refused)."""
    if isinstance(alpha_iters, bool) or not isinstance(alpha_iters, int):
        try:
            ok = float(alpha_iters) == int(alpha_iters) and not isinstance(alpha_iters, bool)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"alpha_iters must be an integer >= 1, got {alpha_iters!r}")
    value = int(alpha_iters)
    if value < 1:
        raise ValueError(f"alpha_iters must be an integer >= 1, got {alpha_iters!r}")
    return value


# ----------------------------------------------------------------------------------------------
# forward net: auto_LiRPA's CROWN-Optimized
# ----------------------------------------------------------------------------------------------
def forward_opts(iters: int) -> dict:
    """auto_LiRPA ``optimize_bound_args`` for ``iters`` optimisation steps (iters + 1 bound evaluations:
    auto_LiRPA does not step after its last one)."""
    return {
        "optimize_bound_args": {
            "iteration": int(iters) + 1,
            "lr_alpha": FORWARD_LR,
            "enable_alpha_crown": True,
            "enable_beta_crown": False,
            "keep_best": True,
            "early_stop_patience": 10**9,  # never print-and-stop early
        }
    }


DENSE_LIMIT = 2_000_000  # alpha entries per sample (sum of node size x later sizes) for the dense retry


def dense_alpha_entries(nonlin_sizes: list[int]) -> int:
    """Per-sample alpha entries with dense alphas (node size x the sizes of the later start nodes)."""
    return sum(size * (sum(nonlin_sizes[k + 1 :]) + 16) for k, size in enumerate(nonlin_sizes))


def forward_chunk(sizes: list[int], nonlin_sizes: list[int], chunk: int) -> int:
    """Samples per CROWN-Optimized call: alpha has (start-node size x node size) entries per sample for
    every optimised node (x ~8 copies: value, gradient, Adam's two moments, best, autograd)."""
    per_sample = 8 * 8 * max(dense_alpha_entries(nonlin_sizes), max(sizes))
    return max(1, min(int(chunk), int(MEMORY_BUDGET / per_sample)))


def forward_bounds(bm, args, c_rows, inter, iters: int, bound_upper: bool, dense_ok: bool = True):
    """auto_LiRPA CROWN-Optimized on the forward net: (lower, upper) of the output (C-rows if given).
    Leaves the optimised (best-over-iterates) intermediate bounds on the nodes, as plain CROWN does.

    0.3's alphas break in several ways: when more than 90% of a layer is unstable its sparse-feature
    indices are left stale next to a full alpha (RuntimeError: shape mismatch); when a start node's
    unstable set differs between the init pass and an iterate (AssertionError in
    BoundRelu._backward_relaxation; seen under l2); tanh / sigmoid alphas after convolutions (TypeError
    or shape mismatch).  Attempts: sparse spec + sparse features (default), sparse spec only, dense (if
    ``dense_ok``: ~10x slower on an MNIST CNN), then ReLU slopes only (S-shaped activations keep CROWN's
    relaxation); the last error is raised (the caller then falls back to CROWN).  The module remembers
    the attempt that worked and starts there next time (every attempt is sound; they differ in speed
    and tightness only)."""
    bm.set_bound_opts(forward_opts(iters))
    _drop_unoptimisable(bm)
    nodes = list(getattr(bm, "optimizable_activations", []))
    saved = [getattr(n, "use_sparse_features_alpha", False) for n in nodes]
    relus = [n for n in nodes if type(n).__name__ == "BoundRelu"]
    attempts = [(True, True, False), (True, False, False)] + ([(False, False, False)] if dense_ok else [])
    if relus and len(relus) < len(nodes):
        attempts.append((True, False, True))
    first = min(getattr(bm, "certattr_attempt", 0), len(attempts) - 1)  # skip what failed last time
    try:
        for k, (sparse_spec, sparse_features, relu_only) in enumerate(attempts):
            if k < first:
                continue
            bm.bound_opts["sparse_intermediate_bounds"] = sparse_spec
            bm.optimizable_activations = relus if relu_only else nodes
            for node, flag in zip(nodes, saved):
                node.use_sparse_features_alpha = flag and sparse_features
            try:
                with torch.enable_grad():
                    lb, ub = bm.compute_bounds(
                        x=args,
                        C=c_rows,
                        method="CROWN-Optimized",
                        bound_lower=True,
                        bound_upper=bound_upper,
                        intermediate_layer_bounds=inter,
                    )
                bm.certattr_attempt = k
                break
            except (AssertionError, RuntimeError, IndexError, TypeError):
                if k == len(attempts) - 1:
                    raise
            finally:
                for node in nodes:
                    node.opt_end()
    finally:
        bm.bound_opts["sparse_intermediate_bounds"] = True
        bm.optimizable_activations = nodes
        for node, flag in zip(nodes, saved):
            node.use_sparse_features_alpha = flag
    return (lb.detach() if lb is not None else None), (ub.detach() if ub is not None else None)


def _drop_unoptimisable(bm) -> None:
    """auto_LiRPA 0.3's max-pool slopes are broken (float32 parameters, a torch.Size shape in matrix
    mode): max-pools keep CROWN's fixed relaxation (opt_stage None), which is sound.  Only ever
    applied to the modules cached for alpha-CROWN (``crown.cached`` keys them apart)."""
    acts = getattr(bm, "optimizable_activations", None)
    if acts is not None:
        bm.optimizable_activations = [n for n in acts if type(n).__name__ != "BoundMaxPool"]


# ----------------------------------------------------------------------------------------------
# gradient graph: optimised McCormick mixing weights (and activation slopes)
# ----------------------------------------------------------------------------------------------
def product_nodes(bm) -> list:
    return [n for n in bm._modules.values() if type(n).__name__ == "BoundProduct"]


def _optimised_products(bm) -> list:
    return [n for n in product_nodes(bm) if OPTIMIZE_FREE_PRODUCTS or not _free_factor(n)]


def _free_factor(node) -> bool:
    """The factor a of this product is a free input of GradNet (a ReLU derivative, a max-pool routing,
    or x itself under l_inf), used by no other node."""
    return type(node.inputs[0]).__name__ == "BoundInput"


def gradient_chunk(bm, chunk: int, spec, n: int) -> tuple[int, bool]:
    """(rows per optimisation call, per-spec weights?) within ``MEMORY_BUDGET``: per row, the autograd
    graph keeps ~8 float64 (spec x size) coefficient matrices per product node, and per-spec weights
    add lam and mu with gradient, two Adam moments and the clamp copy (~10 more)."""
    rows_spec = n if spec is None else int(spec.shape[1])
    elems = 0
    for node in _optimised_products(bm):
        shape = getattr(node, "output_shape", None)
        elems += int(torch.Size(shape[1:]).numel()) if shape is not None else 0
    if elems == 0 and not getattr(bm, "optimizable_activations", []):
        return int(chunk), PER_SPEC  # nothing optimised: one CROWN pass (``optimize_bounds``)
    per_spec = PER_SPEC
    per_row = 8.0 * rows_spec * max(elems, 1) * (18 if per_spec else 8)
    if per_spec and per_row > MEMORY_BUDGET:
        per_spec, per_row = False, per_row * 8 / 18
    return max(1, min(int(chunk), int(MEMORY_BUDGET / per_row))), per_spec


@contextlib.contextmanager
def _product_params(products: list, per_spec: bool):
    for node in products:
        node.certattr_opt = {"lam": None, "mu": None, "per_spec": per_spec}
    try:
        yield
    finally:
        for node in products:
            node.certattr_opt = None


def _act_nodes(bm) -> list:
    acts = getattr(bm, "optimizable_activations", [])
    return [n for n in acts if getattr(n, "used", False) and n.perturbed]


_LEAF_TYPES = ("BoundInput", "BoundParams", "BoundBuffers", "BoundConstant")


def _all_intermediate(bm, inter: dict | None) -> dict:
    """``inter`` plus the bounds auto_LiRPA just computed for every other perturbed non-leaf node
    (sound CROWN bounds of iterate 0): later iterates need only the pass from the output (auto_LiRPA
    0.3 asks for the bounds of a MatMul's inputs even when its weight is constant)."""
    out = dict(inter or {})
    for node in bm._modules.values():
        if node.name == bm.final_name or node.name in out or type(node).__name__ in _LEAF_TYPES:
            continue
        lo, hi = getattr(node, "lower", None), getattr(node, "upper", None)
        known = isinstance(lo, torch.Tensor) and isinstance(hi, torch.Tensor)
        if getattr(node, "perturbed", False) and known:
            out[node.name] = (lo.detach(), hi.detach())
    return out


def optimize_bounds(bm, args, c_rows, inter, iters: int, per_spec: bool = PER_SPEC, lr: float | None = None,
                    act_slopes: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper): elementwise best over ``iters`` + 1 CROWN evaluations of GradNet (module docstring).

    ``args``, ``c_rows``, ``inter``: as for ``bm.compute_bounds``.  Iterate 0 is plain CROWN (both
    sides); then the lower and the upper bounds are optimised in separate runs from CROWN's planes,
    every intermediate bound fixed at iterate 0's."""
    lr = GRADIENT_LR if lr is None else float(lr)
    _drop_unoptimisable(bm)  # max-pools in GradNet's forward part (mixed nets)
    products = _optimised_products(bm)
    acts = list(getattr(bm, "optimizable_activations", [])) if act_slopes else []
    if not products and not acts:  # nothing to optimise (ReLU nets): CROWN's relaxations are final
        lb, ub = bm.compute_bounds(x=args, C=c_rows, method="CROWN", intermediate_layer_bounds=inter)
        return lb.detach(), ub.detach()
    with torch.enable_grad():
        try:
            if acts:  # one CROWN pass that also initialises the activation slopes
                lb0, ub0, _ = bm.init_slope(args, share_slopes=False, method="backward", c=c_rows,
                                            intermediate_layer_bounds=inter)
                acts = [n for n in _act_nodes(bm) if len(n.alpha)]
            else:
                lb0, ub0 = bm.compute_bounds(x=args, C=c_rows, method="CROWN",
                                             intermediate_layer_bounds=inter)
            fixed = _all_intermediate(bm, inter)
            out = []
            for lower, first in ((True, lb0), (False, ub0)):
                with _product_params(products, per_spec):
                    for node in acts:
                        node.opt_start()
                    best = _run(bm, args, c_rows, fixed, iters, lr, lower, products, acts, first.detach())
                    out.append(best)
        finally:
            for node in acts:
                node.opt_end()
    return out[0], out[1]


def _run(bm, args, c_rows, inter, iters, lr, lower, products, acts, first):
    best = first
    opt = None
    for it in range(iters + 1):  # ``iters`` Adam steps; the first evaluation makes the parameters
        lb, ub = bm.compute_bounds(
            x=args, C=c_rows, method="CROWN", bound_lower=lower, bound_upper=not lower,
            intermediate_layer_bounds=inter,
        )
        val = lb if lower else ub
        cur = val.detach()
        cur = torch.where(torch.isnan(cur), best, cur)  # a NaN iterate (inf - inf planes) bounds nothing
        best = torch.maximum(best, cur) if lower else torch.minimum(best, cur)
        if it == iters:
            break
        if opt is None:
            params = [p for node in products if node.certattr_opt["lam"] is not None
                      for p in (node.certattr_opt["lam"], node.certattr_opt["mu"])]
            groups = [{"params": params, "lr": lr}] if params else []
            alphas = [a for node in acts for a in node.alpha.values()]
            if alphas:
                groups.append({"params": alphas, "lr": ACT_LR})
            if not groups or not val.requires_grad:
                break
            opt = torch.optim.Adam(groups)
        loss = -val.sum() if lower else val.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for node in products:
                st = node.certattr_opt
                if st["lam"] is not None:
                    st["lam"].clamp_(0.0, 1.0)
                    st["mu"].clamp_(0.0, 1.0)
            for node in acts:
                node.clip_alpha_()
    return best
