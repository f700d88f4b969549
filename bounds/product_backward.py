"""CROWN's backward step through a product a * b of two perturbed tensors (``lirpa_compat.BoundProduct``).

a is a derivative factor in the box [l_a, u_a], b the upstream gradient in [l_b, u_b] (same shape).
A coefficient matrix A (rows S, batch B, entries n) of a * b becomes coefficients of a and of b and a
bias, by a valid lower plane P and a valid upper plane Q per entry (lower side: P where A >= 0, Q
where A < 0; upper side the other way round):

    A (ab) >= A (P_a a + P_b b + P_c) + min(A, 0) ((Q - P)_a a + (Q - P)_b b + (Q - P)_c)   (lower side)

The planes are the McCormick planes and their convex combinations (see ``BoundProduct``).  Two
exact shortcuts:

* **Point factors.**  Where l_a = u_a (a stable ReLU's derivative, a sure max-pool winner) the factor
  is the constant l_a on the whole region, so a b = l_a b exactly: both planes are (0, l_a, 0), the
  coefficient of a and the bias vanish and the coefficient of b is A l_a.  (The mixed McCormick
  planes are also valid there, but leave a coefficient c on a and a bias -c l_a that cancel only in
  exact arithmetic: the shortcut is the same bound, with fewer rounding errors.)
* **Column gathering.**  The entries j whose factor is a point in every sample of the call ("point
  columns") need only A_j l_a,j; the planes are built and applied on the remaining ("wide") columns
  only, gathered, and written back.  On cnn-small 2-16% of the columns are wide.

Float rounding.  The coefficients are computed in float64 in at most three roundings per entry
(A P_a, min(A, 0) (Q - P)_a, their sum via ``addcmul_``), the bias as float64 sums: the float64
propagation error that ``floatsafe.effective_unit`` covers (depth x 2^-53 relative), as before.
"""

from __future__ import annotations

import torch

# gather the wide columns when they are at most this fraction of all columns; else dense ops
MAX_WIDE_FRACTION = 0.5

Planes = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def mccormick_planes(
    xl: torch.Tensor, xu: torch.Tensor, yl: torch.Tensor, yu: torch.Tensor,
    mix: tuple[torch.Tensor, torch.Tensor] | None, use_mix: bool,
) -> tuple[Planes, Planes]:
    """(lower, upper) planes (coefficient on a, on b, constant) of a b on [xl, xu] x [yl, yu]:
    L1 / U1 (``use_mix`` False) or lam L1 + (1 - lam) L2 / mu U1 + (1 - mu) U2 with (lam, mu) = ``mix``
    (None: the default weights ``default_mix``); point factors (xl = xu) get the exact (0, xl, 0)."""
    lower: Planes = (yl, xl, -xl * yl)  # L1
    upper: Planes = (yu, xl, -xl * yu)  # U1
    if use_mix:
        lam, mu = default_mix(yl, yu) if mix is None else mix
        l2 = (yu, xu, -xu * yu)
        u2 = (yl, xu, -xu * yl)
        lower = tuple(lam * p1 + (1 - lam) * p2 for p1, p2 in zip(lower, l2))
        upper = tuple(mu * p1 + (1 - mu) * p2 for p1, p2 in zip(upper, u2))
    point = xl == xu
    if bool(point.any()):
        zero = torch.zeros((), dtype=xl.dtype, device=xl.device)
        exact = (zero, xl, zero)
        lower = tuple(torch.where(point, e, p) for e, p in zip(exact, lower))
        upper = tuple(torch.where(point, e, p) for e, p in zip(exact, upper))
    return lower, upper


