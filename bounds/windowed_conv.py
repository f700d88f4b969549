"""conv2d of CROWN coefficient matrices whose rows are spatially local (the adjoint of a transposed
convolution in ``lirpa_compat.BoundConvAdjoint``).

A coefficient matrix A of shape (S, B, C, H, W) maps to conv2d(A, W) of shape (S, B, C', H', W')
row by row (a row: one spec index s).  Bounding the input gradient d f_y / dx starts from the identity
spec: row s is e_s, and after the first adjoint convolution (and the elementwise relaxation of a
derivative factor, which keeps zeros zero) it is nonzero only in a small spatial window around
pixel s.  Convolving the full H x W plane then mostly multiplies zeros.

Exactness.  Per dimension (stride s, padding p, dilation d, kernel k), output o reads the inputs
i = s o - p + d q, q = 0..k-1.  Let row j be zero outside [a_j, a_j + E) (over every sample and
channel; E the largest support extent over the rows).  Input i = a_j + e reaches only the outputs
o = (i + p - d q) / s, so every nonzero output of the row lies in the window o_0 .. o_0 + L - 1,

    o_0 = ceil((a_j + p - d (k - 1)) / s),   L = (d (k - 1) + E - 1) // s + 1,

and output o_0 + t receives input a_j + e through tap q = (e + delta_j - s t) / d (when that is an
integer in [0, k)), delta_j = a_j + p - s o_0.  delta_j takes at most s values (per dimension); for
each, the map from the E x E' support window (all channels) to the L x L' output window is one
constant matrix M_delta built from the taps of W.  So we gather the support windows (positions past
the plane are 0, as in conv2d), multiply each row by its M_delta, and write the windows into a zero
plane (window outputs past the plane are dropped); every output outside the window is an empty sum,
exactly 0.  The result is conv2d(A, W) on the same products, only the order of the float64 summation
inside an output may differ (as between any two conv2d kernels: the float64 propagation error
covered by ``floatsafe.effective_unit``).  Cost: E^2 C x L^2 C' per row and sample (cnn-small's
second layer: 2 x 2 inputs to 3 x 3 outputs instead of the 14 x 14 -> 7 x 7 planes), plus one pass
over A to find the supports.

Full-plane mode.  When the output windows would cover most of the output plane (a kernel as large as
the plane: a linear layer after a Flatten written as a convolution by ``gradgraph.GradNet``), but the
input support windows are small against the kernel (E E' <= kh kw / 2), every row is computed on the
whole output plane (o_0 = 0, L = H', delta_j = a_j + p) from its input window only: the same
per-offset-class matrices, now E E' C x H' W' C' (cnn-small's 1568 -> 100 layer: 3 x 3 x 32 inputs per
row instead of 7 x 7 x 32).  Exactness as above: the terms left out are products with inputs that
are exactly 0.

``conv2d_rows`` falls back to one plain conv2d when the windows are not small (dense rows) or there
are more than ``MAX_GROUPS`` offset classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# use windows only when they cover at most this fraction of the output plane
MAX_WINDOW_FRACTION = 0.5
# at most this many offset classes (one small matmul each); more: one plain conv2d
MAX_GROUPS = 96
# build every class's matrix in one gather up to this many entries (else one gather per class)
MAX_MATRIX_ENTRIES = 1 << 22


def _support(nonzero_lines: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """nonzero_lines (S, n) bool -> (first, last, empty) per row (first = last = 0 for an empty row)."""
    n = nonzero_lines.shape[1]
    idx = torch.arange(n, device=nonzero_lines.device)
    big = torch.full_like(idx, n)
    first = torch.where(nonzero_lines, idx, big).amin(dim=1)
    last = torch.where(nonzero_lines, idx, -torch.ones_like(idx)).amax(dim=1)
    empty = last < 0
    zero = torch.zeros_like(first)
    return torch.where(empty, zero, first), torch.where(empty, zero, last), empty


def conv2d_rows(
    a: torch.Tensor,
    weight: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    cache: dict | None = None,
) -> torch.Tensor:
    """conv2d over the last three dims of ``a`` (S, B, C, H, W) with ``weight`` (C', C, kh, kw), no
    bias; rows (dim 0) with small spatial support are convolved on their window only (module
    docstring).  Returns (S, B, C', H', W').  ``cache``: a dict owned by the caller for this ``weight`` (the
    per-class matrices are kept there, keyed on the weight's storage, version and the classes)."""
    S, B, C, H, W = a.shape
    kh, kw = int(weight.shape[2]), int(weight.shape[3])
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cout = int(weight.shape[0])

    def dense() -> torch.Tensor:
        out = F.conv2d(a.reshape(S * B, C, H, W), weight, None, stride, padding, dilation)
        return out.view(S, B, cout, ho, wo)

    if S == 0 or B == 0 or ho <= 0 or wo <= 0:
        return dense()
    nz = a.ne(0).reshape(S, B * C, H, W).amax(dim=1)  # (S, H, W): any entry of the row nonzero there
    fh, lh, _ = _support(nz.any(dim=2))
    fw, lw, _ = _support(nz.any(dim=1))
    ext_h, ext_w = int((lh - fh).max()) + 1, int((lw - fw).max()) + 1  # support extents E
    reach_h, reach_w = dh * (kh - 1), dw * (kw - 1)
    # outputs of a row: o_0 = ceil((a + p - reach) / s) .. o_0 + L - 1 with L = (reach + E - 1) // s + 1
    # (floor((a + E - 1 + p) / s) - o_0 < L); delta = a + p - s o_0 in [reach - s + 1, reach]
    oh0 = torch.div(fh + ph - reach_h + sh - 1, sh, rounding_mode="floor")
    ow0 = torch.div(fw + pw - reach_w + sw - 1, sw, rounding_mode="floor")
    lho, lwo = (reach_h + ext_h - 1) // sh + 1, (reach_w + ext_w - 1) // sw + 1
    if lho * lwo > MAX_WINDOW_FRACTION * ho * wo:
        # the output windows cover the plane (a kernel as large as the plane: a linear layer after a
        # Flatten): every output of the row, o_0 = 0 and L = the plane, from the input window only
        if ext_h * ext_w > MAX_WINDOW_FRACTION * kh * kw:
            return dense()
        oh0, ow0 = torch.zeros_like(fh), torch.zeros_like(fw)
        lho, lwo = ho, wo
    dev = a.device
    delta_h, delta_w = fh + ph - sh * oh0, fw + pw - sw * ow0
    # the support windows: A[j, :, :, a_j + e, a'_j + e'] (positions past the plane are 0)
    ih = fh.view(S, 1) + torch.arange(ext_h, device=dev).view(1, ext_h)
    iw = fw.view(S, 1) + torch.arange(ext_w, device=dev).view(1, ext_w)
    rows = torch.arange(S, device=dev)
    win = a[
        rows.view(S, 1, 1), :, :, ih.clamp(max=H - 1).view(S, ext_h, 1), iw.clamp(max=W - 1).view(S, 1, ext_w)
    ]
    inside = (ih < H).view(S, ext_h, 1, 1, 1) & (iw < W).view(S, 1, ext_w, 1, 1)  # win: (S, Eh, Ew, B, C)
    if not bool(inside.all()):
        win = torch.where(inside, win, torch.zeros((), dtype=a.dtype, device=dev))
    win = win.permute(0, 3, 1, 2, 4).reshape(S, B, ext_h * ext_w * C)
    # per offset class: output t of the window reads input e through kernel tap q = (e + delta - s t) / d
    w_ext = weight.new_zeros(cout, C, kh + 1, kw + 1)  # tap index k: a zero tap
    w_ext[:, :, :kh, :kw] = weight
    # offset classes: rows sorted by class, one matmul per class on a contiguous block of rows
    dh_min, dw_min = int(delta_h.min()), int(delta_w.min())
    span_w = int(delta_w.max()) - dw_min + 1
    code = (delta_h - dh_min) * span_w + (delta_w - dw_min)
    order = torch.argsort(code, stable=True)
    classes, counts = torch.unique_consecutive(code.index_select(0, order), return_counts=True)
    n_cls = int(classes.numel())
    k_in, n_out = ext_h * ext_w * C, cout * lho * lwo
    if n_cls > MAX_GROUPS:
        return dense()
    qh = _taps_all(classes // span_w + dh_min, ext_h, lho, kh, sh, dh)  # (G, Eh, Lh)
    qw = _taps_all(classes % span_w + dw_min, ext_w, lwo, kw, sw, dw)  # (G, Ew, Lw)
    mats = None
    if n_cls * k_in * n_out <= MAX_MATRIX_ENTRIES:  # every class's matrix in one gather (cached per weight)
        key = (weight.data_ptr(), weight._version, tuple(weight.shape), stride, padding, dilation, ext_h, ext_w,
               lho, lwo, dh_min, dw_min, span_w, tuple(classes.tolist()))
        mats = cache.get(key) if cache is not None else None
        if mats is None:
            mats = _class_matrices(w_ext, qh, qw)
            if cache is not None:
                if len(cache) >= 4:  # a few entries per layer: the classes repeat from call to call
                    cache.clear()
                cache[key] = mats
    win = win.index_select(0, order)
    local = a.new_empty(S, B, n_out)
    start = 0
    for g, count in enumerate(counts.tolist()):
        if mats is not None:
            m = mats[g]
        else:
            m = w_ext[:, :, qh[g].view(ext_h, 1, lho, 1), qw[g].view(1, ext_w, 1, lwo)]  # (C', C, Eh, Ew, Lh, Lw)
            m = m.permute(2, 3, 1, 0, 4, 5).reshape(k_in, n_out)
        torch.matmul(win[start : start + count], m, out=local[start : start + count])
        start += count
    local = local.index_select(0, torch.argsort(order))  # back to the rows' order
    if lho == ho and lwo == wo and not bool(oh0.any()) and not bool(ow0.any()):  # full-plane windows
        return local.view(S, B, cout, ho, wo)
    # write back into a zero plane; window outputs past the plane go to one extra, discarded slot
    oh = oh0.view(S, 1) + torch.arange(lho, device=dev).view(1, lho)  # (S, Lh)
    ow = ow0.view(S, 1) + torch.arange(lwo, device=dev).view(1, lwo)
    plane = ho * wo
    pos = oh.view(S, lho, 1) * wo + ow.view(S, 1, lwo)  # (S, Lh, Lw)
    off = ((oh < 0) | (oh >= ho)).view(S, lho, 1) | ((ow < 0) | (ow >= wo)).view(S, 1, lwo)
    base = torch.arange(S * B * cout, device=dev).view(S, B, cout, 1, 1) * plane
    dest = base + pos.view(S, 1, 1, lho, lwo)
    dest = torch.where(off.view(S, 1, 1, lho, lwo), torch.full_like(dest, S * B * cout * plane), dest)
    out = a.new_zeros(S * B * cout * plane + 1)
    out.index_copy_(0, dest.reshape(-1), local.reshape(-1))
    return out[:-1].view(S, B, cout, ho, wo)


def _class_matrices(w_ext: torch.Tensor, qh: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """(G, Eh Ew C, C' Lh Lw): entry [g, (e, e', c), (c', t, t')] = w_ext[c', c, qh[g, e, t], qw[g, e', t']]
    (one flat gather, built directly in that layout)."""
    cout, cin, kh1, kw1 = w_ext.shape
    g, eh, lh = qh.shape
    ew, lw = qw.shape[1], qw.shape[2]
    qh = qh.view(g, eh, 1, 1, 1, lh, 1)
    qw = qw.view(g, 1, ew, 1, 1, 1, lw)
    cc = (torch.arange(cout, device=w_ext.device).view(1, 1, 1, 1, cout, 1, 1) * cin
          + torch.arange(cin, device=w_ext.device).view(1, 1, 1, cin, 1, 1, 1))
    idx = (cc * kh1 + qh) * kw1 + qw  # (G, Eh, Ew, C, C', Lh, Lw)
    return w_ext.reshape(-1)[idx.reshape(-1)].view(g, eh * ew * cin, cout * lh * lw)


def _taps_all(delta: torch.Tensor, ext: int, length: int, k: int, s: int, d: int) -> torch.Tensor:
    """(G, ext, length) kernel tap q = (e + delta_g - s t) / d of input e for output t of a window, per
    offset class g, or k (the zero tap) where that is not an integer in [0, k)."""
    dev = delta.device
    e = torch.arange(ext, device=dev).view(1, ext, 1)
    t = torch.arange(length, device=dev).view(1, 1, length)
    num = e + delta.view(-1, 1, 1) - s * t
    q = torch.div(num, d, rounding_mode="floor")
    ok = (num >= 0) & (num % d == 0) & (q < k)
    return torch.where(ok, q, torch.full_like(q, k))
