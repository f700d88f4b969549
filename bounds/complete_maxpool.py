"""Max-pool routing as ReLU phases: a max-pool window rewritten as a ReLU sub-network (``bounds.complete``).

Rewrite.  A window of a ``MaxPool`` whose inputs are >= 0 (post-ReLU) holds its valid entries
a_1 .. a_n in torch's scan order (row-major over the kernel, dilation applied, padded positions left out:
torch's CPU kernel clamps the window to the image, so padding (-inf) never wins and is never visited).
Pairwise tournament, level by level: the values of a level are paired in order, (v_1, v_2), (v_3, v_4),
...; a pair becomes

    combine(L, R) = relu(L) + relu(R - L)        ("pass" unit relu(L), "diff" unit relu(R - L)),

an odd last value is carried as a "pass" unit relu(V); after D = ceil(log2 n_max) levels every window
holds one value, a linear form of the last level's units (the matrix C, folded into the next affine op).
Each level is one hidden layer of the ``ReluMLP`` (a ``Piece`` with exact small-integer weights 0 / +-1).
L is the max of a sub-window of entries >= 0, so relu(L) = L, and combine(L, R) = max(L, R): the
rewritten net computes the max-pool exactly in real arithmetic.  Every node's left subtree holds earlier
entries than its right one.

Torch's phase of a virtual unit (the phase the branch-and-bound must cover at x').  With fa the float
entries torch computes at x' (fa_j >= 0) and fM_S = max_{j in S} fa_j (torch's max returns one of its
float inputs: exact):  pass unit of sub-window S:  active iff fM_S > 0;  diff unit (L, R):  active iff
fM_R - fM_L > 0, i.e. iff fM_R > fM_L (exact comparison of floats).  With these phases P(x'):

  Gradient identity (autograd on the real net == leaf gradient of the rewritten net with pattern P).
  Torch's max_pool2d backward sends the upstream v_w of window w to the FIRST maximal entry of w in scan
  order (``test_complete_maxpool`` checks this on CPU with autograd, ties, overlap, padding, dilation)
  and adds the windows' contributions per entry; the entry's ReLU then multiplies by relu'(z_j) =
  [fz_j > 0] = [fa_j > 0].  Claim, by induction over the tree: for a node N with upstream u on its
  value, the rewritten net's contribution to every entry j of N with fa_j > 0 is u if j is the first
  maximum of N's sub-window, else 0 (entries with fa_j = 0 are multiplied by relu'(z_j) = 0 afterwards,
  whatever reaches them).  Leaf: u.  Node combine(L, R), coefficient u (d_p - d_d) on L and u d_d on R
  (d_p, d_d the phases of its pass and diff units): if fM_R > fM_L (d_d = 1) torch's first maximum is
  R's (R's entries come later, strict inequality), R gets u; L gets 0 when d_p = 1, and when d_p = 0,
  fM_L = 0, so L has no entry with fa > 0 (vacuous).  If fM_R <= fM_L (d_d = 0): the first maximum is
  L's (earlier, >=), R gets 0, L gets u d_p: u when fM_L > 0, and when fM_L = 0 then fM_R = 0 and the
  node has no entry with fa > 0.  A carry relu(V) passes u d_p likewise.  So the rewritten net's
  gradient with pattern P equals torch's max-pool gradient in exact arithmetic at EVERY point (ties,
  all-zero windows included).

  Margins (``complete_mlp.margins`` with the virtual ``Piece``s).  The "float value" of a virtual unit is
  the real-arithmetic function of torch's float entries above (fM_S, relu(fM_R - fM_L)); the exact value
  is the same function of the exact entries.  max is 1-Lipschitz in the sup norm, so |fM_S - eM_S| <=
  max_{j in S} |fa_j - ea_j| <= sum_j |fa_j - ea_j|, and |(fM_R - fM_L) - (eM_R - eM_L)| <= err_R + err_L;
  ``_piece_error``'s recursion err' = |A| err + ... with |A| the 0/1 pattern of the forms gives at least
  these sums (a pass unit of level l >= 2 is relu(pass) + relu(diff) of the level below: err_pass +
  err_diff >= err of the max).  Its gamma term gamma_{fan_in+2}(|A| |h|) over-estimates a rounding that
  does not happen (virtual ops are exact), as does the one of C.  Hence float z > 0 => exact z >= -m and
  float z <= 0 => exact z <= m for virtual units too: the split rule, the pattern-vs-exact discrepancy of
  ``complete_leaf`` and every proof of ``bounds.complete`` carry over unchanged.

  Gradient float error (``gradient_float_error``).  Torch's real rounding in the max-pool backward is the
  per-entry sum of the routed contributions of the c_j windows containing entry j (any order: Higham
  gamma_{c_j}).  In the rewritten net entry j is reached from every window containing it through a path
  of coefficients +-1, so |A_1|^T ... |C|^T err >= sum of the windows' upstream errors, and the level-1
  piece's term gamma_{fan_out+2} |A_1|^T |v| has fan_out = max column count of A_1 >= c_j (every window
  containing j has a level-1 unit reading j) and |A_1|^T |v| >= sum_w |v_w|: the bound covers it.

Derived phases (``derive_phases``).  Torch's phases are tied: pass(S) is active iff some entry of S is
active (fa_j > 0 iff fz_j > 0: relu is exact), and a diff (L, R) is inactive when every entry of R is
inactive (fM_R = 0 <= fM_L) and active when every entry of L is inactive and one of R is active.  These
implications hold at every point of a subdomain (its phases hold for torch at each of its points), so
``bounds.complete`` fills the implied phases, drops subdomains whose phases contradict them (no point
of the ball can have such a torch pattern) and never branches on pass units (``mask_branch``: a free pass
unit always has a free entry below it).  Without this, a split pass / diff unit whose entries are all
inactive would be an identically-zero row of the leaf program ("unsure", its value kept: sound but the
gap would not close).  ``leaf_splits`` leaves the implied virtual units out of the leaf program's rows
(a superset of the leaf: "empty" proofs stay valid; witnesses are scored on the real net anyway).
On a leaf (every phase known) ``order_clash`` also drops patterns whose routing is impossible for torch:
each diff unit states fa_win(L) < fa_win(R) or fa_win(R) <= fa_win(L) between the first maxima of its
children (fixed by the leaf's phases), each entry 0 < fa_j or fa_j = 0; floats are totally ordered and
torch compares them exactly, so a cycle through a strict relation (found as a strict edge inside a
strongly connected component) means no point of the ball has that pattern.  Overlapping windows share
their identical units (``pool_tree``), else two copies of one comparison could take contradicting splits.
Such contradictions are feasible for the margin-widened leaf program (all entries equal) and would be
kept as "unsure" leaves: measured on a 4x4 CNN with 3x3 windows (stride 1, padding 1), 108 unsure leaves
and no gap closure before, 837 subdomains to a closed gap after.  Pools on pools are rewritten too, but
only pools on a real ReLU layer get the order check (sound either way: it only drops subdomains).

Sizes.  Level 1 has about one unit per window entry, level 2 half as many, ...: a pool with W windows of
k entries adds at most ~2 W k hidden units (fewer with overlap: shared units) over ceil(log2 k) layers,
each a dense float64 matrix.  Practical: inputs up to a few hundred pixels with a few channels (the
1x8x8 net of benchmarks/bench_complete_maxpool.py, conv 3x3 with 3 channels and a 2x2 pool: 108 conv
units, 108 + 54 virtual ones, 0.2 MB; gap closed on 4/4, 2/4, 3/4 samples at l_inf 0.01, 0.03, 0.05
with 5 s each).  certattr's lenet5 / madry-cnn on MNIST would need about 7.5 / 11.8 GB: ``complete_net``
refuses them by name against ``max_memory_mb`` (``branching="auto"`` then uses input branching).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .complete_mlp import DT, Piece, ReluMLP
from .gradgraph import MaxPool


@dataclass
class PoolTree:
    """The rewrite of one ``MaxPool`` (positions are indices into its flattened input / level vectors).

    levels:  per level, (rows, cols, vals, n_units) of its sparse matrix A_l (units_l x units_{l-1})
    final:   (rows, cols, vals) of C (windows x units_D)
    passes:  per level, list of (unit, members)  (members: input positions of the sub-window)
    diffs:   per level, list of (unit, left members, right members)
    out_members: per window, its input positions."""

    levels: list
    final: tuple
    passes: list
    diffs: list
    out_members: list
    n_in: int
    n_out: int


def window_entries(op: MaxPool) -> list[list[int]]:
    """Valid entries of every window (output row-major (c, oh, ow)) in torch's scan order."""
    c, h, w = op.in_shape
    _, ho, wo = op.out_shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = op.kernel, op.stride, op.padding, op.dilation
    out = []
    for ch in range(c):
        for oh in range(ho):
            for ow in range(wo):
                ent = []
                for i in range(kh):
                    ih = oh * sh - ph + i * dh
                    if not 0 <= ih < h:
                        continue
                    for j in range(kw):
                        iw = ow * sw - pw + j * dw
                        if 0 <= iw < w:
                            ent.append((ch * h + ih) * w + iw)
                out.append(ent)
    return out


