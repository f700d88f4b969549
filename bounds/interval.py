"""Interval arithmetic for the forward pass and for the input gradient (the "ibp" method).

Linear maps use midpoint-radius form (Rump 1999): for v in [c - r, c + r], W v lies in
[W c - |W| r, W c + |W| r].  Products of intervals take the min / max of the four endpoint products.
Forward bounds (IBP, Gowal et al. 2018) start from the box ball ∩ domain; under l2 the first affine
layer uses the exact range c +- eps ||W_j||_2 as well.  The gradient box follows the backward pass
of ``gradgraph`` with sound boxes on every derivative factor:

    relu' in {0}, {1} or [0, 1];  softplus' = sigmoid(beta z) (monotone);
    sigmoid', tanh': max at the point of [l, u] nearest 0, min at an end point;  max-pool routing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .gradgraph import Act, Affine, Chain, MaxPool, Reshape, maxpool_routing_box, relu_derivative_box

Box = tuple[torch.Tensor, torch.Tensor]


def mul(a: Box, b: Box) -> Box:
    """[a] * [b] elementwise (broadcasting): min and max of the four endpoint products."""
    p = torch.stack(torch.broadcast_tensors(a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]))
    return p.min(dim=0).values, p.max(dim=0).values


def affine_forward(op: Affine, box: Box) -> Box:
    """{W h + b : h in box} in midpoint-radius form."""
    lo, hi = box
    mid, rad = (hi + lo) / 2, (hi - lo) / 2
    w = op.weight
    if op.kind == "linear":
        c = F.linear(mid, w, op.bias)
        r = F.linear(rad, w.abs())
    else:
        c = F.conv2d(mid, w, op.bias, op.stride, op.padding, op.dilation)
        r = F.conv2d(rad, w.abs(), None, op.stride, op.padding, op.dilation)
    return c - r, c + r


def affine_l2(op: Affine, center: torch.Tensor, eps: torch.Tensor) -> Box:
    """Exact range of W h + b over the l2 ball ||h - center|| <= eps (eps: (B,)): c +- eps ||W_j||_2
    (for a convolution: the norm of the kernel entries that fall inside the input at that position)."""
    w = op.weight
    c = op.forward(center)
    if op.kind == "linear":
        norms = w.pow(2).sum(dim=1).sqrt().unsqueeze(0)
    else:
        ones = torch.ones((1,) + tuple(center.shape[1:]), dtype=center.dtype, device=center.device)
        norms = F.conv2d(ones, w.pow(2), None, op.stride, op.padding, op.dilation).clamp_min(0).sqrt()
    r = norms * eps.view((-1,) + (1,) * (c.dim() - 1))
    return c - r, c + r


def activation_forward(op: Act, box: Box) -> Box:
    """Every supported activation is monotone increasing.  Softplus is the smooth one (torch's
    threshold, a jump of log1p(exp(-threshold)) / beta, is an evaluation error in ``floatsafe``;
    threshold 40 in float64 is exact to its precision)."""
    if op.name == "softplus":
        return F.softplus(box[0], op.beta, 40.0), F.softplus(box[1], op.beta, 40.0)
    return op.forward(box[0]), op.forward(box[1])


def forward_bounds(
    chain: Chain, box: Box, *, l2_center: torch.Tensor | None = None, l2_eps: torch.Tensor | None = None
) -> list[Box]:
    """Bounds on the input of every op (``out[i]`` for op i) and on the logits (``out[-1]``).

    ``box``: per-coordinate bounds of the input region (ball ∩ domain); for l2 also the ball itself
    (``l2_center``, ``l2_eps`` of shape (B,)), used exactly at the first affine layer."""
    out: list[Box] = []
    lo, hi = box
    only_reshaped = True
    center = l2_center
    for op in chain.ops:
        out.append((lo, hi))
        if isinstance(op, Affine):
            nlo, nhi = affine_forward(op, (lo, hi))
            if l2_center is not None and only_reshaped:
                blo, bhi = affine_l2(op, center, l2_eps)
                nlo, nhi = torch.maximum(nlo, blo), torch.minimum(nhi, bhi)
            lo, hi = nlo, nhi
            only_reshaped = False
        elif isinstance(op, Act):
            lo, hi = activation_forward(op, (lo, hi))
            only_reshaped = False
        elif isinstance(op, MaxPool):
            lo, hi = op.forward(lo), op.forward(hi)
            only_reshaped = False
        else:
            lo, hi = lo.reshape(lo.shape[0], *op.out_shape), hi.reshape(hi.shape[0], *op.out_shape)
            if center is not None and only_reshaped:
                center = center.reshape(center.shape[0], *op.out_shape)
    out.append((lo, hi))
    return out


def _sigmoid_prime(z: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(z) * torch.sigmoid(-z)


def _tanh_prime(z: torch.Tensor) -> torch.Tensor:
    return 4 * torch.sigmoid(2 * z) * torch.sigmoid(-2 * z)


def derivative_box(op: Act, lower: torch.Tensor, upper: torch.Tensor) -> Box:
    """Sound bounds on a'(z) for z in [lower, upper] (autograd's conventions at the kinks)."""
    if op.name == "relu":
        return relu_derivative_box(lower, upper)
    if op.name == "softplus":
        # the smooth derivative sigmoid(beta z) and, above torch's threshold, its exact 1: both
        lo = torch.sigmoid(op.beta * lower)
        hi = torch.sigmoid(op.beta * upper)
        hi = torch.where(op.beta * upper > op.threshold, torch.ones_like(hi), hi)
        return lo, hi
    prime = _sigmoid_prime if op.name == "sigmoid" else _tanh_prime
    nearest0 = torch.minimum(torch.maximum(torch.zeros_like(lower), lower), upper)
    return torch.minimum(prime(lower), prime(upper)), prime(nearest0)


def factor_boxes(chain: Chain, bounds: list[Box]) -> list[Box | None]:
    """Per op: the box of its derivative factor (activations) or routing weights (max-pooling)."""
    out: list[Box | None] = []
    for i, op in enumerate(chain.ops):
        if isinstance(op, Act):
            out.append(derivative_box(op, *bounds[i]))
        elif isinstance(op, MaxPool):
            out.append(maxpool_routing_box(op, *bounds[i]))
        else:
            out.append(None)
    return out


def gradient_box(
    chain: Chain, factors: list[Box | None], target: torch.Tensor, record: dict | None = None
) -> Box:
    """Interval backward pass from e_y: bounds gL <= d f_y(x') / dx <= gU for every x' of the region
    the factor boxes were computed on.  Returns boxes of shape (B, *in_shape).  If ``record`` is a
    dict, record[i] = the box of the upstream gradient d f_y / d(output of op i) for every activation
    and max-pool op i."""
    b = target.shape[0]
    ref = (
        next(op.weight for op in chain.ops if isinstance(op, Affine))
        if any(isinstance(op, Affine) for op in chain.ops)
        else None
    )
    dtype = ref.dtype if ref is not None else torch.get_default_dtype()
    onehot = torch.zeros(b, chain.num_classes, dtype=dtype, device=target.device)
    onehot.scatter_(1, target.view(-1, 1), 1.0)
    lo, hi = onehot, onehot.clone()
    for i in range(len(chain.ops) - 1, -1, -1):
        op = chain.ops[i]
        if isinstance(op, Affine):
            mid, rad = (hi + lo) / 2, (hi - lo) / 2
            c = op.backward(mid)
            r = op.backward(rad, op.weight.abs())
            lo, hi = c - r, c + r
        elif isinstance(op, Reshape):
            lo, hi = lo.reshape(b, *op.in_shape), hi.reshape(b, *op.in_shape)
        elif isinstance(op, Act):
            if record is not None:
                record[i] = (lo, hi)
            lo, hi = mul(factors[i], (lo, hi))
        else:  # MaxPool: routing weights times the upstream gradient, summed over windows
            if record is not None:
                record[i] = (lo, hi)
            rl, ru = factors[i]
            tl, tu = mul((rl, ru), (lo.unsqueeze(2), hi.unsqueeze(2)))
            lo, hi = op.fold(tl), op.fold(tu)
    return lo, hi
