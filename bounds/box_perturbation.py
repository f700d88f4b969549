"""A box input of auto_LiRPA whose concretisation skips the coordinates of zero width.

The derivative factors of ``gradgraph.GradNet`` (the ReLU steps, the max-pool routing) enter as
inputs ranging over a box [l, u]; most of them are fixed (l = u: a stable ReLU, a sure max-pool
winner).  auto_LiRPA 0.3 concretises a linear bound A v over a box as

    A c + sign |A| r,   c = (u + l) / 2,  r = (u - l) / 2,

three passes over A (the product, the absolute value, the second product).  The second term only
has nonzero summands where r_j > 0, so ``BoxPerturbation`` sums it over those columns j (the union over
the samples of the call) and returns the same value: the terms left out are exactly 0 (|A_ij| * 0;
A is finite).  Only the summation order of the float64 sum may change (covered by the float64
propagation error of ``floatsafe.effective_unit``).  Everything else is auto_LiRPA's
``PerturbationLpNorm`` (norm inf with x_L, x_U).
"""

from __future__ import annotations

import numpy as np
import torch

from .lirpa_compat import import_auto_lirpa

# below this fraction of columns with a nonzero width, gather them; above it, the dense product
MAX_WIDE_FRACTION = 0.5
_CLASS: dict = {}


def box_perturbation(x_l: torch.Tensor, x_u: torch.Tensor):
    """auto_LiRPA perturbation of the box [x_l, x_u] (norm inf), concretised as described above."""
    cls = _CLASS.get("cls")
    if cls is None:
        cls = _CLASS["cls"] = _make_class(import_auto_lirpa())
    return cls(norm=np.inf, eps=1.0, x_L=x_l, x_U=x_u)


def _make_class(al):
    class BoxPerturbation(al.PerturbationLpNorm):
        def concretize_matrix(self, x, A, sign, extra_constr):
            if extra_constr is not None or not isinstance(A, torch.Tensor) or self.norm != np.inf:
                return super().concretize_matrix(x, A, sign, extra_constr)
            A = A.reshape(A.shape[0], A.shape[1], -1)
            x_l, x_u = self.get_input_bounds(x, A)
            x_u = x_u.reshape(x_u.shape[0], -1)
            x_l = x_l.reshape(x_l.shape[0], -1)
            center = (x_u + x_l) / 2.0
            diff = (x_u - x_l) / 2.0
            bound = A.matmul(center.unsqueeze(-1))
            wide = (diff != 0).any(dim=0).nonzero().squeeze(1)
            n = diff.shape[1]
            if wide.numel() == n or wide.numel() > MAX_WIDE_FRACTION * n:
                bound = bound + sign * A.abs().matmul(diff.unsqueeze(-1))
            elif wide.numel() > 0:
                cols = A.index_select(2, wide).abs()
                bound = bound + sign * cols.matmul(diff.index_select(1, wide).unsqueeze(-1))
            return bound.squeeze(-1)

    return BoxPerturbation
