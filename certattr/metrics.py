"""Dissimilarity metrics between attributions, batched in torch (SPEC section 2).

Two kinds of input:

* raw attributions ``g`` of shape (B, ...) (any non-batch shape): :func:`euclidean`,
  :func:`cosine_similarity`, :func:`cosine_distance`;
* attribution *maps* for the rank metrics :func:`topk_intersection`, :func:`kendall_tau`,
  :func:`spearman`; the spatial metrics :func:`center_of_mass_shift`, :func:`lens_recall`,
  :func:`lens_precision` and :func:`topk_div` need a (B, H, W) grid.

Any model input (SPEC 9.5): every map metric takes an attribution or a map of shape (B, C, H, W),
(B, H, W) or (B, n) and applies the map rule of SPEC 1 first (:func:`as_map`):
``m = sum_c |g_c|`` for (B, C, H, W) (channels collapsed, grid kept), ``m = |g|`` for (B, H, W) and
(B, n).  A map (>= 0) passes through unchanged, so maps and raw attributions give the same values.
Tabular (B, n) inputs have no grid: the spatial metrics refuse them (``dissimilarities`` reports nan
for the centre-of-mass shift).  :func:`default_k` derives a top-k from the number of map entries.

Every metric returns a (B,) tensor on the input's device (one value per sample) and never loops over
samples in Python.  Maps are >= 0 in practice, but nothing here assumes it.

Top-k tie rule (used by every top-k metric): entries are ranked by value, largest first, and equal
values by flat index (row-major), smallest first; this is a stable descending sort, so the choice is
deterministic and the same on CPU and CUDA (``torch.topk`` leaves the order of ties unspecified).
"""
from __future__ import annotations

import math
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .attributions import attribution_map
from .errors import CertattrError, check_input

__all__ = [
    "METRICS",
    "ON_MAPS",
    "SIMILARITIES",
    "as_map",
    "average_ranks",
    "center_of_mass",
    "center_of_mass_shift",
    "cosine_distance",
    "cosine_similarity",
    "default_k",
    "dissimilarities",
    "euclidean",
    "get_metric",
    "kendall_tau",
    "lens_precision",
    "lens_recall",
    "spearman",
    "topk_div",
    "topk_indices",
    "topk_intersection",
    "topk_mask",
    "window_dilate",
]

# --------------------------------------------------------------------------- validation helpers

def as_map(t: torch.Tensor, *, name: str = "m") -> torch.Tensor:
    """The map rule (SPEC 1) on an attribution or map: (B,C,H,W) -> sum_c |g_c| as (B,H,W);
    (B,H,W) and (B,n) -> |g| (a map >= 0 is unchanged).  Other ranks raise a CertattrError."""
    check_input(t, name=name)
    if t.dim() == 4:
        return t.abs().sum(dim=1)
    if t.dim() in (2, 3):
        return t.abs()
    raise CertattrError(f"{name} must be an attribution or map of shape (B,C,H,W), (B,H,W) or (B,n); "
                        f"got {t.dim()} dimensions {tuple(t.shape)}")


def default_k(n: int) -> int:
    """Top-k for a map of ``n`` entries when none is given: 100 on MNIST-sized maps and larger
    (SPEC 2), else about 12.8% of the entries (100 / 784), at least 1: ``min(100, max(1, ceil(0.128 n)))``."""
    return int(min(100, max(1, math.ceil(0.128 * int(n)))))


