"""A ReLU network as a dense ReLU MLP for phase branch-and-bound (``bounds.complete``).

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

Max-pooling of ReLU outputs (conv -> relu -> maxpool, or conv -> maxpool -> relu: ``route_relus``) is
rewritten as ReLU layers whose phases are the routing decisions (``complete_maxpool``: proofs of value,
gradient, margins and gradient float error there); the final combination of each window is a linear
map folded into the next affine op.  Anything else that is not piecewise affine with ReLU phases as the
only discrete factor raises ``checks.PhaseBranchingUnsupported`` (smooth activations, max-pooling of
possibly negative values or before any affine layer, a network without hidden ReLU, dense matrices over
``max_memory_mb``).  Memory: the dense matrices of certattr's cnn-small (MNIST) are 3136 x 784 and
1568 x 3136 float64 (20 MB + 39 MB); ``dense_piece`` builds them in column blocks.  LeNet-style MNIST nets
with max-pool need several GB (refused; "auto" then uses input branching).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .checks import PhaseBranchingUnsupported
from .complete_maxpool import PooledMLP, build_routing, order_tree, pool_tree, tree_piece
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


def route_relus(ops: list) -> list:
    """The chain's ops with every max-pool on values >= 0 (``complete_maxpool``'s rewrite needs it):

    * conv -> relu -> maxpool: as is (the pool's inputs are relu outputs, >= 0);
    * conv -> maxpool (-> maxpool / reshapes) -> relu: the relu is moved before the pools.  Exact in value
      AND gradient, in floats: relu and max are exact, relu(max_w z) = max_w relu(z); autograd on
      relu(maxpool(z)) routes v to the first maximum j* of z and multiplies by [z_j* > 0], on
      maxpool(relu(z)) it routes v to the first maximum of relu(z) and multiplies by [z_j > 0] there: if
      max z > 0 both first maxima are j* (the positive entries keep their order, the others map to 0) and
      both factors are 1; if max z <= 0 both factors are 0 (relu(z) is all 0, its first entry has z <= 0);
      the backward adds the same float contributions per entry (overlapping windows) in both;
    * a relu directly after such a pool (its input is a max of values >= 0) is dropped: relu(m) = m, and
      relu'(m) = 0 only when m = 0, where every entry of the window is 0, i.e. its own relu' is 0: the
      gradient is 0 either way.
    Refused by name (``PhaseBranchingUnsupported``): max-pooling before any affine layer, or of values
    that may be negative (no relu directly before it nor directly after it)."""
    out: list = []
    nonneg = after_pool = seen_affine = False
    i = 0
    while i < len(ops):
        op = ops[i]
        if isinstance(op, MaxPool):
            if not seen_affine:
                raise PhaseBranchingUnsupported(
                    "complete_bound's phase branching does not support max-pooling before any affine layer "
                    "(its inputs may be negative): use branching='input' or certified_bound"
                )
            if not nonneg:
                j = i
                while j < len(ops) and isinstance(ops[j], (MaxPool, Reshape)):
                    j += 1
                if not (j < len(ops) and isinstance(ops[j], Act) and ops[j].name == "relu"):
                    raise PhaseBranchingUnsupported(
                        "complete_bound's phase branching supports max-pooling of ReLU outputs only (conv -> "
                        "relu -> maxpool, or conv -> maxpool -> relu); this max-pooling may see negative "
                        "values: use branching='input' or certified_bound"
                    )
                out.append(ops[j])
                out.extend(ops[i:j])
                i, nonneg, after_pool = j + 1, True, True
                continue
            after_pool = True
        elif isinstance(op, Act) and op.name == "relu" and after_pool:
            i += 1  # relu of a max of values >= 0: the identity in value and gradient (docstring)
            continue
        elif isinstance(op, Affine):
            seen_affine, nonneg, after_pool = True, False, False
        elif isinstance(op, Act):
            nonneg, after_pool = op.name == "relu", False
        out.append(op)
        i += 1
    return out


def _shape_of(spec) -> tuple[int, int]:
    kind, obj = spec
    if kind == "affine":
        return int(math.prod(obj.out_shape)), int(math.prod(obj.in_shape))
    return obj[0], obj[1]  # ("virtual", (n_rows, n_cols, rows, cols, vals))


def relu_mlp_from_chain(chain: Chain, dtype: torch.dtype, max_memory_mb: float | None = None) -> ReluMLP:
    """(Affine+ ReLU)+ Affine+ with reshapes anywhere, max-pools of ReLU outputs rewritten as ReLU trees
    (``complete_maxpool``) -> ``ReluMLP`` (dense, float64; a ``PooledMLP`` with its ``Routing`` when the
    network has max-pooling).

    Raises ``PhaseBranchingUnsupported`` for smooth activations, max-pooling that is not of ReLU outputs
    (``route_relus``), no hidden ReLU, or dense float64 matrices (pieces and their layer products) larger
    than ``max_memory_mb`` (None: no cap)."""
    layers: list[list] = [[]]
    widths: list[int] = []
    members: list | None = None  # per position of the current vector: its real ReLU units (pool input)
    records: list = []
    orders: list = []  # order checks of the pools applied directly to a real ReLU layer
    pooled = real_input = False
    for op in route_relus(list(chain.ops)):
        if isinstance(op, Reshape):
            continue
        if isinstance(op, Affine):
            layers[-1].append(("affine", op))
            members = None
        elif isinstance(op, Act) and op.name == "relu":
            if not layers[-1]:
                raise PhaseBranchingUnsupported(
                    "phase branching needs an affine layer (Linear / Conv2d) before every ReLU"
                )
            width = _shape_of(layers[-1][-1])[0]
            off = sum(widths)
            widths.append(width)
            members = [[off + j] for j in range(width)]
            real_input = True
            layers.append([])
        elif isinstance(op, Act):
            raise PhaseBranchingUnsupported(
                f"complete_bound's phase branching works on ReLU networks; found {op.name} (smooth "
                "activations have no finite set of phases: use branching='input' or certified_bound)"
            )
        elif isinstance(op, MaxPool):
            if members is None:  # pragma: no cover - route_relus guarantees a relu before every pool
                raise PhaseBranchingUnsupported("max-pooling of values that may be negative")
            pooled = True
            tree = pool_tree(op)
            n_prev, level_offsets = tree.n_in, []
            for lvl, (rows, cols, vals, n_units) in enumerate(tree.levels):
                layers[-1].append(("virtual", (n_units, n_prev, rows, cols, vals)))
                off = sum(widths)
                level_offsets.append(off)
                widths.append(n_units)
                layers.append([])
                for u, mem in tree.passes[lvl]:
                    records.append((off + u, _union(members, mem)))
                for u, left, right in tree.diffs[lvl]:
                    records.append((off + u, _union(members, left), _union(members, right)))
                n_prev = n_units
            layers[-1].append(("virtual", (tree.n_out, n_prev, *tree.final)))
            if real_input:
                orders.append(order_tree(tree, members, level_offsets))
            members = [_union(members, m) for m in tree.out_members]
            real_input = False
        else:  # pragma: no cover - parse_chain produces nothing else
            raise PhaseBranchingUnsupported(f"unsupported op {type(op).__name__}")
    if len(layers) < 2 or not layers[-1]:
        raise PhaseBranchingUnsupported(
            "complete_bound's phase branching needs a ReLU network with at least one hidden ReLU layer "
            "ending in an affine layer (Linear, Conv2d)"
        )
    need = _dense_bytes(layers)
    if max_memory_mb is not None and need > max_memory_mb * 2**20:
        raise PhaseBranchingUnsupported(
            f"complete_bound's phase branching needs the network as dense float64 matrices: about "
            f"{need / 2**20:.0f} MB here, over max_memory_mb={max_memory_mb:g} (max-pool trees and "
            "convolutions grow with the image): use branching='input' or certified_bound, or raise "
            "max_memory_mb"
        )
    pieces = [[_materialise(sp) for sp in layer] for layer in layers]
    ws, bs = [], []
    for layer in pieces:
        w, b = layer[0].weight, layer[0].bias
        for p in layer[1:]:
            w, b = p.weight @ w, p.weight @ b + p.bias
        ws.append(w)
        bs.append(b)
    offsets = [int(v) for v in np.cumsum([0] + widths[:-1])]
    u = float(torch.finfo(dtype).eps) / 2
    if not pooled:
        return ReluMLP(ws, bs, widths, offsets, u, pieces=pieces)
    routing = build_routing(records, sum(widths), orders)
    return PooledMLP(ws, bs, widths, offsets, u, pieces=pieces, routing=routing)


def _union(members: list, positions: list[int]) -> list[int]:
    return sorted({g for j in positions for g in members[j]})


def _dense_bytes(layers: list) -> int:
    """float64 bytes of every dense piece and of the layer products (``relu_mlp_from_chain``)."""
    total = 0
    for layer in layers:
        shapes = [_shape_of(sp) for sp in layer]
        total += sum(8 * o * i for o, i in shapes)
        total += sum(8 * o * shapes[0][1] for o, _ in shapes[1:])
    return total


def _materialise(spec) -> Piece:
    kind, obj = spec
    if kind == "affine":
        return dense_piece(obj)
    n_rows, n_cols, rows, cols, vals = obj
    return tree_piece(rows, cols, vals, n_rows, n_cols)
