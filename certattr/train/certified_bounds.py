"""Interval and CROWN-IBP bounds for certified training, written on the model's own layers so that
they are differentiable in the parameters (``bounds`` parses a detached chain; this module does not).

For h in [c - r, c + r] (midpoint-radius form, Rump 1999) W h + b lies in [W c + b - |W| r, W c + b + |W| r];
monotone activations (ReLU, Softplus, AvgPool2d, MaxPool2d) map end points; under l2 the first affine layer
also uses the exact range W x + b +- eps ||W_j||_2 (IBP, Gowal et al. 2018).  The gradient box follows the
backward pass v_K = e_y, v <- W^T v, conv_transpose(v, W), a'(z) * v (interval product with the
derivative box: relu' in {0}, {1} or [0, 1], softplus' in [sigmoid(beta l), sigmoid(beta u)]), max-pool
routing box times v (``bounds.gradgraph.maxpool_routing_box``: autograd's first-maximum rule).  Margins:
IBP with the last layer elided into the specification e_y - e_j (Gowal et al. 2018) and CROWN-IBP (Zhang et
al. 2020: IBP intermediate boxes, one CROWN backward pass with the adaptive ReLU relaxation; softplus:
tangent at the midpoint below, chord above).  See :mod:`certattr.train.certified` for the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CertattrError

Box = tuple[torch.Tensor, torch.Tensor]

_SUPPORTED = ("Linear, Conv2d, ReLU, Softplus, Flatten, AvgPool2d, MaxPool2d, Identity, Dropout(p=0)")

# ----------------------------------------------------------------------------------------------
# layers
# ----------------------------------------------------------------------------------------------
@dataclass
class Layer:
    """One leaf layer with its per-sample input and output shapes."""

    kind: str  # linear | conv | flatten | relu | softplus | avgpool | maxpool
    module: nn.Module
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    pool: object = None  # bounds.gradgraph.MaxPool for max-pooling


def _leaves(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, nn.Sequential) or len(list(model.children())) > 0:
        out: list[nn.Module] = []
        for child in model.children():
            out.extend(_leaves(child))
        return out
    return [model]


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def parse_layers(model: nn.Module, in_shape: tuple[int, ...]) -> list[Layer]:
    """The model as a list of supported layers; CertattrError (a ValueError) naming the first
    unsupported one.  The model must be a feed-forward chain (nn.Sequential, possibly nested)."""
    leaves = _leaves(model)
    if not leaves:
        raise CertattrError("model has no layers")
    layers: list[Layer] = []
    shape = tuple(int(s) for s in in_shape)
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    for j, m in enumerate(leaves):
        name = f"layer {j} ({type(m).__name__})"
        if isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and m.p == 0):
            continue
        if isinstance(m, nn.Linear):
            kind = "linear"
        elif isinstance(m, nn.Conv2d):
            if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise CertattrError(f"certified training: {name} with groups={m.groups}, "
                                    f"padding={m.padding!r}, padding_mode={m.padding_mode!r} is not supported "
                                    "(only groups 1 and numeric zero padding)")
            kind = "conv"
        elif isinstance(m, nn.Flatten):
            kind = "flatten"
        elif isinstance(m, nn.ReLU):
            kind = "relu"
        elif isinstance(m, nn.Softplus):
            kind = "softplus"
        elif isinstance(m, nn.AvgPool2d):
            if m.ceil_mode or not m.count_include_pad or m.divisor_override is not None:
                raise CertattrError(f"certified training: {name} with ceil_mode / count_include_pad=False / "
                                    "divisor_override is not supported")
            kind = "avgpool"
        elif isinstance(m, nn.MaxPool2d):
            if m.ceil_mode or m.return_indices:
                raise CertattrError(f"certified training: {name} with ceil_mode or return_indices is not supported")
            kind = "maxpool"
        else:
            extra = (" (BatchNorm uses batch statistics in training mode, so the bound would certify "
                     "another function than the checkpoint)") if "BatchNorm" in type(m).__name__ else ""
            raise CertattrError(f"certified training does not support {name}{extra}; supported: {_SUPPORTED}")
        with torch.no_grad():
            out = m(torch.zeros((1,) + shape, device=dev, dtype=dtype))
        out_shape = tuple(out.shape[1:])
        pool = None
        if kind == "maxpool":
            from bounds.gradgraph import MaxPool

            pool = MaxPool(_pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding),
                           _pair(m.dilation), shape, out_shape)
        layers.append(Layer(kind, m, shape, out_shape, pool))
        shape = out_shape
    if len(shape) != 1:
        raise CertattrError(f"the model's output must be (B, classes), got per-sample shape {shape}")
    return layers


# ----------------------------------------------------------------------------------------------
# interval arithmetic
# ----------------------------------------------------------------------------------------------
def mul(a: Box, b: Box) -> Box:
    """[a] * [b] elementwise: min and max of the four end-point products."""
    p = torch.stack(torch.broadcast_tensors(a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]))
    return p.min(dim=0).values, p.max(dim=0).values


def _softplus_prime(m: nn.Softplus, z: torch.Tensor) -> torch.Tensor:
    """softplus'(z) = sigmoid(beta z), exactly 1 where torch's softplus is linear (beta z > threshold)."""
    s = torch.sigmoid(m.beta * z)
    return torch.where(m.beta * z > m.threshold, torch.ones_like(s), s)


def _conv_t(layer: Layer, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Adjoint of the convolution (no bias): (B', C_out, Ho, Wo) -> (B', C_in, H, W)."""
    m = layer.module
    stride, pad, dil = _pair(m.stride), _pair(m.padding), _pair(m.dilation)
    k = weight.shape[2:]
    outpad = tuple(layer.in_shape[1 + d] - ((layer.out_shape[1 + d] - 1) * stride[d] - 2 * pad[d]
                                             + dil[d] * (k[d] - 1) + 1) for d in range(2))
    return F.conv_transpose2d(v, weight, None, stride, pad, outpad, 1, dil)