def pool_tree(op: MaxPool) -> PoolTree:
    """The tournament rewrite of ``op`` (module docstring).  A node is determined by its level and its
    ordered entry list (the tournament splits it at 2^(level-1)), so units of overlapping windows that
    compute the same function are built once (one unit, one phase: two copies could take contradicting
    splits that only the float margins separate, which no leaf program could prove empty).  Construction
    only (once per call)."""
    wins = window_entries(op)
    if any(not e for e in wins):  # pragma: no cover - torch requires padding <= kernel / 2
        raise ValueError("a max-pool window without valid entries")
    depth = max(math.ceil(math.log2(len(e))) for e in wins)
    cur = [[((j,), [(j, 1.0)]) for j in e] for e in wins]  # per window: (entries, linear form)
    levels, passes, diffs = [], [], []
    for _ in range(depth):
        rows, cols, vals, lp, ld = [], [], [], [], []
        units: dict = {}

        def unit(key, terms, units=units, rows=rows, cols=cols, vals=vals) -> tuple[int, bool]:
            """(unit index, newly built) of the unit ``key`` = relu(terms)."""
            if key in units:
                return units[key], False
            u = units[key] = len(units)
            for cc, v in terms:
                rows.append(u)
                cols.append(cc)
                vals.append(v)
            return u, True

        for wi, f in enumerate(cur):
            nxt = []
            for i in range(0, len(f) - 1, 2):
                (el, fl), (er, fr) = f[i], f[i + 1]
                p, new = unit(("p", el), fl)
                if new:
                    lp.append((p, list(el)))
                d, new = unit(("d", el, er), fr + [(cc, -v) for cc, v in fl])
                if new:
                    ld.append((d, list(el), list(er)))
                nxt.append((el + er, [(p, 1.0), (d, 1.0)]))
            if len(f) % 2:
                e, fe = f[-1]
                p, new = unit(("p", e), fe)
                if new:
                    lp.append((p, list(e)))
                nxt.append((e, [(p, 1.0)]))
            cur[wi] = nxt
        levels.append((rows, cols, vals, len(units)))
        passes.append(lp)
        diffs.append(ld)
    frows, fcols, fvals = [], [], []
    for wi, f in enumerate(cur):
        for cc, v in f[0][1]:
            frows.append(wi)
            fcols.append(cc)
            fvals.append(v)
    n_in = int(math.prod(op.in_shape))
    outs = [list(f[0][0]) for f in cur]
    return PoolTree(levels, (frows, fcols, fvals), passes, diffs, outs, n_in, len(wins))


