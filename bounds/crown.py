"""auto_LiRPA plumbing of the certified bound: CROWN on the forward net (pre-activation bounds and
label margins) and on the gradient graph (``gradgraph.GradNet``), with a cache of BoundedModules.

The cache is keyed on the *content* of the folded weights (``floatsafe.chain_fingerprint``), so a
model whose weights were written in place (``p.data.copy_``, manual SGD, a loader) never reuses a
module built for its old weights.  Under l2, auto_LiRPA 0.3 gives the input node a zero-width
interval (SPEC 8): both networks start with an identity stem whose bounds we supply (the box of
ball ∩ domain), so no node ever sees that zero-width interval.  Both passes run inside
``heap.retained_heap`` (freed coefficient tensors are reused from the heap instead of being
page-faulted again; no value changes).

GradNet's intermediate bounds (``FULL_CROWN``): the pre-activation and gradient boxes of the interval
pass are handed to auto_LiRPA as fixed; the upstream-gradient nodes that CROWN can narrow
(``upstream_worth_crown``) are bounded by CROWN at the positions whose ReLU factor is unstable and
intersected with the interval boxes as soon as they are computed (``_intersecting``), so the McCormick
planes of the products above them use the tighter of the two.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import numpy as np
import torch

from . import alpha_crown
from .box_perturbation import box_perturbation
from .crown_upstream import _intersecting, _node_box, _references, _unstable_mask, upstream_worth_crown
from .floatsafe import chain_fingerprint
from .gradgraph import Act, Affine, Chain, ForwardNet, GradNet, MaxPool
from .heap import retained_heap
from .interval import Box
from .lirpa_compat import custom_ops, import_auto_lirpa


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """auto_LiRPA 0.3 creates its specification matrices (eye, C) in the default dtype: run it with
    the dtype of our float64 bound propagation; the caller's default is restored."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


_ACT_NODE_NAMES = ("BoundRelu", "BoundSoftplus", "BoundSigmoid", "BoundTanh", "BoundMaxPool")


# ----------------------------------------------------------------------------------------------
# cached auto_LiRPA modules
# ----------------------------------------------------------------------------------------------
_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 6


def cached(chain: Chain, key: tuple, build):
    """The value built for this chain's weights (by content) and ``key``, built once."""
    full = (chain_fingerprint(chain),) + key
    hit = _CACHE.get(full)
    if hit is not None:
        _CACHE.move_to_end(full)
        return hit
    value = build()
    _CACHE[full] = value
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return value


def _perturbation(al, norm: str, eps: float, box: Box):
    if norm == "inf":
        return al.PerturbationLpNorm(norm=np.inf, eps=eps, x_L=box[0], x_U=box[1])
    return al.PerturbationLpNorm(norm=2, eps=eps)


def _chunks(n: int, size: int):
    size = max(1, int(size))
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def op_sizes(chain: Chain) -> list[int]:
    """Per-sample element counts of the input, every op's output and every max-pool's window unfold
    (the sizes of auto_LiRPA's coefficient matrices, for chunking)."""
    sizes = [int(np.prod(chain.in_shape))]
    for op in chain.ops:
        for attr in ("out_shape", "shape"):
            s = getattr(op, attr, None)
            if s:
                sizes.append(int(np.prod(s)))
        if isinstance(op, MaxPool):
            sizes.append(int(np.prod(op.out_shape)) * op.window)
    return sizes


# ----------------------------------------------------------------------------------------------
# pre-activation bounds and margins (auto_LiRPA CROWN on the forward network)
# ----------------------------------------------------------------------------------------------
def margin_spec(target: torch.Tensor, classes: int, dtype) -> torch.Tensor:
    """C (B, classes - 1, classes) with rows e_y - e_j, j != y."""
    b = target.shape[0]
    eye = torch.eye(classes, dtype=dtype, device=target.device)
    c = eye[target].unsqueeze(1) - eye.unsqueeze(0)  # (B, classes, classes)
    keep = torch.ones(b, classes, dtype=torch.bool, device=target.device)
    keep[torch.arange(b, device=target.device), target] = False
    return c[keep].view(b, classes - 1, classes)


def row_slices(rows: int, group: int, chunk: int):
    """Chunks of at most ``chunk`` rows that never straddle two groups of ``group`` rows (the rows of
    one IG path point share one l2 radius)."""
    for g0 in range(0, rows, group):
        for sl in _chunks(min(group, rows - g0), chunk):
            yield slice(g0 + sl.start, g0 + sl.stop)


