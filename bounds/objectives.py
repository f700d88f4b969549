"""Objectives sharper than the elementwise box: Euclidean, cosine and top-k through CROWN spec rows.

``certified_box.bound_box`` gives a box  L <= g'(x') <= U  on the float attribution (every x' of the
region), and records the arguments of a further CROWN pass on the gradient graph: for any matrix C
(rows, m, n), ``crown.crown_gradient(**crown_args, spec=C)`` returns sound bounds lo <= C g_ex(x') <= hi
on the EXACT (real-arithmetic) gradient.  The float gradient torch computes satisfies
|g'(x') - g_ex(x')| <= E (``state["float_error"]``, widened by ``MARGIN_FACTOR`` as the box is), so
for every vector c

    c . g'  <=  hi(c) + MARGIN_FACTOR |c| . E,        c . g'  >=  lo(c) - MARGIN_FACTOR |c| . E.   (F)

One CROWN pass bounds a linear functional of the whole gradient, so it keeps the correlation between
coordinates that the box (one pass per coordinate, combined coordinate by coordinate) throws away.

Every attribution a'(x') is handled the same way: all that 1-3 below use is the box L <= a' <= U and,
for any row c, an upper bound on c . a' of the form (F) with an elementwise float-error vector E_a
(``state["attr_error"]``, widened by MARGIN_FACTOR as the box is; ``certified_box.bound_box``).

* saliency: a = g, the rows of GradNet; E_a = E.
* gradient x input: GradNet with ``times_input`` (the graph the box pass already used) outputs the
  product g_ex(x') * x' itself (a product node with x' inside the graph, relaxed by CROWN jointly with
  the gradient), so a spec row bounds c . (g_ex(x') * x') directly.  Torch's a' = fl(x' * g'(x')) with
  |g' - g_ex| <= E: |a' - g_ex x'| <= |x'| E + u |x'| (|g_ex| + E) <= E_a, the product error of the
  box (|x'| <= max(|lo|, |hi|) over the region, |g_ex| <= M of ``floatsafe.backward_error``).
* IG (baseline 0, right Riemann sum, alpha_s = s/m): IG_ex(x') = x' (1/m) sum_s g_ex(alpha_s x')
  = sum_s (1/s) [g_ex(p_s) * p_s] at p_s = alpha_s x' (m alpha_s = s).  The box pass has one row per
  path point s whose region is alpha_s R (p_s ranges over it); on those rows GradNet with
  ``times_input`` gives ub_s(c) >= c . (g_ex(p) * p) for every p in alpha_s R, so
  c . IG_ex(x') <= sum_s (1/s) ub_s(c) (each term maximised separately: sound, loses only the
  coupling between path points; our float64 weights 1/s and the sum add gamma_{m+4} sum |terms|).
  E_a is the box's error of the path mean (path-point rounding as an input error, the mean, the
  product with x').

Only upper bounds of the rows are used (the numerator's lower bound is the upper bound of -g0), so the
CROWN pass is one-sided (``ONE_SIDED``: ``crown.crown_gradient(..., sides="upper")``, auto_LiRPA's
``bound_lower=False`` for the output rows; the returned lower bound is -inf, unused; alpha-CROWN passes
keep both sides, their optimisation runs inside ``alpha_crown``).

1. Euclidean (the "chord" bound).  For any vector c and every coordinate j, t -> (t - g0_j)^2 - c_j t
   is convex, so on [L_j, U_j] it is at most h_j = max over t in {L_j, U_j} of (t - g0_j)^2 - c_j t.
   Summing,  ||g' - g0||^2 = sum_j [(g'_j - g0_j)^2 - c_j g'_j] + c . g'  <=  sum_j h_j + c . g', and
   (F) bounds c . g' with one spec row.  With c = (L - g0) + (U - g0) (the chord of the square over
   the box, the tightest linear over-estimator: h_j = g0_j^2 - L_j U_j) the bound is never worse than
   the box bound sum_j max((L_j-g0_j)^2, (U_j-g0_j)^2) when CROWN's row bound is at most the sum of
   its coordinate bounds; we return min(box, chord) anyway.  Any float c is sound (h_j is evaluated
   at the endpoints for the c actually used).
2. Cosine.  N = <g0, g'> >= lo(g0) - MARGIN_FACTOR |g0| . E (one spec row); ||g'||^2 <= the chord
   bound with g0 = 0 (c = L + U, one more row), capped by the box's largest norm; ||g'|| >= the box's
   smallest norm (for N < 0; N / ||g0|| is no help there).  cos >= N / (||g0|| max||g'||) if
   N >= 0, else N / (||g0|| min||g'||) (-1 if that minimum is 0).  The caller takes the max with the
   box and tangent bounds.
3. Top-k of the map m_i = sum_c |g_{c,i}|.  i is in T_k(m) for every tie-breaking iff fewer than k
   entries j != i have m_j >= m_i; so i is certainly in the top k over the region if fewer than k
   entries j can reach m_j - m_i >= 0 somewhere in it.  The box says j can reach i if
   m_hi_j >= m_lo_i; a pair row sharpens that: |t| <= a t + b on [L, U] for the chord slope
   a = (|U| - |L|) / (U - L) (any float a, with b = max over the endpoints of |t| - a t: convexity) and
   |t| >= s t for s = sign where the sign is fixed over the box (s = 0 otherwise), so
   m_j - m_i <= (a_j . g'_j - s_i . g'_i) + sum b_j, one spec row per pair, bounded by (F).  The pair
   cannot reach if that bound plus the float rounding of the user's channel sum
   (gamma_C (m_hi_i + m_hi_j) in the model's dtype, C channels) is < 0.  Pairs are spent where they
   can decide something: entries i ordered by how few box-reaching j they have (the entries closest to
   being certified), all their box-reaching j, within min(``PAIR_BUDGET``, max(16, n / 4)) rows per
   sample (measured: the entries with the fewest reaching j carry nearly all the gain).  The result
   stores the refuted pairs (sample, i, j); ``count_reaching`` turns them into certified top-k entries
   for any k.

Our own float64 arithmetic: every sum / product here is bounded by gamma_{n+16} (2^-53) times the sum
of the magnitudes of its terms (Higham, Lemma 3.1), added outward; CROWN's own float64 rounding is
covered as in the box (``floatsafe``: u includes depth x 2^-53 in E).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import crown
from .certified_box import (
    _LIRPA_ERRORS,  # the errors auto_LiRPA raises on unsupported graphs
    map_box,
)
from .floatsafe import MARGIN_FACTOR, gamma, unit_roundoff

ENABLED = True  # False: certified_bound keeps the box objectives (benchmarks compare in one process)
ONE_SIDED = True  # False: the spec-row pass also computes the unused lower bounds (benchmarks compare)
ATTRIBUTIONS = ("saliency", "grad_x_input", "ig")
PAIR_BUDGET = 64  # top-k pair rows per sample at most: min(PAIR_BUDGET, max(16, n // 4)) (the box: n rows)
_U64 = unit_roundoff(torch.float64)


@dataclass
class ObjectiveBounds:
    """Per-sample bounds (float64, already padded for float64 rounding); None where not computed.

    euclidean: upper bound on ||g' - g0||_2;  cosine: lower bound on cos(g0, g');
    pairs (P, 3) long [sample, i, j] with m_j - m_i < 0 everywhere on the region (j never reaches i)."""

    euclidean: torch.Tensor
    cosine: torch.Tensor
    pairs: torch.Tensor | None
    rows: int


def _spec_bounds(crown_args: dict, spec: torch.Tensor, extra: dict | None,
                 upper_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """CROWN bounds of the m rows of ``spec`` (rows, m, n); the chunk shrinks when m > n (memory).
    ``upper_only``: the lower bounds are -inf (not computed) where the pass is plain CROWN."""
    args = dict(crown_args)
    if extra:
        args.update(extra)
    n, m = spec.shape[2], spec.shape[1]
    if m > n:
        args["chunk"] = max(1, int(args.get("chunk", 1)) * n // m)
    one_sided = upper_only and not args.get("optimize")
    return crown.crown_gradient(**args, spec=spec, sides="upper" if one_sided else "both")


def spec_upper(crown_args: dict, spec: torch.Tensor, attribution: str, extra: dict | None = None) -> torch.Tensor:
    """(B, m) upper bounds of spec (B, m, n) . a_ex(x') over the region for the EXACT attribution a_ex
    (module docstring: saliency / gradient x input rows of GradNet; IG as sum_s (1/s) ub_s over the path
    rows); NaN read as +inf; float64 rounding of the IG sum added outward."""
    b = spec.shape[0]
    args = dict(crown_args)
    if attribution == "ig":
        args["times_input"] = True
        reps = args["center"].shape[0] // b
        _, ub = _spec_bounds(args, spec.repeat(reps, 1, 1), extra, ONE_SIDED)  # rows (s, sample)
        ub = torch.where(torch.isnan(ub), torch.full_like(ub, float("inf")), ub).view(reps, b, -1)
        w = 1.0 / torch.arange(1, reps + 1, dtype=ub.dtype, device=ub.device).view(reps, 1, 1)
        terms = w * ub  # w > 0: +-inf stay +-inf
        total = terms.sum(dim=0) + gamma(reps + 4, _U64) * terms.abs().sum(dim=0)
        return torch.where(torch.isnan(total), torch.full_like(total, float("inf")), total)
    if bool(args.get("times_input")) != (attribution == "grad_x_input"):
        raise ValueError(f"the recorded GradNet pass does not compute the {attribution} attribution")
    _, ub = _spec_bounds(args, spec, extra, ONE_SIDED)
    return torch.where(torch.isnan(ub), torch.full_like(ub, float("inf")), ub)


def _sum_err(mag: torch.Tensor, terms: int) -> torch.Tensor:
    return gamma(terms + 16, _U64) * mag


def chord_square_bound(
    g0: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, c: torch.Tensor, c_upper: torch.Tensor
) -> torch.Tensor:
    """Upper bound on max ||g' - g0||^2 over L <= g' <= U given c . g' <= c_upper (all (B, n) / (B,)):
    sum_j max_{t in {L_j, U_j}} ((t - g0_j)^2 - c_j t) + c_upper, plus its float64 rounding."""
    n = g0.shape[1]
    dl, du = lower - g0, upper - g0
    hl, hu = dl * dl - c * lower, du * du - c * upper
    h = torch.maximum(hl, hu)
    mag = torch.maximum(dl * dl + (c * lower).abs(), du * du + (c * upper).abs()).sum(dim=1) + c_upper.abs()
    return h.sum(dim=1) + c_upper + _sum_err(mag, n)


def _float_term(c: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
    """MARGIN_FACTOR |c| . E rounded up (c, err (B, m, n) or (B, n))."""
    s = MARGIN_FACTOR * (c.abs() * err).sum(dim=-1)
    return s * (1 + gamma(c.shape[-1] + 4, _U64))


def _sqrt_up(v: torch.Tensor) -> torch.Tensor:
    return v.clamp_min(0).sqrt() * (1 + 4 * _U64)


def objective_bounds(
    crown_args: dict,
    float_error: torch.Tensor,
    g0: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    model_dtype: torch.dtype,
    topk_pairs: bool = True,
    extra: dict | None = None,
    attribution: str = "saliency",
) -> ObjectiveBounds:
    """Chord Euclidean, spec-row cosine and top-k pair certificates (module docstring).

    g0, lower, upper: (B, *in_shape) float64 with lower <= g0 <= upper and lower <= a'(x') <= upper for
    the float attribution a' (saliency | grad_x_input | ig); float_error: E_a, same shape (|a' - a_ex|
    <= E_a); ``extra``: further keyword arguments of ``crown_gradient`` (e.g. an optimisation option).
    One ``crown_gradient`` call with 3 + (pairs) spec rows per sample (IG: per path row)."""
    b = g0.shape[0]
    g, lo, hi, err = (t.reshape(b, -1) for t in (g0, lower, upper, float_error))
    n = g.shape[1]
    c_euc = (lo - g) + (hi - g)
    c_nrm = lo + hi
    rows = [c_euc, c_nrm, -g]  # upper bounds wanted on every row (g0 . g' from below: -(-g0) . g')
    pair_idx, pair_const = None, None
    if topk_pairs and g0.dim() >= 2:
        prow, pair_idx, pair_const = _pair_rows(g0, lower, upper, model_dtype)
    spec = torch.stack(rows, dim=1)
    if pair_idx is not None:
        spec = torch.cat([spec, prow], dim=1)
    ub = spec_upper(crown_args, spec, attribution, extra)  # NaN: no information (+inf)
    ub = ub + _float_term(spec, err.unsqueeze(1))

    # 1. Euclidean
    sq = chord_square_bound(g, lo, hi, c_euc, ub[:, 0])
    euclidean = _sqrt_up(sq)
    euclidean = torch.where(torch.isnan(euclidean), torch.full_like(euclidean, float("inf")), euclidean)
    box_sq = torch.maximum((lo - g) ** 2, (hi - g) ** 2).sum(dim=1)
    euclidean = torch.minimum(euclidean, _sqrt_up(box_sq * (1 + gamma(n + 16, _U64))))

    # 2. cosine
    nrm_sq = chord_square_bound(torch.zeros_like(g), lo, hi, c_nrm, ub[:, 1])
    box_max = (torch.maximum(lo.abs(), hi.abs()) ** 2).sum(dim=1) * (1 + gamma(n + 16, _U64))
    max_norm = _sqrt_up(torch.minimum(nrm_sq, box_max))
    num = -ub[:, 2]  # <g0, g'> >= num (ub already includes the float term, rounded up)
    num = num - gamma(n + 16, _U64) * num.abs()
    norm_g = g.norm(dim=1)
    ng_hi, ng_lo = norm_g * (1 + gamma(n + 16, _U64)), norm_g * (1 - gamma(n + 16, _U64))
    gap = torch.where((lo <= 0) & (hi >= 0), torch.zeros_like(lo), torch.minimum(lo.abs(), hi.abs()))
    min_norm = gap.norm(dim=1) * (1 - gamma(n + 16, _U64))
    tiny = torch.finfo(g.dtype).tiny
    pos = num / (ng_hi * max_norm).clamp_min(tiny) * (1 - 4 * _U64)
    neg = torch.where(
        min_norm > 0, num / (ng_lo * min_norm).clamp_min(tiny) * (1 + 4 * _U64), torch.full_like(num, -1.0)
    )
    cosine = torch.where(num >= 0, pos, neg).clamp(-1.0, 1.0)
    cosine = torch.where(norm_g > 0, cosine, torch.full_like(cosine, -1.0))
    # an unbounded box (huge radii) makes inf - inf: NaN carries no information (and would slip through
    # every comparison), so it reads as the trivial bounds
    euclidean = torch.where(torch.isnan(euclidean), torch.full_like(euclidean, float("inf")), euclidean)
    cosine = torch.where(torch.isnan(cosine), torch.full_like(cosine, -1.0), cosine)

    # 3. top-k pairs: j never reaches i where the pair bound is < 0
    refuted = None
    if pair_idx is not None:
        pub = ub[:, 3:] + pair_const
        pub = pub + 4 * _U64 * (ub[:, 3:].abs() + pair_const.abs())  # the two float64 additions
        ok = pair_idx[..., 0] >= 0
        refuted = pair_idx[ok & (pub < 0)]
    return ObjectiveBounds(euclidean=euclidean, cosine=cosine, pairs=refuted, rows=spec.shape[1])


# ----------------------------------------------------------------------------------------------
# top-k pairs
# ----------------------------------------------------------------------------------------------
def _channels(x: torch.Tensor) -> torch.Tensor:
    """(B, C, N) view of an attribution: channels first ((B, n) -> (B, 1, n))."""
    if x.dim() >= 3:
        return x.flatten(2)
    return x.reshape(x.shape[0], 1, -1)


def box_reach_count(m_lo: torch.Tensor, m_hi: torch.Tensor) -> torch.Tensor:
    """(B, N): #{j != i : m_hi_j >= m_lo_i} (entries j the box lets reach i)."""
    srt = m_hi.sort(dim=1).values.contiguous()
    below = torch.searchsorted(srt, m_lo.contiguous(), right=False)  # #{j : m_hi_j < m_lo_i}
    return m_hi.shape[1] - below - 1  # minus i itself (m_hi_i >= m_lo_i)