def tree_piece(rows, cols, vals, n_rows: int, n_cols: int) -> Piece:
    """A virtual op as a dense float64 ``Piece`` (exact 0 / +-1 weights, zero bias).  fan_in / fan_out: the
    largest number of nonzeros per row / column (at level 1 the column count is >= the number of windows
    containing the entry: the per-entry sum of torch's max-pool backward)."""
    w = torch.zeros(n_rows, n_cols, dtype=DT)
    r, c = torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)
    w[r, c] = torch.tensor(vals, dtype=DT)
    nz = w != 0
    fan_in = max(1, int(nz.sum(dim=1).max())) if n_rows else 1
    fan_out = max(1, int(nz.sum(dim=0).max())) if n_cols else 1
    zeros = torch.zeros(n_rows, dtype=DT)
    return Piece(w, zeros, zeros.clone(), fan_in, fan_out)


@dataclass
class Routing:
    """Global unit indices (into the flat unit vector) of the virtual units and their sub-windows as real
    ReLU units (padded with ``units``: a column of -1 appended by ``derive_phases``)."""

    pass_units: torch.Tensor  # (P,)
    pass_members: torch.Tensor  # (P, K)
    diff_units: torch.Tensor  # (Q,)
    diff_left: torch.Tensor  # (Q, K)
    diff_right: torch.Tensor  # (Q, K)
    orders: list | None = None  # ``OrderTree`` per pool applied directly to a real ReLU layer

    @property
    def virtual(self) -> torch.Tensor:
        return torch.cat([self.pass_units, self.diff_units])