@retained_heap()
def crown_forward(chain, center, box, eps_rows, norm, target, group, chunk, optimize: int = 0):
    """CROWN pass on the forward net over the regions (l2: ball(center, eps_rows) ; inf: box).

    Returns (per-op input bounds for activations / max-pools, margin lower bounds (rows, classes-1)).
    Tries auto_LiRPA's patches mode for convolutions first, then matrix mode.  ``optimize`` > 0:
    alpha-CROWN with that many steps (``alpha_crown.forward_bounds``).  CROWN (``optimize`` 0) runs
    at most ``forward_row_cap(chain)`` rows per call (every row is bounded alone: the same bounds)."""
    if not optimize:
        chunk = min(int(chunk), forward_row_cap(chain))
    errors = []
    for mode in ("patches", "matrix"):
        failed_key = (chain_fingerprint(chain), mode, bool(optimize))
        if _CONV_MODE_FAILED.get(failed_key):
            continue
        try:
            with default_dtype(center.dtype):
                return _crown_forward_mode(chain, center, box, eps_rows, norm, target, group, chunk, mode,
                                           optimize)
        except (
            NotImplementedError,
            AssertionError,
            ValueError,
            RuntimeError,
            IndexError,
            KeyError,
            TypeError,
        ) as exc:
            errors.append(f"{mode}: {type(exc).__name__}: {exc}")
            _CONV_MODE_FAILED[failed_key] = True
    raise RuntimeError("; ".join(errors) or "auto_LiRPA failed")


# rows per CROWN call on the forward net: its largest dense coefficient tensor (linear-layer spec x rows
# x the largest layer, float64) stays under this size.  Measured on cnn-small batch 32 (one thread,
# 2026-12-02): all 32 rows in one call 4.4 s CPU, 1100 MB peak; 8 rows per call 3.0 s, 724 MB (large
# tensors are page-faulted afresh on every allocation; smaller ones are reused from the heap)
FORWARD_BLOCK_BYTES = 16 << 20