def _avg_kernel(layer: Layer, ref: torch.Tensor) -> torch.Tensor:
    kh, kw = _pair(layer.module.kernel_size)
    c = layer.in_shape[0]
    return torch.full((c, 1, kh, kw), 1.0 / (kh * kw), dtype=ref.dtype, device=ref.device)


def _avg_adjoint(layer: Layer, v: torch.Tensor) -> torch.Tensor:
    m = layer.module
    stride, pad = _pair(m.stride or m.kernel_size), _pair(m.padding)
    w = _avg_kernel(layer, v)
    k = w.shape[2:]
    outpad = tuple(layer.in_shape[1 + d] - ((layer.out_shape[1 + d] - 1) * stride[d] - 2 * pad[d] + k[d])
                   for d in range(2))
    return F.conv_transpose2d(v, w, None, stride, pad, outpad, groups=layer.in_shape[0])


def _l2_first_affine(layer: Layer, x: torch.Tensor, eps: float) -> Box:
    """Exact range of the first affine layer over the l2 ball: W x + b +- eps ||W_j||_2 (for a
    convolution: the norm of the kernel entries that fall inside the input at that position)."""
    m = layer.module
    c = m(x)
    if layer.kind == "linear":
        norms = m.weight.pow(2).sum(dim=1).clamp_min(1e-30).sqrt()
    else:
        ones = torch.ones((1,) + layer.in_shape, dtype=x.dtype, device=x.device)
        norms = F.conv2d(ones, m.weight.pow(2), None, m.stride, m.padding, m.dilation).clamp_min(1e-30).sqrt()
    return c - eps * norms, c + eps * norms


@dataclass
class Forward:
    """Clean values and interval bounds of every layer's input (``values[i]``, ``boxes[i]``; index
    len(layers) is the output)."""

    values: list[torch.Tensor]
    boxes: list[Box]


def forward_bounds(layers: list[Layer], x: torch.Tensor, eps: float, norm: str,
                   domain: tuple[float, float]) -> Forward:
    """Clean forward pass and IBP bounds over B_p(x, eps) ∩ [lo, hi]^n (differentiable in the weights)."""
    lo, hi = (x - eps).clamp_min(domain[0]), (x + eps).clamp_max(domain[1])
    h = x
    values, boxes = [], []
    first_affine = True
    for layer in layers:
        values.append(h)
        boxes.append((lo, hi))
        m = layer.module
        if layer.kind in ("linear", "conv"):
            mid, rad = (hi + lo) / 2, (hi - lo) / 2
            c = m(mid)
            r = F.linear(rad, m.weight.abs()) if layer.kind == "linear" else F.conv2d(
                rad, m.weight.abs(), None, m.stride, m.padding, m.dilation)
            nlo, nhi = c - r, c + r
            if norm == "2" and first_affine:
                blo, bhi = _l2_first_affine(layer, x, eps)
                nlo, nhi = torch.maximum(nlo, blo), torch.minimum(nhi, bhi)
            first_affine = False
            lo, hi = nlo, nhi
        elif layer.kind == "flatten":
            if norm == "2" and first_affine:
                x = m(x)
            lo, hi = m(lo), m(hi)
        else:  # monotone: relu, softplus, avgpool (positive weights), maxpool
            lo, hi = m(lo), m(hi)
            first_affine = False
        h = m(h)
        # the clean point lies in its box (absorbs round-off of the mid-radius form)
        lo, hi = torch.minimum(lo, h), torch.maximum(hi, h)
    values.append(h)
    boxes.append((lo, hi))
    return Forward(values, boxes)