@dataclass
class OrderTree:
    """One pool's diff units in level order with their children: an entry (a real unit's global index) or
    an earlier diff unit of the same pool (its position in this list); ``levels``: (start, end) slices."""

    units: torch.Tensor  # (Q,) global unit indices
    left_entry: torch.Tensor  # (Q,) bool
    left: torch.Tensor  # (Q,) real unit index if left_entry else position in this list
    right_entry: torch.Tensor
    right: torch.Tensor
    levels: list
    entries: torch.Tensor  # the pool's real input units


def order_tree(tree: PoolTree, members: list, level_offsets: list[int]) -> OrderTree:
    """``members``: real unit (global index) of each pool input position (a pool on a real ReLU layer);
    ``level_offsets``: global index of each level's first unit."""
    pos, rows, levels = {}, [], []
    for ld, off in zip(tree.diffs, level_offsets):
        start = len(rows)
        for u, el, er in ld:
            pos[tuple(el + er)] = len(rows)
            rows.append((off + u, el, er))
        levels.append((start, len(rows)))

    def child(e):
        return (True, members[e[0]][0]) if len(e) == 1 else (False, pos[tuple(e)])

    def cols(cs):
        flags = torch.tensor([c[0] for c in cs], dtype=torch.bool)
        return flags, torch.tensor([c[1] for c in cs], dtype=torch.long)

    le, li = cols([child(el) for _, el, _ in rows])
    re_, ri = cols([child(er) for _, _, er in rows])
    ents = torch.tensor(sorted({members[j][0] for j in range(tree.n_in)}), dtype=torch.long)
    return OrderTree(torch.tensor([r[0] for r in rows], dtype=torch.long), le, li, re_, ri, levels, ents)


def _winners(ot: OrderTree, ph: torch.Tensor):
    """(R, Q) first-maximum entry of the left and right child of every diff unit under fully known
    phases (a node's winner: its right child's if its diff unit is active, else its left child's)."""
    r, q = ph.shape[0], ot.units.numel()
    win = torch.zeros(r, max(q, 1), dtype=torch.long)
    wl, wr = torch.zeros_like(win), torch.zeros_like(win)
    for a, b in ot.levels:
        for side, is_e, idx in ((wl, ot.left_entry, ot.left), (wr, ot.right_entry, ot.right)):
            e, i = is_e[a:b], idx[a:b]
            side[:, a:b] = torch.where(e, i, win.gather(1, torch.where(e, 0, i).expand(r, -1)))
        win[:, a:b] = torch.where(ph[:, ot.units[a:b]] > 0, wr[:, a:b], wl[:, a:b])
    return wl[:, :q], wr[:, :q]