def forward_row_cap(chain: Chain) -> int:
    """Rows per forward CROWN call (``FORWARD_BLOCK_BYTES``)."""
    dense_spec = max([int(op.out_shape[0]) for op in chain.ops if isinstance(op, Affine) and op.kind == "linear"]
                     + [int(chain.num_classes)])
    return max(1, int(FORWARD_BLOCK_BYTES // (8 * max(op_sizes(chain)) * dense_spec)))


_CONV_MODE_FAILED: dict = {}
# False: GradNet's intermediate bounds are the interval pass's boxes (one CROWN pass, for the output);
# True: auto_LiRPA recomputes every intermediate bound of GradNet by CROWN (replacing, not intersecting);
# "intersect" (default): the upstream-gradient nodes by CROWN ∩ the interval boxes, the rest as False
# (``crown_gradient(upstream_crown=)``; MNIST cnn-small l_inf 0.02: box 0.86x, Euclidean 0.89x, time
# 1.01-1.17x; 784-100-100-10 MLP: unchanged, nothing to bound; benchmarks/results/upstream.txt)
FULL_CROWN: bool | str = "intersect"
MEMORY_BUDGET = 1e9  # bytes for auto_LiRPA's coefficient matrices per call


def _crown_forward_mode(chain, center, box, eps_rows, norm, target, group, chunk, mode, optimize=0):
    al = import_auto_lirpa()
    nonlin = [i for i, op in enumerate(chain.ops) if isinstance(op, (Act, MaxPool))]
    identity = norm == "2"

    def build():
        net = ForwardNet(chain, identity_stem=identity)
        # every neuron's intermediate bound by CROWN (auto_LiRPA's sparse mode bounds only the neurons that
        # IBP finds unstable in *some* row of the call, so a row's bounds depended on the other rows, and
        # alpha-CROWN's iterate 0 could start looser than method "crown")
        opts = {"conv_mode": mode, "sparse_intermediate_bounds": False, "sparse_conv_intermediate_bounds": False}
        return al.BoundedModule(net, (center[:1],), bound_opts=opts, device=center.device, verbose=False)

    # optimised modules are kept apart (alpha-CROWN leaves slope parameters on their nodes)
    key = ("forward", tuple(center.shape[1:]), mode, identity, str(center.device), center.dtype,
           bool(optimize))
    bm = cached(chain, key, build)
    stem_node = _stem_node(bm) if identity else None
    nodes = [n for n in bm._modules.values() if type(n).__name__ in _ACT_NODE_NAMES]
    if len(nodes) != len(nonlin):
        raise RuntimeError("auto_LiRPA graph does not match the parsed chain")
    bounds: dict[int, list] = {i: [[], []] for i in nonlin}
    margins = []
    c_all = margin_spec(target, chain.num_classes, center.dtype) if chain.num_classes > 1 else None
    if optimize:
        nonlin_sizes = [int(np.prod(getattr(chain.ops[i], "in_shape", None) or chain.ops[i].shape))
                        for i in nonlin]
        chunk = alpha_crown.forward_chunk(op_sizes(chain), nonlin_sizes, chunk)
        dense_ok = alpha_crown.dense_alpha_entries(nonlin_sizes) <= alpha_crown.DENSE_LIMIT
    for sl in row_slices(center.shape[0], group, chunk):
        ptb = _perturbation(al, norm, float(eps_rows[sl.start]), (box[0][sl], box[1][sl]))
        args = (al.BoundedTensor(center[sl], ptb),)
        # under l2 the identity stem ranges over the ball ∩ domain: its box is a sound intermediate bound
        inter = {stem_node: (box[0][sl], box[1][sl])} if stem_node is not None else None
        if optimize:
            c_rows = c_all[sl] if c_all is not None else None
            lb, _ = alpha_crown.forward_bounds(bm, args, c_rows, inter, optimize, c_all is None, dense_ok)
            if c_all is not None:
                margins.append(lb)
        elif c_all is not None:
            lb, _ = bm.compute_bounds(
                x=args, C=c_all[sl], method="CROWN", bound_upper=False, intermediate_layer_bounds=inter
            )
            margins.append(lb.detach())
        else:
            bm.compute_bounds(x=args, method="CROWN", intermediate_layer_bounds=inter)
        for i, node in zip(nonlin, nodes):
            inp = node.inputs[0]
            lo, hi = inp.lower.detach(), inp.upper.detach()
            op = chain.ops[i]
            if isinstance(op, Act) and op.name == "softplus" and op.beta != 1.0:
                lo, hi = lo / op.beta, hi / op.beta  # the node is beta * z
            bounds[i][0].append(lo)
            bounds[i][1].append(hi)
    out = {i: (torch.cat(v[0]), torch.cat(v[1])) for i, v in bounds.items()}
    marg = (
        torch.cat(margins)
        if margins
        else torch.ones(center.shape[0], 1, dtype=center.dtype, device=center.device)
    )
    return out, marg


@retained_heap()
def crown_gradient(
    chain, center, box, eps_rows, norm, onehot, factor_list, times_input, group, chunk, supplied=None,
    spec=None, optimize: int = 0, sides: str = "both", upstream_crown: bool = False, tightened: dict | None = None,
):
    """CROWN on ``GradNet``: box on d f_y/dx (times x if ``times_input``), shape (rows, *in_shape).

    ``spec``: None (the box of every coordinate) or C (rows, m, n) with n the number of input entries:
    then the bounds of the m linear functionals C g are returned, shape (rows, m).
    ``supplied``: (pre-activation bounds per op, upstream-gradient boxes per op, gradient box) that
    are handed to auto_LiRPA as intermediate bounds (sound; skips one CROWN pass per node, leaving
    only the pass for the output).  None: auto_LiRPA computes every intermediate bound by CROWN.
    ``optimize`` > 0: alpha-CROWN, that many projected Adam steps on the relaxations for this spec
    (``alpha_crown.optimize_bounds``; lower and upper bounds optimised separately, best iterate kept).
    ``sides``: "both", or "upper" (plain CROWN only: the output's lower bounds are not computed and come
    back as -inf; intermediate bounds are two-sided as always).
    ``upstream_crown`` (with ``supplied`` only): the upstream-gradient nodes ``upstream_worth_crown``
    selects are not fixed to the supplied boxes but bounded by CROWN and intersected with them
    (``_intersecting``; alpha-CROWN: in its iterate 0, whose intermediate bounds every later iterate
    keeps); ``tightened``: a dict that then receives {op index: (lo, hi)} of those intersected boxes,
    in ``supplied``'s shapes."""
    if sides not in ("both", "upper"):
        raise ValueError(f"sides must be 'both' or 'upper', got {sides!r}")
    if not times_input and not any(isinstance(op, (Act, MaxPool)) for op in chain.ops):
        # an affine net's gradient is a constant: auto_LiRPA 0.3 broadcasts it over (rows x rows) (slow,
        # wrong shape); the callers' interval box is exact there
        raise RuntimeError("the gradient of an affine network does not depend on x: no CROWN pass")
    al = import_auto_lirpa()
    identity = norm == "2"

    def build():
        net = GradNet(chain, times_input=times_input, identity_stem=identity)
        args = [center[:1], onehot[:1]] + [f[0][:1] for f in factor_list]
        bm = al.BoundedModule(
            net,
            tuple(args),
            bound_opts={"conv_mode": "matrix"},
            device=center.device,
            verbose=False,
            custom_ops=custom_ops(),
        )
        _ibp_for_monotone(bm)
        _linear_matmuls(bm)
        bm._certattr_nodes = _gradnet_nodes(bm, chain, times_input)
        _intersecting(bm)
        return bm

    key = ("grad", tuple(center.shape[1:]), times_input, identity, str(center.device), center.dtype,
           bool(optimize))
    with default_dtype(center.dtype):
        bm = cached(chain, key, build)
    stem_node = _stem_node(bm) if identity else None
    nodes = bm._certattr_nodes if supplied is not None else None
    upstream_crown = bool(upstream_crown) and nodes is not None
    crowned = upstream_worth_crown(chain) if upstream_crown else set()
    upstream_crown = upstream_crown and bool(crowned)
    collected: dict = {}
    lows, highs = [], []
    if optimize:
        chunk, per_spec = alpha_crown.gradient_chunk(bm, chunk, spec, int(np.prod(chain.in_shape)))
    for sl in row_slices(center.shape[0], group, chunk):
        ptb = _perturbation(al, norm, float(eps_rows[sl.start]), (box[0][sl], box[1][sl]))
        args = [al.BoundedTensor(center[sl], ptb), onehot[sl]]
        for value, (flo, fhi) in factor_list:
            fptb = box_perturbation(flo[sl], fhi[sl])  # concretised over the factors of nonzero width only
            args.append(al.BoundedTensor(value[sl], fptb))
        inter = {}
        if stem_node is not None:
            # the identity node ranges over the ball ∩ domain: its box is a sound intermediate bound
            inter[stem_node] = (box[0][sl], box[1][sl])
        if nodes is not None:
            inter.update(_intermediate(nodes, chain, supplied, sl))
        if upstream_crown:  # CROWN on those nodes, intersected with the supplied boxes
            bm._certattr_ref = {name: (*inter.pop(name), _unstable_mask(chain, factor_list, i, sl))
                                for i, name in nodes["upstream"].items() if i in crowned}
        c_rows = None if spec is None else spec[sl]
        with default_dtype(center.dtype), _references(bm):
            if optimize:
                lb, ub = alpha_crown.optimize_bounds(bm, tuple(args), c_rows, inter or None, optimize,
                                                     per_spec)
            else:
                lb, ub = bm.compute_bounds(
                    x=tuple(args), C=c_rows, method="CROWN", intermediate_layer_bounds=inter or None,
                    bound_lower=sides == "both",
                )
                if sides == "upper":
                    lb = torch.full_like(ub, -float("inf"))
            if upstream_crown:  # (alpha-CROWN: iterate 0's intersected bounds, fixed for every later iterate)
                for i, name in nodes["upstream"].items():
                    if i in crowned:
                        collected.setdefault(i, []).append(_node_box(bm[name], chain.ops[i]))
        shape = (-1, *chain.in_shape) if spec is None else (-1, spec.shape[1])
        rows = sl.stop - sl.start
        if lb.numel() != rows * int(np.prod(shape[1:])) or ub.numel() != lb.numel():
            # auto_LiRPA 0.3 broadcasts a gradient that does not depend on x (an affine net) over
            # (rows x rows): refuse it (the callers fall back to the interval box, exact there)
            raise RuntimeError(f"auto_LiRPA returned gradient bounds of shape {tuple(lb.shape)} for {rows} rows")
        lows.append(lb.detach().reshape(shape))
        highs.append(ub.detach().reshape(shape))
    if upstream_crown and tightened is not None:
        for i, parts in collected.items():
            tightened[i] = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return torch.cat(lows), torch.cat(highs)


def _gradnet_nodes(bm, chain: Chain, times_input: bool) -> dict | None:
    """Names of the GradNet nodes whose bounds we know: the upstream-gradient input of every product
    (walking the backward chain from the output), the gradient itself (gradient x input) and the
    pre-activation inputs of the forward part.  None if the graph does not look as expected."""
    node = bm[bm.final_name]
    products = []
    while type(node).__name__ != "BoundInput":
        if not node.inputs:
            return None
        if type(node).__name__ in ("BoundMul", "BoundProduct"):
            products.append(node)
            node = node.inputs[1]
        else:
            node = node.inputs[0]
    nonlin = [i for i, op in enumerate(chain.ops) if isinstance(op, (Act, MaxPool))]
    out: dict = {"upstream": {}, "preact": {}, "gradient": None}
    if times_input:
        if not products:
            return None
        out["gradient"] = products.pop(0).inputs[1].name
    if len(products) != len(nonlin):
        return None
    for i, mul_node in zip(nonlin, products):
        out["upstream"][i] = mul_node.inputs[1].name
    softplus_inputs = {n.inputs[0].name for n in bm._modules.values() if type(n).__name__ == "BoundSoftplus"}
    fwd = [
        n
        for n in bm._modules.values()
        if type(n).__name__ in _ACT_NODE_NAMES
        and not (type(n).__name__ == "BoundSigmoid" and n.inputs[0].name in softplus_inputs)
    ]
    net_until = max(
        [i + 1 for i, op in enumerate(chain.ops) if isinstance(op, Act) and op.name != "relu"], default=0
    )
    expected = [i for i in nonlin if i < net_until]
    if len(fwd) != len(expected):
        return None
    for i, n in zip(expected, fwd):
        out["preact"][i] = n.inputs[0].name
    return out


def _intermediate(nodes: dict, chain: Chain, supplied, sl: slice) -> dict:
    bounds, upstream, grad = supplied
    inter = {}
    for i, name in nodes["preact"].items():
        lo, hi = bounds[i][0][sl], bounds[i][1][sl]
        op = chain.ops[i]
        if isinstance(op, Act) and op.name == "softplus" and op.beta != 1.0:
            lo, hi = lo * op.beta, hi * op.beta
        inter[name] = (lo, hi)
    for i, name in nodes["upstream"].items():
        lo, hi = upstream[i][0][sl], upstream[i][1][sl]
        op = chain.ops[i]
        if isinstance(op, MaxPool):  # the upstream gradient repeated over the window: (B, C*k*k, Ho, Wo)
            shape = (lo.shape[0], op.in_shape[0] * op.window) + tuple(op.out_shape[1:])
            lo = lo.unsqueeze(2).expand(-1, -1, op.window, -1, -1).reshape(shape)
            hi = hi.unsqueeze(2).expand(-1, -1, op.window, -1, -1).reshape(shape)
        inter[name] = (lo, hi)
    if nodes["gradient"] is not None:
        inter[nodes["gradient"]] = (grad[0][sl], grad[1][sl])
    return inter


def _ibp_for_monotone(bm) -> None:
    """Let auto_LiRPA take interval bounds (as it does for ReLU) for the elementwise nodes of the
    derivative factors: monotone activations, +- constants, products by constants and squares, for
    which CROWN cannot be tighter than the image of the input interval, at the price of a pass."""
    from auto_LiRPA import bound_ops

    names = ("BoundSigmoid", "BoundTanh", "BoundSoftplus", "BoundAdd", "BoundSub", "BoundMul")
    extra = [getattr(bound_ops, name) for name in names if hasattr(bound_ops, name)]
    current = list(getattr(bm, "ibp_intermediate", []))
    bm.ibp_intermediate = current + [c for c in extra if c not in current]


def _linear_matmuls(bm) -> None:
    """A MatMul with a constant weight (v -> W^T v written as ``F.linear(v, W.t())``) makes auto_LiRPA
    0.3's BoundMatMul ask for the bounds of its input (``requires_input_bounds = [0, 1]``, needed only
    when both factors are perturbed): a full CROWN pass per product output that nothing reads (its
    backward with a constant weight is BoundLinear's: A W).  Drop that request where the weight is not
    perturbed: the bounds returned are unchanged, the pass is saved.  (GradNet now writes linear
    adjoints as 1x1 ``conv_adjoint``s, so this guards graphs that still contain such a MatMul.)"""
    for node in bm._modules.values():
        if type(node).__name__ != "BoundMatMul" or len(node.inputs) != 2:
            continue
        weight = node.inputs[1]
        if type(weight).__name__ == "BoundParams" and getattr(weight, "perturbation", None) is None:
            node.requires_input_bounds = []


def _stem_node(bm) -> str | None:
    inputs = [n for n in bm._modules.values() if type(n).__name__ == "BoundInput"]
    if not inputs:
        return None
    first = inputs[0]
    for n in bm._modules.values():
        if n.inputs and n.inputs[0] is first and type(n).__name__ in ("BoundConv", "BoundLinear"):
            return n.name
    return None