def default_mix(yl: torch.Tensor, yu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lam = clip(u_b / (u_b - l_b), 0, 1), mu = clip(-l_b / (u_b - l_b), 0, 1) (1 where u_b = l_b)."""
    width = yu - yl
    safe = torch.where(width > 0, width, torch.ones_like(width))
    lam = torch.where(width > 0, (yu / safe).clamp(0, 1), torch.ones_like(width))
    mu = torch.where(width > 0, (-yl / safe).clamp(0, 1), torch.ones_like(width))
    return lam, mu


def _side(a: torch.Tensor, p: Planes, q: Planes):
    """(coefficient of a, of b, bias terms (S, B, k)) for A = ``a`` (S, B, k) with plane p where A >= 0
    and q where A < 0; planes (B, k) or (S, B, k).  The bias is the sum of the terms over k (left to
    the caller, which may add terms first: one reduction)."""
    neg = a.clamp(max=0)
    a_x = a * p[0]
    a_x.addcmul_(neg, q[0] - p[0])
    a_y = a * p[1]
    a_y.addcmul_(neg, q[1] - p[1])
    terms = a * p[2]
    terms.addcmul_(neg, q[2] - p[2])
    return a_x, a_y, terms


def product_backward(
    last_lA: torch.Tensor | None,
    last_uA: torch.Tensor | None,
    bounds: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    mix: tuple[torch.Tensor, torch.Tensor] | None,
    use_mix: bool,
    concretize_a: bool = False,
):
    """Backward step of a * b (module docstring).  ``bounds`` = (l_a, u_a, l_b, u_b), shape (B, *shape);
    ``last_lA`` / ``last_uA`` (S, B, *shape) or None; ``mix`` None or (lam, mu) of shape (B, *shape) or
    (S, B, *shape).  Returns ((lA_a, uA_a), (lA_b, uA_b)), lower bias, upper bias in auto_LiRPA's
    ``bound_backward`` form (a coefficient None and a bias 0 where they vanish).

    ``concretize_a``: bound the term C a (C the coefficients of a) here, over a's box, and return no
    coefficients for a:  C a >= C m - |C| r  (lower side), C a <= C m + |C| r (upper side), m, r the
    midpoint and radius of [l_a, u_a].  Sound for any a inside its box; the same value as
    auto_LiRPA's concretisation at a box input that nothing else uses (then its bound is exactly
    this sum), so the caller passes True only there.  Saves the dense coefficient tensor of a."""
    xl = bounds[0]
    batch = xl.shape[0]
    shape = xl.shape
    n = xl[0].numel()
    flat = [t.reshape(batch, n) for t in bounds]
    wide = (flat[0] != flat[1]).any(dim=0).nonzero().squeeze(1)
    k = int(wide.numel())
    if mix is not None:
        mix = tuple(m.reshape(*m.shape[: m.dim() - len(shape) + 1], n) for m in mix)
    gather = k <= MAX_WIDE_FRACTION * n
    if gather:
        cols = [t.index_select(1, wide) for t in flat]
        if mix is not None:
            mix = tuple(m.index_select(m.dim() - 1, wide) for m in mix)
    else:
        cols = flat
    planes = mccormick_planes(*cols, mix, use_mix) if k else None
    if concretize_a and k:
        mid, rad = (cols[1] + cols[0]) / 2.0, (cols[1] - cols[0]) / 2.0
    same = last_lA is not None and last_lA is last_uA

    def side(a, lower: bool):
        if a is None:
            return None, None, 0
        s = a.shape[0]
        a2 = a.reshape(s, batch, n)
        out_shape = (s, *shape)
        if k == 0:  # every factor a point: a b = l_a b
            return None, (a2 * flat[0]).view(out_shape), 0
        p, q = planes if lower else planes[::-1]
        if gather:
            wx, wy, terms = _side(a2.index_select(2, wide), p, q)
            a_y = a2 * flat[0]
            a_y.index_copy_(2, wide, wy)
        else:
            wx, a_y, terms = _side(a2, p, q)
        if concretize_a:  # C a over a's box: C m -/+ |C| r
            terms.addcmul_(wx, mid)
            terms.addcmul_(wx.abs(), rad, value=-1.0 if lower else 1.0)
            return None, a_y.view(out_shape), terms.sum(dim=2)
        bias = terms.sum(dim=2)
        if gather:
            a_x = a2.new_zeros(s, batch, n)
            a_x.index_copy_(2, wide, wx)
        else:
            a_x = wx
        return a_x.view(out_shape), a_y.view(out_shape), bias

    lx, ly, lbias = side(last_lA, True)
    if same and k == 0:  # the same coefficients of b on both sides: one tensor
        ux, uy, ubias = None, ly, 0
    else:
        ux, uy, ubias = side(last_uA, False)
    return [(lx, ux), (ly, uy)], lbias, ubias