def order_clash(mlp: ReluMLP, ph: torch.Tensor) -> torch.Tensor:
    """(R,) True where fully known phases ``ph`` (R, units) are impossible for torch: the relations they
    state between float entries, a diff unit active: fa_win(L) < fa_win(R), inactive: fa_win(R) <=
    fa_win(L), an entry active: 0 < fa_j, inactive: fa_j = 0, contain a cycle through a strict relation
    (floats are totally ordered and torch's comparisons are exact).  Such leaves hold no point of the ball
    with their pattern (e.g. a > b in one window, b >= c, c >= a in overlapping ones), but their
    margin-widened leaf program is feasible (all equal) and could never prove it."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    rt = getattr(mlp, "routing", None)
    out = torch.zeros(ph.shape[0], dtype=torch.bool)
    if rt is None or not rt.orders or ph.shape[0] == 0:
        return out
    wins = [_winners(ot, ph) for ot in rt.orders]
    ents = torch.cat([ot.entries for ot in rt.orders])
    zero = mlp.units  # node of the value 0
    for i in range(ph.shape[0]):
        e_on = ph[i, ents] > 0
        src_s, dst_s = [torch.full_like(ents[e_on], zero)], [ents[e_on]]
        off = ents[~e_on]
        src_w, dst_w = [off, torch.full_like(off, zero)], [torch.full_like(off, zero), off]
        for ot, (wl, wr) in zip(rt.orders, wins):
            on = ph[i, ot.units] > 0
            src_s.append(wl[i][on])
            dst_s.append(wr[i][on])
            src_w.append(wr[i][~on])
            dst_w.append(wl[i][~on])
        ss, ds, sw, dw = (torch.cat(t).numpy() for t in (src_s, dst_s, src_w, dst_w))
        n = zero + 1
        src, dst = np.concatenate([ss, sw]), np.concatenate([ds, dw])
        g = csr_matrix((np.ones(src.size), (src, dst)), shape=(n, n))
        _, lab = connected_components(g, directed=True, connection="strong")
        out[i] = bool((lab[ss] == lab[ds]).any())
    return out


@dataclass
class PooledMLP(ReluMLP):
    """A ``ReluMLP`` some of whose hidden layers are max-pool trees (``routing``)."""

    routing: Routing | None = None


def build_routing(records: list, units: int, orders: list | None = None) -> Routing:
    """``records``: (unit, members) for passes and (unit, left, right) for diffs, units and members as
    global indices (members: real ReLU units) -> ``Routing``."""
    ps = [r for r in records if len(r) == 2]
    ds = [r for r in records if len(r) == 3]
    width = max([len(m) for r in records for m in r[1:]] + [1])

    def pad(lists):
        out = torch.full((len(lists), width), units, dtype=torch.long)
        for i, m in enumerate(lists):
            out[i, : len(m)] = torch.tensor(m, dtype=torch.long)
        return out

    def gid(rs):
        return torch.tensor([r[0] for r in rs], dtype=torch.long)

    return Routing(gid(ps), pad([r[1] for r in ps]), gid(ds), pad([r[1] for r in ds]),
                   pad([r[2] for r in ds]), orders)


def _implied(rt: Routing, ph: torch.Tensor):
    """Phases of the virtual units implied by the real units' phases in ``ph`` (0: not implied)."""
    ext = torch.cat([ph, torch.full((ph.shape[0], 1), -1, dtype=ph.dtype)], dim=1)

    def any_on(m):
        return (ext[:, m] > 0).any(dim=2)

    def all_off(m):
        return (ext[:, m] < 0).all(dim=2)

    one, zero = torch.ones((), dtype=ph.dtype), torch.zeros((), dtype=ph.dtype)
    pm = rt.pass_members
    p_imp = torch.where(any_on(pm), one, torch.where(all_off(pm), -one, zero))
    r_off, l_off, r_on = all_off(rt.diff_right), all_off(rt.diff_left), any_on(rt.diff_right)
    d_imp = torch.where(r_off, -one, torch.where(l_off & r_on, one, zero))
    return p_imp, d_imp


