"""A ReLU network without max-pooling as a dense ReLU MLP for phase branch-and-bound (``bounds.complete``).

Every affine op of the parsed chain (``gradgraph.parse_chain``: Linear, Conv2d, AvgPool2d as a
convolution, BatchNorm folded) is a linear map of the flattened (row-major C, H, W) activation vector,
so it *is* a matrix: ``dense_piece`` materialises it exactly in float64 by applying the convolution to
the unit vectors (each output entry of conv2d(e_j) is a single weight times 1: no rounding).  Flatten
is the identity on that vector.  Consecutive affine ops without a ReLU between them (AvgPool after a
ReLU then a Conv, a trailing BatchNorm, ...) form one hidden "layer" whose weight is the product of
their matrices (float64; its rounding, about fan-in * 2^-53 relative to |W_2| |W_1|, is far below the
1e-6 relative slack of the margins, which are computed per piece on |W_p|).

Float error (``complete_mlp.margins`` / ``gradient_float_error``) is counted per *piece* (each op torch
evaluates separately), with the op's true number of summed terms: torch's conv2d output entry is an
inner product of C_in/groups * kh * kw products plus the bias (``fan_in`` = weight[0].numel() of the
group-densified weight, an over-estimate for grouped convolutions), and its input gradient (a
transposed convolution) sums C_out * kh * kw products per entry (``fan_out``).  Higham's bound holds for
any summation order, so every im2col / GEMM / direct blocking torch may pick is covered; the dense
matrix's zero entries contribute exact zeros (x + 0 = x) and do not enter the count.  Bias
magnitudes: ``Affine.bias_magnitude`` (|parts| of a folded BatchNorm before they cancel).

Anything that is not piecewise affine with ReLU phases as the only discrete factor raises
``checks.PhaseBranchingUnsupported`` (smooth activations, max-pooling, a network without hidden ReLU).
Memory: the dense matrices of certattr's cnn-small (MNIST) are 3136 x 784 and 1568 x 3136 float64
(20 MB + 39 MB); ``dense_piece`` builds them in column blocks.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .checks import PhaseBranchingUnsupported
from .complete_mlp import DT, Piece, ReluMLP
from .gradgraph import Act, Affine, Chain, MaxPool, Reshape

_BLOCK = 512  # unit vectors per conv2d call when densifying


def dense_piece(op: Affine) -> Piece:
    """The affine op as a dense float64 ``Piece`` (weight (out, in) on the flattened vectors)."""
    n_in = int(math.prod(op.in_shape))
    n_out = int(math.prod(op.out_shape))
    w64 = op.weight.detach().to(DT).cpu()
    if op.kind == "linear":
        dense = w64.clone()
        fan_out = int(w64.shape[0])
        spatial = 1
    else:
        dense = torch.empty(n_out, n_in, dtype=DT)
        for start in range(0, n_in, _BLOCK):
            m = min(_BLOCK, n_in - start)
            eye = torch.zeros(m, n_in, dtype=DT)
            eye[torch.arange(m), start + torch.arange(m)] = 1.0
            out = F.conv2d(eye.view(m, *op.in_shape), w64, None, op.stride, op.padding, op.dilation)
            dense[:, start : start + m] = out.reshape(m, n_out).t()
        fan_out = int(w64.shape[0] * w64.shape[2] * w64.shape[3])
        spatial = int(op.out_shape[1] * op.out_shape[2])
    if op.bias is not None:
        bias = op.bias.detach().to(DT).cpu().repeat_interleave(spatial)
    else:
        bias = torch.zeros(n_out, dtype=DT)
    if op.bias_magnitude is not None:
        bmag = op.bias_magnitude.detach().to(DT).cpu().repeat_interleave(spatial)
    else:
        bmag = bias.abs()
    return Piece(dense, bias, bmag, int(op.weight[0].numel()), fan_out)


def relu_mlp_from_chain(chain: Chain, dtype: torch.dtype) -> ReluMLP:
    """(Affine+ ReLU)+ Affine+ with reshapes anywhere -> ``ReluMLP`` (dense, float64).

    Raises ``PhaseBranchingUnsupported`` for smooth activations, max-pooling, or no hidden ReLU."""
    layers: list[list[Piece]] = [[]]
    for op in chain.ops:
        if isinstance(op, Reshape):
            continue
        if isinstance(op, Affine):
            layers[-1].append(dense_piece(op))
        elif isinstance(op, Act) and op.name == "relu":
            if not layers[-1]:
                raise PhaseBranchingUnsupported(
                    "phase branching needs an affine layer (Linear / Conv2d) before every ReLU"
                )
            layers.append([])
        elif isinstance(op, Act):
            raise PhaseBranchingUnsupported(
                f"complete_bound's phase branching works on ReLU networks; found {op.name} (smooth "
                "activations have no finite set of phases: use branching='input' or certified_bound)"
            )
        elif isinstance(op, MaxPool):
            raise PhaseBranchingUnsupported(
                "complete_bound's phase branching does not support max-pooling (its routing is a "
                "further discrete factor): use branching='input' or certified_bound"
            )
        else:  # pragma: no cover - parse_chain produces nothing else
            raise PhaseBranchingUnsupported(f"unsupported op {type(op).__name__}")
    if len(layers) < 2 or not layers[-1]:
        raise PhaseBranchingUnsupported(
            "complete_bound's phase branching needs a ReLU network with at least one hidden ReLU layer "
            "ending in an affine layer (Linear, Conv2d)"
        )
    ws, bs = [], []
    for pieces in layers:
        w, b = pieces[0].weight, pieces[0].bias
        for p in pieces[1:]:
            w, b = p.weight @ w, p.weight @ b + p.bias
        ws.append(w)
        bs.append(b)
    widths = [int(w.shape[0]) for w in ws[:-1]]
    offsets = [int(v) for v in np.cumsum([0] + widths[:-1])]
    return ReluMLP(ws, bs, widths, offsets, float(torch.finfo(dtype).eps) / 2, pieces=layers)