def gradient_bounds(layers: list[Layer], fwd: Forward, target: torch.Tensor) -> tuple[torch.Tensor, Box]:
    """g(x) = d f_y / dx at the clean point and an interval box gL <= g(x') <= gU over the region of
    ``fwd`` (interval backward pass from e_y), both of shape (B, *in_shape)."""
    logits = fwd.values[-1]
    onehot = torch.zeros_like(logits).scatter_(1, target.view(-1, 1), 1.0)
    g, lo, hi = onehot, onehot, onehot
    for i in range(len(layers) - 1, -1, -1):
        layer, m = layers[i], layers[i].module
        b = g.shape[0]
        if layer.kind == "linear":
            mid, rad = (hi + lo) / 2, (hi - lo) / 2
            c, r = mid @ m.weight, rad @ m.weight.abs()
            lo, hi, g = c - r, c + r, g @ m.weight
        elif layer.kind == "conv":
            mid, rad = (hi + lo) / 2, (hi - lo) / 2
            c, r = _conv_t(layer, mid, m.weight), _conv_t(layer, rad, m.weight.abs())
            lo, hi, g = c - r, c + r, _conv_t(layer, g, m.weight)
        elif layer.kind == "flatten":
            lo, hi, g = (t.reshape(b, *layer.in_shape) for t in (lo, hi, g))
        elif layer.kind == "avgpool":  # positive linear map: order preserved
            lo, hi, g = _avg_adjoint(layer, lo), _avg_adjoint(layer, hi), _avg_adjoint(layer, g)
        elif layer.kind in ("relu", "softplus"):
            zl, zu = fwd.boxes[i]
            z = fwd.values[i]
            if layer.kind == "relu":  # autograd's relu'(0) = 0
                dl, du, d = (zl > 0).to(z.dtype), (zu > 0).to(z.dtype), (z > 0).to(z.dtype)
            else:
                dl, du, d = _softplus_prime(m, zl), _softplus_prime(m, zu), _softplus_prime(m, z)
            lo, hi = mul((dl, du), (lo, hi))
            g = d * g
        else:  # maxpool: routing box (first maximum, as autograd) times the upstream interval
            from bounds.gradgraph import maxpool_routing_box

            pool = layer.pool
            rl, ru = maxpool_routing_box(pool, *fwd.boxes[i])
            tl, tu = mul((rl, ru), (lo.unsqueeze(2), hi.unsqueeze(2)))
            lo, hi = pool.fold(tl), pool.fold(tu)
            g = pool.fold(pool.routing_at(fwd.values[i]) * g.unsqueeze(2))
    lo, hi = torch.minimum(lo, g), torch.maximum(hi, g)
    return g, (lo, hi)


# ----------------------------------------------------------------------------------------------
# margins: IBP (last layer elided) and CROWN-IBP
# ----------------------------------------------------------------------------------------------
def _spec(target: torch.Tensor, classes: int, dtype) -> torch.Tensor:
    """C (B, K, K): row j = e_y - e_j (row y is zero)."""
    eye = torch.eye(classes, dtype=dtype, device=target.device)
    return eye[target].unsqueeze(1) - eye.unsqueeze(0)


def _concretize_box(a: torch.Tensor, box: Box) -> torch.Tensor:
    """min over h in box of <a_s, h>: a (B, S, *shape), box (B, *shape) -> (B, S)."""
    mid, rad = (box[1] + box[0]) / 2, (box[1] - box[0]) / 2
    af = a.flatten(2)
    return (af * mid.flatten(1).unsqueeze(1)).sum(-1) - (af.abs() * rad.flatten(1).unsqueeze(1)).sum(-1)


