"""CROWN bounds for the upstream-gradient nodes of ``GradNet`` (issue 10 (b); ``crown.FULL_CROWN``).

The interval backward pass (``interval.gradient_box``) records a box for every upstream gradient
v_i = d f_y / d(output of activation i); ``crown.crown_gradient`` hands those boxes to auto_LiRPA as the
intermediate bounds of the products d_i * v_i.  Here some of them are instead bounded by CROWN and
intersected with the interval boxes (both sound bounds on the same exact value, so max(lower) /
min(upper) is one):

* which nodes (``upstream_worth_crown``): not the last activation's (W^T e_y, a constant) nor, where the
  last factor is a free input (ReLU phase / max-pool routing), the one before it (linear in independent
  box variables: the interval image is exact); every earlier node, a product of >= 2 factors;
* which positions (``_unstable_mask``): for a ReLU, only those whose derivative factor has a box of
  nonzero width in some row (a constant factor a makes both McCormick planes of a * v equal a v, so a
  tighter box on v buys nothing there); the others keep the interval box;
* when (``_intersecting``): inside auto_LiRPA's ``compute_intermediate_bounds``, as soon as the node is
  bounded, so every later reader (the products' planes, later nodes' CROWN passes) sees the intersection.

Measured (benchmarks/results/upstream.txt): MNIST cnn-small l_inf 0.02 box 0.86x, Euclidean 0.90x at
1.0-1.2x the time; the 784-100-100-10 MLP has no such node (unchanged).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from .gradgraph import Act, Chain, MaxPool


def upstream_worth_crown(chain: Chain) -> set[int]:
    """Indices of the activations / max-pools whose upstream-gradient node CROWN can bound tighter than
    the interval pass.  The last one's upstream gradient W^T e_y is a constant.  The one before it,
    W^T (d * c) with c constant, is linear in the last derivative factor d; where d is a free input of
    GradNet (ReLU phase, max-pool routing: independent boxes) the interval image of a linear function of
    independent box variables is its exact range, so CROWN cannot narrow it (a smooth activation's
    factor depends on x through the forward part: CROWN can).  Every earlier node is a product of
    two or more factors: kept."""
    nonlin = [i for i, op in enumerate(chain.ops) if isinstance(op, (Act, MaxPool))]
    keep = set(nonlin[:-2])
    if len(nonlin) >= 2:
        last = chain.ops[nonlin[-1]]
        if isinstance(last, Act) and last.name != "relu":
            keep.add(nonlin[-2])
    return keep


def upstream_rows(chain: Chain) -> int:
    """The largest number of positions of an upstream-gradient node ``upstream_worth_crown`` selects
    (the rows of its CROWN pass; a max-pool's node repeats the gradient over the window); 0 if none."""
    sizes = [0]
    for i in upstream_worth_crown(chain):
        op = chain.ops[i]
        shape = getattr(op, "out_shape", None) or getattr(op, "shape", None) or ()
        sizes.append(int(np.prod(shape)) * (op.window if isinstance(op, MaxPool) else 1))
    return max(sizes)


def _node_box(node, op) -> tuple[torch.Tensor, torch.Tensor]:
    """An upstream-gradient node's bounds in the shape of the interval pass's record.  A max-pool's
    node holds the upstream gradient repeated over the window, (B, C*k*k, Ho, Wo): every copy bounds the
    same value, so the tightest copy is kept (max of the lower bounds, min of the upper ones)."""
    lo, hi = node.lower.detach(), node.upper.detach()
    if isinstance(op, MaxPool):
        shape = (lo.shape[0], op.in_shape[0], op.window) + tuple(op.out_shape[1:])
        lo, hi = lo.reshape(shape).amax(dim=2), hi.reshape(shape).amin(dim=2)
    return lo, hi


@contextlib.contextmanager
def _references(bm):
    """Clears ``bm._certattr_ref`` when the call ends (also on an exception)."""
    try:
        yield
    finally:
        bm._certattr_ref = None


def _unstable_mask(chain: Chain, factor_list, i: int, sl: slice) -> torch.Tensor | None:
    """For a ReLU op i: the flat positions where its derivative factor's box has nonzero width in some
    row of the slice (None for other ops: every position is bounded)."""
    op = chain.ops[i]
    if not (isinstance(op, Act) and op.name == "relu"):
        return None
    free = [j for j, o in enumerate(chain.ops) if (isinstance(o, Act) and o.name == "relu") or isinstance(o, MaxPool)]
    flo, fhi = factor_list[free.index(i)][1]
    return (fhi[sl] > flo[sl]).flatten(1).any(dim=0)


# the sparse pass runs when at most this fraction of a node's positions is unstable
SPARSE_FRACTION = 0.9


def _intersecting(bm) -> None:
    """Wrap this module's ``compute_intermediate_bounds`` so that a node named in ``bm._certattr_ref``
    ({name: (lo, hi, mask)}, set per call; None: off) is bounded by CROWN and intersected with (lo, hi)
    the moment it is computed, before any later node reads it.  Both are sound bounds on the same
    exact value, so max(lower) / min(upper) is one (elementwise, no rounding: unlike 0.3's
    ``reference_bounds``, which writes max(ref, l) - l + l); a NaN bound (inf - inf inside auto_LiRPA)
    reads as no information.  auto_LiRPA keeps a node's bounds once set, so every later reader (the
    McCormick planes of the products, the following nodes' CROWN passes) sees the intersection.

    ``mask`` (flat bool over the node's positions, or None = all): only those positions are bounded by
    CROWN (one backward pass with the rows of the identity at them); the others keep (lo, hi).  The
    mask marks where the derivative factor d multiplying this upstream gradient u has a box of nonzero
    width: where d is a constant a, the product's McCormick planes a u + l_u d - a l_u and
    a u + u_u d - a u_u both equal a u, whatever the box of u, so a tighter box there buys nothing."""
    if getattr(bm, "_certattr_wrapped", False):
        return
    original = bm.compute_intermediate_bounds
    bm._certattr_ref = None

    def sparse(node, prior_checked, rlo, rhi, mask):
        if not prior_checked:
            bm.check_prior_bounds(node)
        b = rlo.shape[0]
        lo, hi = rlo.reshape(b, -1).clone(), rhi.reshape(b, -1).clone()
        idx = mask.nonzero().flatten()
        k = idx.numel()
        if k:
            c = torch.zeros(1, k, lo.shape[1], dtype=lo.dtype, device=lo.device)
            c[0, torch.arange(k, device=lo.device), idx] = 1.0
            c = c.expand(b, -1, -1).reshape(b, k, *node.output_shape[1:])
            clo, chi = bm.backward_general(C=c, node=node)
            clo, chi = clo.reshape(b, k), chi.reshape(b, k)
            lo[:, idx] = torch.where(torch.isnan(clo), lo[:, idx], torch.maximum(clo, lo[:, idx]))
            hi[:, idx] = torch.where(torch.isnan(chi), hi[:, idx], torch.minimum(chi, hi[:, idx]))
        node.lower, node.upper = lo.reshape(rlo.shape), hi.reshape(rhi.shape)
        node.interval = (node.lower, node.upper)

    def wrapped(node, prior_checked=False):
        ref = bm._certattr_ref.get(node.name) if bm._certattr_ref else None
        if ref is not None and getattr(node, "lower", None) is None:
            rlo, rhi, mask = ref
            if (mask is not None and node.perturbed and node.from_input and not bm.use_forward
                    and not getattr(bm, "return_A", False) and mask.numel() == rlo[0].numel() and int(mask.sum()) <= SPARSE_FRACTION * mask.numel()):
                return sparse(node, prior_checked, rlo, rhi, mask)
        original(node, prior_checked)
        if ref is None or getattr(node, "lower", None) is None:
            return
        lo, hi = node.lower, node.upper
        rlo, rhi = ref[0].reshape(lo.shape), ref[1].reshape(hi.shape)
        lo = torch.where(torch.isnan(lo), rlo, torch.maximum(lo, rlo))
        hi = torch.where(torch.isnan(hi), rhi, torch.minimum(hi, rhi))
        node.lower, node.upper = lo, hi
        node.interval = (lo, hi)

    bm.compute_intermediate_bounds = wrapped
    bm._certattr_wrapped = True