def _check_pair(a: torch.Tensor, b: torch.Tensor, *, names: tuple[str, str], ndim=None):
    """Both finite floating tensors of the same shape and device; promoted to a common dtype."""
    check_input(a, name=names[0], ndim=ndim)
    check_input(b, name=names[1], ndim=ndim)
    if a.shape != b.shape:
        raise CertattrError(f"{names[0]} and {names[1]} must have the same shape, got "
                            f"{tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise CertattrError(f"{names[0]} and {names[1]} are on different devices ({a.device}, {b.device})")
    if a.dim() < 2:
        raise CertattrError(f"{names[0]} must be batched (B, ...), got shape {tuple(a.shape)}")
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def _check_maps(m1: torch.Tensor, m2: torch.Tensor, *, grid: bool = False):
    """Two attributions or maps of one shape, (B,C,H,W), (B,H,W) or (B,n), through :func:`as_map`
    (``grid=True``: a (B,H,W) grid is needed, so (B,n) is refused)."""
    if grid:
        for name, m in (("m1", m1), ("m2", m2)):
            if isinstance(m, torch.Tensor) and m.dim() == 2:
                raise CertattrError(f"{name} is flat {tuple(m.shape)}: this metric needs (B,H,W) maps "
                                    "(reshape the flattened map to its image grid)")
    m1, m2 = _check_pair(m1, m2, names=("m1", "m2"), ndim=(2, 3, 4))
    return as_map(m1, name="m1"), as_map(m2, name="m2")


def _check_map(m: torch.Tensor, *, grid: bool = False) -> torch.Tensor:
    if grid and isinstance(m, torch.Tensor) and m.dim() == 2:
        raise CertattrError(f"m is flat {tuple(m.shape)}: this metric needs (B,H,W) maps "
                            "(reshape the flattened map to its image grid)")
    check_input(m, name="m", ndim=(2, 3, 4))
    return as_map(m)


def _check_k(k, n: int) -> int:
    try:
        if isinstance(k, bool):
            raise TypeError
        k = operator.index(k)
    except TypeError:
        raise CertattrError(f"k must be an integer, got {k!r}") from None
    if k < 1:
        raise CertattrError(f"k must be >= 1, got k={k}")
    if k > n:
        raise CertattrError(f"k={k} is larger than the number of map entries n={n}")
    return k


def _check_w(w) -> int:
    try:
        if isinstance(w, bool):
            raise TypeError
        w = operator.index(w)
    except TypeError:
        raise CertattrError(f"window size w must be an odd integer >= 1, got {w!r}") from None
    if w < 1 or w % 2 == 0:
        raise CertattrError(f"window size w must be an odd integer >= 1 (e.g. 3, 5, 7), got w={w}")
    return w


# --------------------------------------------------------------------------- raw attributions

def euclidean(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """Euclidean distance ``||g1 - g2||_2`` per sample over all non-batch dims (differentiable)."""
    g1, g2 = _check_pair(g1, g2, names=("g1", "g2"))
    return torch.linalg.vector_norm((g1 - g2).flatten(1), dim=1)


def cosine_similarity(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``<g1, g2> / (||g1|| ||g2||)`` per sample over all non-batch dims.

    Zero vectors: 1 when both g1 and g2 are exactly zero (the attribution did not move), 0 when only
    one is (no direction in common).  The value is clamped to [-1, 1] against round-off.  Differentiable,
    with finite gradients at zero vectors.
    """
    g1, g2 = _check_pair(g1, g2, names=("g1", "g2"))
    a, b = g1.flatten(1), g2.flatten(1)
    na = torch.linalg.vector_norm(a, dim=1)
    nb = torch.linalg.vector_norm(b, dim=1)
    denom = na * nb
    both_nonzero = denom > 0
    safe = torch.where(both_nonzero, denom, torch.ones_like(denom))
    cos = ((a * b).sum(dim=1) / safe).clamp(-1.0, 1.0)
    both_zero = (na == 0) & (nb == 0)
    fallback = both_zero.to(cos.dtype)  # 1 if both zero, 0 if exactly one is zero
    return torch.where(both_nonzero, cos, fallback)


def cosine_distance(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """Cosine distance ``1 - cosine_similarity(g1, g2)`` in [0, 2] (same zero-vector convention)."""
    return 1.0 - cosine_similarity(g1, g2)


# --------------------------------------------------------------------------- top-k

def topk_indices(m: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) flat indices of the k largest entries of each map, largest first; ties -> smaller index."""
    m = _check_map(m)
    flat = m.flatten(1)
    k = _check_k(k, flat.shape[1])
    return torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :k]


def topk_mask(m: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of ``T_k(m)``, shaped like the map of ``m`` (channels collapsed; tie rule of
    :func:`topk_indices`)."""
    m = _check_map(m)
    idx = topk_indices(m, k)
    mask = torch.zeros(m.shape[0], m[0].numel(), dtype=torch.bool, device=m.device)
    return mask.scatter_(1, idx, True).reshape(m.shape)


def topk_intersection(m1: torch.Tensor, m2: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k intersection ``|T_k(m1) ∩ T_k(m2)| / k`` in [0, 1] (Ghorbani et al., AAAI 2019).

    T_k = flat indices of the k largest entries; ties broken towards the smaller flat index.
    """
    m1, m2 = _check_maps(m1, m2)
    k = _check_k(k, m1[0].numel())
    both = topk_mask(m1, k) & topk_mask(m2, k)
    return both.flatten(1).sum(dim=1).to(m1.dtype) / k


# --------------------------------------------------------------------------- rank correlations

def _tied_pairs(ordered: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    """Number of pairs tied in every given row-sorted key, sum_groups t (t - 1) / 2, as (B,) int64.

    Rows are sorted so that equal keys are consecutive; an element at position p in a run that starts
    at s has p - s earlier partners, and summing p - s over a run of length t gives t (t - 1) / 2.
    """
    pos = torch.arange(ordered.shape[1], device=ordered.device).expand_as(ordered)
    new_run = torch.ones_like(ordered, dtype=torch.bool)
    new_run[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    for key in others:
        new_run[:, 1:] |= key[:, 1:] != key[:, :-1]
    starts = torch.where(new_run, pos, torch.zeros_like(pos)).cummax(dim=1).values
    return (pos - starts).sum(dim=1)


def _strict_inversions(seq: torch.Tensor) -> torch.Tensor:
    """Number of pairs p < q with seq[p] > seq[q] in each row, as (B,) int64: a bottom-up merge sort.

    At block size s the rows are cut into sorted blocks; every element of a right block counts the
    elements of its left neighbour block that are strictly larger (searchsorted), then the pair of
    blocks is sorted into one block of size 2s.  O(n log^2 n) time, O(B n) memory.
    """
    batch, n = seq.shape
    size = 1 << max(0, (n - 1).bit_length())
    if size > n:  # pad with +inf: never strictly larger than anything, so no extra inversions
        pad = torch.full((batch, size - n), math.inf, dtype=seq.dtype, device=seq.device)
        seq = torch.cat([seq, pad], dim=1)
    count = torch.zeros(batch, dtype=torch.int64, device=seq.device)
    block = 1
    while block < size:
        pairs = seq.reshape(batch * (size // (2 * block)), 2, block)
        left, right = pairs[:, 0].contiguous(), pairs[:, 1].contiguous()
        not_larger = torch.searchsorted(left, right, right=True)  # left entries <= each right entry
        count += (block - not_larger).reshape(batch, -1).sum(dim=1)
        seq = torch.sort(pairs.reshape(-1, 2 * block), dim=1).values.reshape(batch, size)
        block *= 2
    return count


def kendall_tau(m1: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    """Kendall tau-b of the flattened maps, exactly ``scipy.stats.kendalltau`` (variant "b").

    tau_b = (P - Q) / sqrt((n0 - n1) (n0 - n2)) (Kendall 1945), n0 = n (n - 1) / 2, P/Q = concordant/
    discordant pairs, n1/n2 = pairs tied in m1/in m2.  Knight's O(n log^2 n) method, batched: sort by
    (m1, m2); Q = strict inversions of m2 in that order; with n3 = pairs tied in both,
    P = n0 - n1 - n2 + n3 - Q.  Pair counts are exact int64.  A constant map gives nan, like scipy.
    """
    m1, m2 = _check_maps(m1, m2)
    x, y = m1.flatten(1), m2.flatten(1)
    n = x.shape[1]
    order = torch.sort(y, dim=1, stable=True).indices  # lexicographic (x, y): sort by y, then stably by x
    order = order.gather(1, torch.sort(x.gather(1, order), dim=1, stable=True).indices)
    xs, ys = x.gather(1, order), y.gather(1, order)
    tied_x = _tied_pairs(xs)
    tied_xy = _tied_pairs(xs, ys)
    tied_y = _tied_pairs(torch.sort(y, dim=1).values)
    discordant = _strict_inversions(ys)
    total = n * (n - 1) // 2
    num = (total - tied_x - tied_y + tied_xy - 2 * discordant).to(torch.float64)
    den = torch.sqrt((total - tied_x).to(torch.float64) * (total - tied_y).to(torch.float64))
    tau = (num / den).clamp(-1.0, 1.0)  # 0/0 -> nan stays nan
    return tau.to(m1.dtype)


def average_ranks(m: torch.Tensor) -> torch.Tensor:
    """1-based ranks of each row of a (B, n) tensor, ties -> mean rank (``scipy.stats.rankdata``).

    A tie group at sorted positions [l, r) gets (l + 1 + r) / 2, with l, r from a batched searchsorted.
    """
    check_input(m, name="m", ndim=2)
    ordered = torch.sort(m, dim=1).values
    left = torch.searchsorted(ordered, m, right=False)
    right = torch.searchsorted(ordered, m, right=True)
    return (left + right + 1).to(torch.float64) / 2.0


def spearman(m1: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    """Spearman rho of the flattened maps = Pearson correlation of their average ranks
    (exactly ``scipy.stats.spearmanr``; Spearman 1904).

    A constant map (zero rank variance) gives nan, like scipy.
    """
    m1, m2 = _check_maps(m1, m2)
    r1 = average_ranks(m1.flatten(1))
    r2 = average_ranks(m2.flatten(1))
    r1 = r1 - r1.mean(dim=1, keepdim=True)
    r2 = r2 - r2.mean(dim=1, keepdim=True)
    rho = (r1 * r2).sum(dim=1) / torch.sqrt((r1 * r1).sum(dim=1) * (r2 * r2).sum(dim=1))
    return rho.clamp(-1.0, 1.0).to(m1.dtype)


# --------------------------------------------------------------------------- spatial metrics

def center_of_mass(m: torch.Tensor) -> torch.Tensor:
    """Centre of mass ``C(m) = sum_ij (i, j) m_ij / sum_ij m_ij`` -> (B, 2) as (row, col), 0-based pixels.

    A map that sums to zero gives (nan, nan).
    """
    m = _check_map(m, grid=True)
    _, h, w = m.shape
    rows = torch.arange(h, dtype=m.dtype, device=m.device)
    cols = torch.arange(w, dtype=m.dtype, device=m.device)
    total = m.sum(dim=(1, 2))
    ci = (m.sum(dim=2) * rows).sum(dim=1) / total
    cj = (m.sum(dim=1) * cols).sum(dim=1) / total
    return torch.stack([ci, cj], dim=1)


def center_of_mass_shift(m1: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    """Centre-of-mass shift ``||C(m1) - C(m2)||_2`` in pixels; nan when either map sums to zero."""
    m1, m2 = _check_maps(m1, m2, grid=True)
    return torch.linalg.vector_norm(center_of_mass(m1) - center_of_mass(m2), dim=1)


def window_dilate(mask: torch.Tensor, w: int) -> torch.Tensor:
    """``N_w(S)``: union of the w x w windows centred on the True pixels of a (B, H, W) bool mask.

    A max-pool with stride 1 on the image grid: windows are clipped at the borders and never wrap
    from the end of a row to the start of the next.
    """
    w = _check_w(w)
    if w == 1:
        return mask.clone()
    pooled = F.max_pool2d(mask.to(torch.float32).unsqueeze(1), kernel_size=w, stride=1, padding=w // 2)
    return pooled.squeeze(1) > 0


def lens_recall(m1: torch.Tensor, m2: torch.Tensor, k: int, w: int = 3) -> torch.Tensor:
    """LENS top-k recall ``|N_w(T_k(m1)) ∩ T_k(m2)| / k`` (Kamath et al., "Rethinking Robustness of
    Model Attributions", AAAI 2024): a top-k pixel of m2 counts if it lies in the w x w window of a
    top-k pixel of m1."""
    m1, m2 = _check_maps(m1, m2, grid=True)
    k = _check_k(k, m1[0].numel())
    w = _check_w(w)
    hits = window_dilate(topk_mask(m1, k), w) & topk_mask(m2, k)
    return hits.flatten(1).sum(dim=1).to(m1.dtype) / k


def lens_precision(m1: torch.Tensor, m2: torch.Tensor, k: int, w: int = 3) -> torch.Tensor:
    """LENS top-k precision, the mirror of :func:`lens_recall`: ``|T_k(m1) ∩ N_w(T_k(m2))| / k``."""
    m1, m2 = _check_maps(m1, m2, grid=True)
    k = _check_k(k, m1[0].numel())
    w = _check_w(w)
    hits = topk_mask(m1, k) & window_dilate(topk_mask(m2, k), w)
    return hits.flatten(1).sum(dim=1).to(m1.dtype) / k


def topk_div(m: torch.Tensor, k: int, w: int = 3) -> torch.Tensor:
    """Diverse top-k (top-k-div, Kamath et al., AAAI 2024): greedily take the largest remaining pixel,
    suppress its w x w window (clipped at the borders, no wrap across rows), repeat k times -> (B, k)
    int64 flat indices.

    Ties go to the smaller flat index.  Each pick suppresses at most w^2 pixels, so k <=
    ceil(H W / w^2) always succeeds; if a map runs out of unsuppressed pixels before k picks, a
    CertattrError names k, w and how many picks were possible (no padding).
    """
    m = _check_map(m, grid=True)
    _, h, wd = m.shape
    k = _check_k(k, h * wd)
    w = _check_w(w)
    offsets = torch.arange(-(w // 2), w // 2 + 1, device=m.device)
    d_row = offsets.repeat_interleave(w).unsqueeze(0)  # (1, w*w) window offsets
    d_col = offsets.repeat(w).unsqueeze(0)
    scores = m.flatten(1).clone()
    picks, values = [], []
    for _ in range(k):
        idx = scores.argmax(dim=1)  # first maximum -> smallest flat index among ties
        picks.append(idx)
        values.append(scores.gather(1, idx.unsqueeze(1)))
        r = (idx // wd).unsqueeze(1) + d_row
        c = (idx % wd).unsqueeze(1) + d_col
        inside = (r >= 0) & (r < h) & (c >= 0) & (c < wd)  # clip at borders; never wrap to another row
        window = torch.where(inside, r * wd + c, idx.unsqueeze(1))
        scores.scatter_(1, window, -math.inf)
    picked = torch.cat(values, dim=1)
    if bool(torch.isneginf(picked).any()):  # a suppressed pixel was picked: the map ran out
        possible = int((~torch.isneginf(picked)).sum(dim=1).min())
        raise CertattrError(f"topk_div: only {possible} pixels can be picked with w={w} on a {h}x{wd} map, "
                            f"k={k} requested (k <= {math.ceil(h * wd / (w * w))} always works)")
    return torch.stack(picks, dim=1)


# --------------------------------------------------------------------------- bundle and registry

def dissimilarities(g1: torch.Tensor, g2: torch.Tensor, k: int | None = 100) -> dict[str, torch.Tensor]:
    """The standard metric set for two raw attributions (B,C,H,W), (B,H,W) or (B,n).

    euclidean and cosine (similarity) on the raw attributions; topk_intersection, kendall, spearman on
    the maps ``m = sum_c |g_c|`` (flattened); center_of_mass_shift on the maps as (B,H,W) (nan for
    tabular (B,n) inputs, which have no grid).  ``k=None``: :func:`default_k` of the map size.
    """
    g1, g2 = _check_pair(g1, g2, names=("g1", "g2"), ndim=(2, 3, 4))
    m1 = attribution_map(g1).detach()
    m2 = attribution_map(g2).detach()
    k = _check_k(default_k(m1.shape[1]) if k is None else k, m1.shape[1])
    if g1.dim() >= 3:
        h, w = g1.shape[-2:]
        shift = center_of_mass_shift(m1.reshape(-1, h, w), m2.reshape(-1, h, w))
    else:
        shift = torch.full((g1.shape[0],), math.nan, dtype=m1.dtype, device=m1.device)
    return {
        "euclidean": euclidean(g1, g2),
        "cosine": cosine_similarity(g1, g2),
        "topk_intersection": topk_intersection(m1, m2, k),
        "kendall": kendall_tau(m1, m2),
        "spearman": spearman(m1, m2),
        "center_of_mass_shift": shift,
    }


METRICS: dict[str, Callable[..., torch.Tensor]] = {
    "euclidean": euclidean,
    "cosine": cosine_similarity,
    "cosine_distance": cosine_distance,
    "topk_intersection": topk_intersection,
    "kendall": kendall_tau,
    "spearman": spearman,
    "center_of_mass_shift": center_of_mass_shift,
    "lens_recall": lens_recall,
    "lens_precision": lens_precision,
}
"""Pairwise metrics by name: ``METRICS[name](a, b, **kw) -> (B,)``."""

ON_MAPS = frozenset({"topk_intersection", "kendall", "spearman", "center_of_mass_shift",
                     "lens_recall", "lens_precision"})
"""Metrics that take maps (attribution_map of g); the others take raw attributions."""

SIMILARITIES = frozenset({"cosine", "topk_intersection", "kendall", "spearman",
                          "lens_recall", "lens_precision"})
"""Metrics where larger means more alike (the others are distances: 0 = identical)."""


def get_metric(name: str) -> Callable[..., torch.Tensor]:
    """Look up a pairwise metric by name (see :data:`METRICS`)."""
    if name not in METRICS:
        raise CertattrError(f"unknown metric {name!r}; choose from {', '.join(sorted(METRICS))}")
    return METRICS[name]