def _affine_back(layer: Layer, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a^T (W h + b) = (W^T a)^T h + a^T b: returns (W^T a, a^T b) for a (B, S, *out_shape)."""
    m = layer.module
    b, s = a.shape[:2]
    if layer.kind == "linear":
        const = a @ m.bias if m.bias is not None else a.new_zeros(b, s)
        return a @ m.weight, const
    const = (a.sum(dim=(3, 4)) * m.bias).sum(-1) if m.bias is not None else a.new_zeros(b, s)
    back = _conv_t(layer, a.reshape(b * s, *layer.out_shape), m.weight)
    return back.reshape(b, s, *layer.in_shape), const


def ibp_margin(layers: list[Layer], fwd: Forward, target: torch.Tensor) -> torch.Tensor:
    """Lower bounds (B, K) on f_y - f_j over the region, the last affine layer elided into the
    specification (Gowal et al. 2018): min over h in the penultimate box of (w_y - w_j) h + b_y - b_j."""
    classes = fwd.values[-1].shape[1]
    c = _spec(target, classes, fwd.values[-1].dtype)
    last = layers[-1]
    if last.kind in ("linear", "conv"):
        a, const = _affine_back(last, c)
        return const + _concretize_box(a, fwd.boxes[-2])
    return _concretize_box(c, fwd.boxes[-1])


def _relax(layer: Layer, box: Box) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear relaxation  sl z + bl <= a(z) <= su z + bu  on [l, u] (CROWN, Zhang et al. 2018).
    ReLU: upper chord, lower slope 1 if u > -l else 0 (adaptive); softplus (convex): lower tangent at
    the midpoint, upper chord."""
    l, u = box
    width = (u - l).clamp_min(1e-12)
    if layer.kind == "relu":
        active, dead = l >= 0, u <= 0
        unstable = ~(active | dead)
        su = torch.where(active, torch.ones_like(l), torch.where(unstable, u / width, torch.zeros_like(l)))
        bu = torch.where(unstable, -l * u / width, torch.zeros_like(l))
        sl = torch.where(active, torch.ones_like(l), torch.where(unstable, (u > -l).to(l.dtype), torch.zeros_like(l)))
        return sl, torch.zeros_like(l), su, bu
    m = layer.module
    mid = (l + u) / 2
    sl = _softplus_prime(m, mid)
    bl = m(mid) - sl * mid
    fl, fu = m(l), m(u)
    narrow = (u - l) < 1e-6
    su = torch.where(narrow, sl, (fu - fl) / width)
    bu = torch.where(narrow, torch.maximum(fl, fu) - su * u + 1e-6, fl - su * l)
    return sl, bl, su, bu


def crown_ibp_margin(layers: list[Layer], fwd: Forward, target: torch.Tensor, x: torch.Tensor,
                     eps: float, norm: str) -> torch.Tensor:
    """CROWN-IBP lower bounds (B, K) on f_y - f_j (Zhang et al. 2020): IBP boxes for every
    intermediate layer, one CROWN backward pass from the margin specification.  Below a max-pool the
    pass stops and concretizes on that layer's IBP box (still a valid bound)."""
    classes = fwd.values[-1].shape[1]
    a = _spec(target, classes, x.dtype)
    const = a.new_zeros(a.shape[:2])
    b = a.shape[0]
    for i in range(len(layers) - 1, -1, -1):
        layer = layers[i]
        if layer.kind in ("linear", "conv"):
            a, c = _affine_back(layer, a)
            const = const + c
        elif layer.kind == "flatten":
            a = a.reshape(b, a.shape[1], *layer.in_shape)
        elif layer.kind == "avgpool":
            s = a.shape[1]
            a = _avg_adjoint(layer, a.reshape(b * s, *layer.out_shape)).reshape(b, s, *layer.in_shape)
        elif layer.kind in ("relu", "softplus"):
            sl, bl, su, bu = _relax(layer, fwd.boxes[i])
            pos, neg = a.clamp_min(0), a.clamp_max(0)
            const = const + (pos * bl.unsqueeze(1) + neg * bu.unsqueeze(1)).flatten(2).sum(-1)
            a = pos * sl.unsqueeze(1) + neg * su.unsqueeze(1)
        else:  # maxpool: concretize on the box of its output
            return const + _concretize_box(a, fwd.boxes[i + 1])
    box_bound = _concretize_box(a, fwd.boxes[0])
    if norm == "2":
        af = a.flatten(2)
        ball = (af * x.flatten(1).unsqueeze(1)).sum(-1) - eps * af.norm(dim=-1)
        box_bound = torch.maximum(box_bound, ball)
    return const + box_bound


def robust_ce(margin: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CE(-m, y): the cross-entropy of the worst-case logits implied by the margin bounds (m_y = 0)."""
    return F.cross_entropy(-margin, target)
