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
Exact ties (ReLU input 0, equal max-pool entries) follow autograd: relu'(0) = 0, first maximum.
"""

from __future__ import annotations

import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .attribution import attribution as compute_attribution
from .checks import check_attribution, check_domain, check_eps, check_norm, check_x
from .gradgraph import Act, Chain, ForwardNet, GradNet, MaxPool, check_chain, parse_chain
from .interval import Box, factor_boxes, forward_bounds, gradient_box, mul
from .lirpa_compat import custom_ops, import_auto_lirpa
from .result import BoundResult, tangent_cosine

METHODS = ("crown", "ibp")
_ACT_NODE_NAMES = ("BoundRelu", "BoundSoftplus", "BoundSigmoid", "BoundTanh", "BoundMaxPool")


# ----------------------------------------------------------------------------------------------
# result
# ----------------------------------------------------------------------------------------------
def attribution_map(g: torch.Tensor) -> torch.Tensor:
    """m = sum_c |g_c| flattened to (B, pixels) (a (B, n) attribution is its own map)."""
    if g.dim() >= 3:
        return g.abs().sum(dim=1).flatten(1)
    return g.abs().flatten(1)


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

    def topk_intersection(self, k: int) -> torch.Tensor:
        """(B,) certified lower bound on |T_k(m(x)) ∩ T_k(m(x'))| / k over the ball (m = sum_c |g|).

        Counts the pixels certainly in the top k of every map in the box (map lower bound above the
        k-th largest map upper bound of the other pixels; such pixels are also certainly in T_k(m(x)))."""
        k = int(k)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        m_lo, m_hi = map_box(self.lower, self.upper)
        if k > m_hi.shape[1]:
            raise ValueError(f"k={k} exceeds the number of map entries {m_hi.shape[1]}")
        m_x = attribution_map(self.attribution_at_x)
        sure = certainly_in_topk(m_lo, m_hi, k) & certainly_in_topk(m_x, m_x, k)
        return sure.sum(dim=1).to(m_hi.dtype) / k


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
    lo, hi = check_domain(domain)
    if (x < lo - 1e-6).any() or (x > hi + 1e-6).any():
        raise ValueError(f"x lies outside the domain [{lo}, {hi}]")
    steps = int(ig_steps)
    if steps < 1:
        raise ValueError(f"ig_steps must be >= 1, got {ig_steps}")
    return eps, norm, attribution, method, (lo, hi), steps


# ----------------------------------------------------------------------------------------------
# cached auto_LiRPA modules
# ----------------------------------------------------------------------------------------------
_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 6


def _model_key(model: nn.Module) -> tuple:
    state = tuple(
        (t.data_ptr(), t._version, tuple(t.shape)) for t in list(model.parameters()) + list(model.buffers())
    )
    return (id(model), state)


def _cached(model: nn.Module, key: tuple, build):
    full = (_model_key(model),) + key
    hit = _CACHE.get(full)
    if hit is not None and hit[0]() is model:
        _CACHE.move_to_end(full)
        return hit[1]
    value = build()
    _CACHE[full] = (weakref.ref(model), value)
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


def _op_sizes(chain: Chain) -> list[int]:
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
def _margin_spec(target: torch.Tensor, classes: int, dtype) -> torch.Tensor:
    """C (B, classes - 1, classes) with rows e_y - e_j, j != y."""
    b = target.shape[0]
    eye = torch.eye(classes, dtype=dtype, device=target.device)
    c = eye[target].unsqueeze(1) - eye.unsqueeze(0)  # (B, classes, classes)
    keep = torch.ones(b, classes, dtype=torch.bool, device=target.device)
    keep[torch.arange(b, device=target.device), target] = False
    return c[keep].view(b, classes - 1, classes)


def _row_slices(rows: int, group: int, chunk: int):
    """Chunks of at most ``chunk`` rows that never straddle two groups of ``group`` rows (the rows of
    one IG path point share one l2 radius)."""
    for g0 in range(0, rows, group):
        for sl in _chunks(min(group, rows - g0), chunk):
            yield slice(g0 + sl.start, g0 + sl.stop)


def _crown_forward(model, chain, center, box, eps_rows, norm, target, group, chunk):
    """CROWN pass on the forward net over the regions (l2: ball(center, eps_rows) ; inf: box).

    Returns (per-op input bounds for activations / max-pools, margin lower bounds (rows, classes-1)).
    Tries auto_LiRPA's patches mode for convolutions first, then matrix mode."""
    errors = []
    for mode in ("patches", "matrix"):
        if _CONV_MODE_FAILED.get((id(model), mode)):
            continue
        try:
            return _crown_forward_mode(model, chain, center, box, eps_rows, norm, target, group, chunk, mode)
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
            _CONV_MODE_FAILED[(id(model), mode)] = True
    raise RuntimeError("; ".join(errors) or "auto_LiRPA failed")


_CONV_MODE_FAILED: dict = {}
_FULL_CROWN = False
_MEMORY_BUDGET = 1e9  # bytes for auto_LiRPA's coefficient matrices per call  # True: let auto_LiRPA recompute every intermediate bound of GradNet by CROWN


def _crown_forward_mode(model, chain, center, box, eps_rows, norm, target, group, chunk, mode):
    al = import_auto_lirpa()
    nonlin = [i for i, op in enumerate(chain.ops) if isinstance(op, (Act, MaxPool))]

    def build():
        net = ForwardNet(chain)
        return al.BoundedModule(
            net, (center[:1],), bound_opts={"conv_mode": mode}, device=center.device, verbose=False
        )

    bm = _cached(model, ("forward", tuple(center.shape[1:]), mode, str(center.device)), build)
    nodes = [n for n in bm._modules.values() if type(n).__name__ in _ACT_NODE_NAMES]
    if len(nodes) != len(nonlin):
        raise RuntimeError("auto_LiRPA graph does not match the parsed chain")
    bounds: dict[int, list] = {i: [[], []] for i in nonlin}
    margins = []
    c_all = _margin_spec(target, chain.num_classes, center.dtype) if chain.num_classes > 1 else None
    for sl in _row_slices(center.shape[0], group, chunk):
        ptb = _perturbation(al, norm, float(eps_rows[sl.start]), (box[0][sl], box[1][sl]))
        args = (al.BoundedTensor(center[sl], ptb),)
        if c_all is not None:
            lb, _ = bm.compute_bounds(x=args, C=c_all[sl], method="CROWN", bound_upper=False)
            margins.append(lb.detach())
        else:
            bm.compute_bounds(x=args, method="CROWN")
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


def _crown_gradient(
    model, chain, center, box, eps_rows, norm, onehot, factor_list, times_input, group, chunk, supplied=None
):
    """CROWN on ``GradNet``: box on d f_y/dx (times x if ``times_input``), shape (rows, *in_shape).

    ``supplied``: (pre-activation bounds per op, upstream-gradient boxes per op, gradient box) that
    are handed to auto_LiRPA as intermediate bounds (sound; skips one CROWN pass per node, leaving
    only the pass for the output).  None: auto_LiRPA computes every intermediate bound by CROWN."""
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
        bm._certattr_nodes = _gradnet_nodes(bm, chain, times_input)
        return bm

    bm = _cached(model, ("grad", tuple(center.shape[1:]), times_input, identity, str(center.device)), build)
    stem_node = _stem_node(bm) if identity else None
    nodes = bm._certattr_nodes if supplied is not None else None
    lows, highs = [], []
    for sl in _row_slices(center.shape[0], group, chunk):
        ptb = _perturbation(al, norm, float(eps_rows[sl.start]), (box[0][sl], box[1][sl]))
        args = [al.BoundedTensor(center[sl], ptb), onehot[sl]]
        for value, (flo, fhi) in factor_list:
            fptb = al.PerturbationLpNorm(norm=np.inf, eps=1.0, x_L=flo[sl], x_U=fhi[sl])
            args.append(al.BoundedTensor(value[sl], fptb))
        inter = {}
        if stem_node is not None:
            # the identity node ranges over the ball ∩ domain: its box is a sound intermediate bound
            inter[stem_node] = (box[0][sl], box[1][sl])
        if nodes is not None:
            inter.update(_intermediate(nodes, chain, supplied, sl))
        lb, ub = bm.compute_bounds(x=tuple(args), method="CROWN", intermediate_layer_bounds=inter or None)
        lows.append(lb.detach().reshape(-1, *chain.in_shape))
        highs.append(ub.detach().reshape(-1, *chain.in_shape))
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


def _stem_node(bm) -> str | None:
    inputs = [n for n in bm._modules.values() if type(n).__name__ == "BoundInput"]
    if not inputs:
        return None
    first = inputs[0]
    for n in bm._modules.values():
        if n.inputs and n.inputs[0] is first and type(n).__name__ in ("BoundConv", "BoundLinear"):
            return n.name
    return None


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
    domain: tuple[float, float] = (0.0, 1.0),
    ig_steps: int = 50,
    chunk_size: int | None = None,
) -> CertifiedResult:
    """Sound bounds on how far the attribution g can move over B_p(x, eps) ∩ [lo, hi]^n.

    model: feed-forward chain (nn.Sequential) of the supported layers, in eval mode; x: (B, ...);
    norm: 2 or "inf"; attribution: saliency | grad_x_input | ig (right Riemann sum, ``ig_steps``,
    baseline 0); target: the logit explained (default argmax f(x)); method: "crown" (CROWN on the
    gradient graph, intersected with intervals) or "ibp" (interval backward pass); both use CROWN
    pre-activation bounds.  ``chunk_size``: samples per auto_LiRPA call (default from the layer sizes).
    """
    t0 = time.perf_counter()
    eps, norm, attribution, method, (lo, hi), steps = _check_args(
        model, x, eps, norm, attribution, method, domain, ig_steps
    )
    x = x.detach()
    chain = parse_chain(model, tuple(x.shape[1:]))
    check_chain(model, chain, x)
    batch = x.shape[0]
    with torch.no_grad():
        logits = model(x)
    if target is None:
        target = logits.argmax(dim=1)
    else:
        target = torch.as_tensor(target, device=x.device).long().reshape(-1)
        if target.numel() == 1 and batch > 1:
            target = target.expand(batch).clone()
        if target.shape[0] != batch:
            raise ValueError(f"target must have one entry per sample ({batch}), got {target.shape[0]}")
        if (target < 0).any() or (target >= chain.num_classes).any():
            raise ValueError(f"target out of range for {chain.num_classes} classes")
    with torch.enable_grad():  # also when called under torch.no_grad()
        g_x = compute_attribution(model, x, target, attribution, steps=steps).detach()
    details: dict = {"notes": list(chain.notes)}

    if eps == 0.0:
        lower, upper = g_x.clone(), g_x.clone()
        others = logits.clone()
        others.scatter_(1, target.view(-1, 1), float("-inf"))
        label_certified = logits.gather(1, target.view(-1, 1)).squeeze(1) > others.max(dim=1).values
    else:
        with torch.no_grad():
            lower, upper, label_certified = _bound_box(
                model, chain, x, target, eps, norm, attribution, method, (lo, hi), steps, chunk_size, details
            )
        # g(x) itself is in the region: absorb float round-off
        lower, upper = torch.minimum(lower, g_x), torch.maximum(upper, g_x)

    dev = torch.maximum(upper - g_x, g_x - lower).flatten(1)
    euclidean = dev.norm(dim=1)
    cosine = _cosine_bound(g_x, lower, upper, euclidean)
    return CertifiedResult(
        kind="certified",
        norm=norm,
        eps=eps,
        attribution=attribution,
        euclidean=euclidean,
        cosine=cosine,
        label_certified=label_certified.bool(),
        target=target,
        time=time.perf_counter() - t0,
        method=method,
        network="real",
        details=details,
        lower=lower,
        upper=upper,
        attribution_at_x=g_x,
    )


def _cosine_bound(
    g: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, euclidean: torch.Tensor
) -> torch.Tensor:
    """max(box bound, tangent bound) on cos(g, g'); 1 where the box is the point g itself."""
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
    cos = torch.maximum(box, tangent_cosine(euclidean, norm_g))
    return torch.where(euclidean == 0, torch.ones_like(cos), cos)


def _region(x: torch.Tensor, eps: float, domain: tuple[float, float]) -> Box:
    return (x - eps).clamp_min(domain[0]), (x + eps).clamp_max(domain[1])


def _bound_box(model, chain, x, target, eps, norm, attribution, method, domain, steps, chunk_size, details):
    batch = x.shape[0]
    box = _region(x, eps, domain)
    if attribution == "ig":
        alphas = torch.arange(1, steps + 1, dtype=x.dtype, device=x.device) / steps
    else:
        alphas = torch.ones(1, dtype=x.dtype, device=x.device)
    reps = alphas.numel()
    view = (-1,) + (1,) * (x.dim() - 1)
    tile = (reps,) + (1,) * (x.dim() - 1)
    # path point s: x' -> alpha_s x' ranges over the scaled region; rows ordered (s, sample)
    ar = alphas.repeat_interleave(batch).view(view)
    center = x.repeat(tile) * ar
    sbox = (box[0].repeat(tile) * ar, box[1].repeat(tile) * ar)
    eps_rows = (eps * ar).flatten()
    tr = target.repeat(reps)
    group = batch if norm == "2" else center.shape[0]
    sizes = _op_sizes(chain)

    # 1. pre-activation bounds: IBP, intersected with CROWN (whose pass also bounds the margins)
    l2 = {"l2_center": center, "l2_eps": eps_rows} if norm == "2" else {}
    ibp = forward_bounds(chain, sbox, **l2)
    bounds = list(ibp)
    fwd_chunk = chunk_size or max(1, int(2e8 / (4 * max(sizes) * 32)))
    try:
        crown, margins = _crown_forward(model, chain, center, sbox, eps_rows, norm, tr, group, fwd_chunk)
        for i, (clo, chi) in crown.items():
            bounds[i] = (torch.maximum(bounds[i][0], clo), torch.minimum(bounds[i][1], chi))
        label_certified = (margins[-batch:] > 0).all(dim=1)
        details["preactivation"] = "crown+ibp"
    except RuntimeError as exc:
        details["preactivation"] = "ibp"
        details["crown_error"] = str(exc)[:500]
        logit_lo, logit_hi = ibp[-1]
        y_lo = logit_lo.gather(1, tr.view(-1, 1))
        others = logit_hi.clone()
        others.scatter_(1, tr.view(-1, 1), float("-inf"))
        label_certified = (y_lo.squeeze(1) > others.max(dim=1).values)[-batch:]
    # the exact values of the user's model at the (scaled) point lie inside
    with torch.no_grad():
        exact = [center] + chain.leaf_values(center)[:-1]
    for i, op in enumerate(chain.ops):
        if isinstance(op, (Act, MaxPool)):
            bounds[i] = (torch.minimum(bounds[i][0], exact[i]), torch.maximum(bounds[i][1], exact[i]))

    # 2. derivative-factor boxes and 3. the gradient box
    factors = factor_boxes(chain, bounds)
    upstream: dict = {}
    glo, ghi = gradient_box(chain, factors, tr, record=upstream)
    details["gradient"] = "interval"
    times_input = attribution == "grad_x_input"
    if method == "crown":
        onehot = torch.zeros(tr.shape[0], chain.num_classes, dtype=x.dtype, device=x.device)
        onehot.scatter_(1, tr.view(-1, 1), 1.0)
        flist = []
        for i, op in enumerate(chain.ops):
            if isinstance(op, Act) and op.name == "relu":
                flist.append(((exact[i] > 0).to(x.dtype), factors[i]))
            elif isinstance(op, MaxPool):
                r = op.routing_at(exact[i])
                shape = (r.shape[0], -1) + tuple(op.out_shape[1:])
                flist.append((r.reshape(shape), (factors[i][0].reshape(shape), factors[i][1].reshape(shape))))
        n = int(np.prod(chain.in_shape))
        biggest = max(sizes)
        # bytes per sample: a few (n, size) coefficient matrices (plus (size, size) ones when
        # auto_LiRPA computes the intermediate bounds itself)
        # (measured: about 24 live float32 copies of the largest (n, size) matrix in BoundMul's relaxation)
        per_sample = 4 * 24 * (n * biggest + (biggest * biggest if _FULL_CROWN else 0))
        grad_chunk = chunk_size or max(1, int(_MEMORY_BUDGET / per_sample))
        supplied = None if _FULL_CROWN else (bounds, upstream, (glo, ghi))
        try:
            clo, chi = _crown_gradient(
                model,
                chain,
                center,
                sbox,
                eps_rows,
                norm,
                onehot,
                flist,
                times_input,
                group,
                grad_chunk,
                supplied,
            )
            details["gradient"] = "crown+interval"
        except (
            NotImplementedError,
            AssertionError,
            RuntimeError,
            IndexError,
            KeyError,
            TypeError,
            ValueError,
        ) as exc:
            # still sound: the interval box alone
            method = "ibp"
            details["crown_gradient_error"] = f"{type(exc).__name__}: {exc}"[:500]
    if times_input:
        ilo, ihi = mul((glo, ghi), box)
        if method == "crown":
            ilo, ihi = torch.maximum(ilo, clo), torch.minimum(ihi, chi)
        return ilo, ihi, label_certified
    if method == "crown":
        glo, ghi = torch.maximum(glo, clo), torch.minimum(ghi, chi)
    if attribution == "saliency":
        return glo, ghi, label_certified
    # IG: average the path-point boxes, times the interval of x' - b (b = 0)
    glo = glo.view(reps, batch, *chain.in_shape).mean(dim=0)
    ghi = ghi.view(reps, batch, *chain.in_shape).mean(dim=0)
    ilo, ihi = mul((glo, ghi), box)
    return ilo, ihi, label_certified