def derive_phases(mlp: ReluMLP, ph: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, units) phases -> (phases with the implied virtual phases filled, (S,) mask of subdomains whose
    known phases contradict the implications: empty).  Identity for networks without max-pool."""
    rt = getattr(mlp, "routing", None)
    clash = torch.zeros(ph.shape[0], dtype=torch.bool)
    if rt is None or ph.shape[0] == 0:
        return ph, clash
    p_imp, d_imp = _implied(rt, ph)
    out = ph.clone()
    for units, imp in ((rt.pass_units, p_imp), (rt.diff_units, d_imp)):
        cur = out[:, units]
        clash |= ((cur != 0) & (imp != 0) & (cur != imp)).any(dim=1)
        out[:, units] = torch.where(cur != 0, cur, imp)
    full = (out != 0).all(dim=1) & ~clash
    if full.any():
        clash[full] = order_clash(mlp, out[full])
    return out, clash


def leaf_splits(mlp: ReluMLP, ph: torch.Tensor, splits: torch.Tensor) -> torch.Tensor:
    """One subdomain's splits without the virtual units whose phase the real units' phases imply (their
    leaf-program rows may be identically zero; the implication already holds at every point)."""
    rt = getattr(mlp, "routing", None)
    if rt is None:
        return splits
    real = ph.clone().unsqueeze(0)
    real[:, rt.virtual] = 0
    p_imp, d_imp = _implied(rt, real)
    out = splits.clone()
    out[rt.pass_units[p_imp[0] != 0]] = 0
    out[rt.diff_units[d_imp[0] != 0]] = 0
    return out


def mask_branch(mlp: ReluMLP, scores: torch.Tensor) -> torch.Tensor:
    """Branching scores with the pass units excluded (their phase follows from the entries)."""
    rt = getattr(mlp, "routing", None)
    if rt is None or rt.pass_units.numel() == 0:
        return scores
    out = scores.clone()
    out[:, rt.pass_units] = -float("inf")
    return out


def torch_pattern(mlp: ReluMLP, pre: list[torch.Tensor]) -> torch.Tensor:
    """(B, units) torch's pattern from float pre-activations ``pre`` of the REAL hidden layers (a list over
    hidden layers, None for virtual layers): real units [z > 0]; virtual units by their definition (module
    docstring) from the real entries' float values.  For tests and diagnostics."""
    rt = getattr(mlp, "routing", None)
    b = next(p for p in pre if p is not None).shape[0]
    vals = torch.zeros(b, mlp.units + 1, dtype=DT)
    vals[:, -1] = -float("inf")
    ph = torch.full((b, mlp.units), -1, dtype=torch.int8)
    for k, z in enumerate(pre):
        if z is not None:
            sl = slice(mlp.offsets[k], mlp.offsets[k] + mlp.widths[k])
            vals[:, sl] = z.to(DT).clamp_min(0)
            ph[:, sl] = torch.where(z > 0, 1, -1).to(torch.int8)
    if rt is None:
        return ph

    def mx(m):
        return vals[:, m].amax(dim=2)

    ph[:, rt.pass_units] = torch.where(mx(rt.pass_members) > 0, 1, -1).to(torch.int8)
    ph[:, rt.diff_units] = torch.where(mx(rt.diff_right) > mx(rt.diff_left), 1, -1).to(torch.int8)
    return ph