def _pair_rows(g0, lower, upper, model_dtype):
    """Spec rows (B, P, n), indices (B, P, 3) (-1 padding) and constants (B, P) of the pair bounds
    m_j - m_i <= row . g' + const (module docstring, 3), const including the channel-sum rounding."""
    b = g0.shape[0]
    lo, hi = _channels(lower), _channels(upper)  # (B, C, N)
    ch, nn_ = lo.shape[1], lo.shape[2]
    width = hi - lo
    slope = torch.where(width > 0, (hi.abs() - lo.abs()) / width.clamp_min(torch.finfo(lo.dtype).tiny),
                        torch.sign(lo))
    slope = slope.clamp(-1.0, 1.0)
    inter = torch.maximum(lo.abs() - slope * lo, hi.abs() - slope * hi)
    inter = inter + 4 * _U64 * (lo.abs() + hi.abs())
    b_const = inter.sum(dim=1) * (1 + gamma(ch + 4, _U64))  # (B, N)
    sign = torch.where(lo >= 0, torch.ones_like(lo), torch.where(hi <= 0, -torch.ones_like(lo), torch.zeros_like(lo)))
    m_lo, m_hi = map_box(lower, upper)
    m_x = _channels(g0).abs().sum(dim=1)
    count = box_reach_count(m_lo, m_hi)
    cand_rank = torch.where(count > 0, count.double(), torch.full_like(count, float("inf"), dtype=torch.float64))
    # entries in the top of m(x) first among ties of the count
    order_key = cand_rank * (nn_ + 1) + m_x.argsort(dim=1, descending=True).argsort(dim=1).double()
    order = order_key.argsort(dim=1)
    budget = min(PAIR_BUDGET, max(16, g0[0].numel() // 4), nn_ * (nn_ - 1))
    cnt = count.gather(1, order)  # (B, N) in candidate order
    finite = torch.isfinite(cand_rank.gather(1, order))
    chosen = (cnt.cumsum(1) <= budget) & (cnt > 0) & finite  # a prefix of the order per sample
    bi, ri = chosen.nonzero(as_tuple=True)  # (sample, rank) of every chosen entry i
    if bi.numel() == 0:
        return None, None, None
    ii_sel = order[bi, ri]
    reach = m_hi[bi] >= m_lo[bi, ii_sel].unsqueeze(1)  # (chosen, N)
    reach[torch.arange(bi.shape[0], device=g0.device), ii_sel] = False
    ci, pj = reach.nonzero(as_tuple=True)  # sorted by chosen row, hence by sample
    ps, pi = bi[ci], ii_sel[ci]
    per = torch.bincount(ps, minlength=b)
    used = int(per.max())
    start = torch.cumsum(per, 0) - per
    pos = torch.arange(ps.shape[0], device=g0.device) - start[ps]
    idx_all = torch.full((b, used, 3), -1, dtype=torch.long, device=g0.device)
    idx_all[ps, pos] = torch.stack([ps, pi, pj], dim=1)
    valid = idx_all[..., 0] >= 0
    ii, jj = idx_all[..., 1].clamp_min(0), idx_all[..., 2].clamp_min(0)
    # row (B, P, C, N): + slope at j's channels, - sign at i's channels
    rows = torch.zeros(b, used, ch, nn_, dtype=lo.dtype, device=lo.device)
    bidx = torch.arange(b, device=lo.device).view(b, 1).expand(b, used)
    pidx = torch.arange(used, device=lo.device).view(1, used).expand(b, used)
    sl_j = slope.permute(0, 2, 1)[bidx, jj]  # (B, P, C)
    sg_i = sign.permute(0, 2, 1)[bidx, ii]
    rows.permute(0, 1, 3, 2)[bidx, pidx, jj] = sl_j
    rows.permute(0, 1, 3, 2)[bidx, pidx, ii] -= sg_i
    rows = rows * valid.view(b, used, 1, 1)
    const = b_const.gather(1, jj)
    if ch > 1:  # the user's float channel sum: |fl(m) - m| <= gamma_{C} m in the model's dtype
        gm = gamma(ch, unit_roundoff(model_dtype))
        const = const + gm * (m_hi.gather(1, ii) + m_hi.gather(1, jj)) * (1 + 4 * _U64)
    n = g0[0].numel()
    return rows.reshape(b, used, ch * nn_).reshape(b, used, n), idx_all, const


def pair_certified_count(
    m_lo: torch.Tensor, m_hi: torch.Tensor, pairs: torch.Tensor | None
) -> torch.Tensor:
    """(B, N): #{j != i that can reach i} using the box and the refuted pairs (sample, i, j)."""
    count = box_reach_count(m_lo, m_hi)
    if pairs is None or pairs.numel() == 0:
        return count
    s, i, j = pairs[:, 0], pairs[:, 1], pairs[:, 2]
    box_reach = m_hi[s, j] >= m_lo[s, i]  # only pairs the box counted
    refuted = torch.zeros_like(count)
    refuted.index_put_((s[box_reach], i[box_reach]), torch.ones_like(s[box_reach]), accumulate=True)
    return count - refuted


# ----------------------------------------------------------------------------------------------
# entry used by certified_bound
# ----------------------------------------------------------------------------------------------
def sharpen(
    state: dict,
    attribution: str,
    g0: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    model_dtype: torch.dtype,
    details: dict,
    extra: dict | None = None,
) -> ObjectiveBounds | None:
    """``objective_bounds`` where ``bound_box`` left a CROWN pass to reuse, else None (the box
    objectives stay; ``details["objectives"]`` says why).  A failing auto_LiRPA call is recorded and
    also leaves the box objectives (still sound)."""
    if not ENABLED:
        details["objectives"] = {"used": "box", "why": "objectives.ENABLED is False"}
        return None
    if attribution not in ATTRIBUTIONS:
        details["objectives"] = {"used": "box", "why": f"no spec-row objectives for {attribution}"}
        return None
    err = state.get("attr_error")
    if err is None and attribution == "saliency":
        err = state.get("float_error")
    if state.get("crown_args") is None or err is None:
        details["objectives"] = {"used": "box", "why": "no CROWN gradient pass (method ibp or CROWN failed)"}
        return None
    try:
        return objective_bounds(state["crown_args"], err, g0, lower, upper, model_dtype, extra=extra,
                                attribution=attribution)
    except _LIRPA_ERRORS as exc:
        details["objectives"] = {"used": "box", "why": f"{type(exc).__name__}: {exc}"[:300]}
        return None
