"""A ReLU MLP in float64 for branch-and-bound: split-aware pre-activation bounds, gradient boxes,
exact leaf gradients (used by ``bounds.complete``; leaf programs: ``complete_leaf``).  ReLU CNNs enter
as dense MLPs (``complete_net``): each hidden layer's weight is the exact float64 matrix of its affine
ops, and ``ReluMLP.pieces`` keeps the ops torch evaluates separately for the float margins.

Network  z_1 = W_1 x + b_1,  z_k = W_k relu(z_{k-1}) + b_k (k = 2..K),  f = W_{K+1} relu(z_K) + b_{K+1}.
Its saliency is  g(x) = W_1^T D_1 W_2^T D_2 ... W_K^T D_K w,  w = W_{K+1}[y],  D_k = diag(relu'(z_k)),
relu'(0) = 0 (autograd).  A *subdomain* is a vector s over all hidden units (layer-major) with
s_i = +1 ("active": torch's float z_i > 0), -1 ("inactive": float z_i <= 0) or 0 (free).

Float contract (SPEC 9.1).  Everything here is float64 real-arithmetic reasoning about the model's
(float32) weights; torch evaluates the model in its own dtype.  ``margins`` gives, per unit, an
absolute bound m_i on |float z_i(x') - exact z_i(x')| (Higham: any-order inner product of k terms errs
by <= gamma_k sum |w||h|; layer errors propagate through |W|).  Hence
    float z_i > 0  =>  exact z_i > -m_i,      float z_i <= 0  =>  exact z_i <= m_i,
so the split "active" is the exact set {z_i >= -m_i} and "inactive" is {z_i <= m_i}: together they cover
every point *with the phase torch picks there*, and a unit is stable only when exact l_i > m_i (always
active) or u_i < -m_i (always inactive).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .gradgraph import Chain

DT = torch.float64
_OWN_ROUNDING = 1e-12  # relative slack for our own float64 arithmetic (depth * 2^-53, generously)


@dataclass
class Piece:
    """One affine op as torch evaluates it: dense float64 ``weight`` (out, in) on flattened vectors,
    ``bias``, ``bias_mag`` (>= |bias|: the magnitude torch's evaluation rounds, a folded BatchNorm's
    parts before they cancel), ``fan_in`` (terms per output entry of the forward inner product: in
    for Linear, C_in kh kw for Conv2d) and ``fan_out`` (terms per entry of the backward W^T v)."""

    weight: torch.Tensor
    bias: torch.Tensor
    bias_mag: torch.Tensor
    fan_in: int
    fan_out: int


@dataclass
class ReluMLP:
    """Weights (float64) of a ReLU MLP; ``widths`` of the K hidden layers; ``offsets`` into the flat
    unit vector; ``unit_roundoff`` of the model's dtype; ``pieces``: per layer (K + 1 of them) the
    affine ops torch evaluates separately whose product is ``weights[k]`` (``complete_net``; None:
    one Linear per layer)."""

    weights: list[torch.Tensor]
    biases: list[torch.Tensor]
    widths: list[int]
    offsets: list[int]
    unit_roundoff: float
    pieces: list | None = None

    @property
    def n(self) -> int:
        return int(self.weights[0].shape[1])

    @property
    def units(self) -> int:
        return int(sum(self.widths))

    def layer(self, s: torch.Tensor, k: int) -> torch.Tensor:
        """The slice of a (S, units) tensor that belongs to hidden layer k (0-based)."""
        return s[:, self.offsets[k] : self.offsets[k] + self.widths[k]]

    def layer_pieces(self, k: int) -> list[Piece]:
        """The ops of layer k (k = K: the output layer) in evaluation order."""
        if self.pieces is not None:
            return self.pieces[k]
        w, b = self.weights[k], self.biases[k]
        return [Piece(w, b, b.abs(), int(w.shape[1]), int(w.shape[0]))]


def relu_mlp_from_chain(chain: Chain, dtype: torch.dtype) -> ReluMLP:
    """ReLU networks without max-pooling as a dense ``ReluMLP`` (``complete_net.relu_mlp_from_chain``);
    ``checks.PhaseBranchingUnsupported`` for anything else."""
    from .complete_net import relu_mlp_from_chain as convert

    return convert(chain, dtype)


def _gamma(k: int, u: float) -> float:
    return k * u / (1.0 - k * u)


# ----------------------------------------------------------------------------------------------
# float margins
# ----------------------------------------------------------------------------------------------
def _piece_error(p: Piece, err, lo, hi, u: float):
    """Forward error through one affine op: (err', lo', hi') with lo', hi' bounding the float value.
    err' = |W| err + (2 gamma_{fan_in+2} + 1e-6) (|W| |h|max + |b|parts) + 1e-7."""
    w = p.weight
    h_abs = torch.maximum(lo.abs(), hi.abs())
    g = 2 * _gamma(p.fan_in + 2, u) + 1e-6
    err = w.abs() @ err + g * (w.abs() @ h_abs + p.bias_mag) + 1e-7
    mid, rad = (hi + lo) / 2, (hi - lo) / 2
    c, r = w @ mid + p.bias, w.abs() @ rad
    return err, c - r - err, c + r + err


def margins(mlp: ReluMLP, xl: torch.Tensor, xu: torch.Tensor) -> list[torch.Tensor]:
    """Per hidden layer k, m_k >= |float z_k(x') - exact z_k(x')| for every x' in [xl, xu].

    Per affine op p of the layer (``Piece``; a Linear, or a Conv2d with its true fan-in C kh kw):
    E_p = |W_p| E_{p-1} + 2 gamma_{fan_in+2} (|W_p| H_{p-1} + |b_p|parts), E_0 = 0 (x is exact), with
    H >= |float value| from interval bounds (widened by E; relu is 1-Lipschitz and exact in floats).
    The factor 2 absorbs second-order terms; + 1e-6 relative covers the rounding of a BatchNorm folded
    into the weights (about 2^-24 relative per weight), of its separate float ops and of our float64
    products of consecutive ops' matrices (``complete_net``); + 1e-7 absolute per op (underflow)."""
    u = mlp.unit_roundoff
    lo, hi = xl, xu
    err = torch.zeros_like(xl)
    out = []
    for k in range(len(mlp.widths)):
        for p in mlp.layer_pieces(k):
            err, lo, hi = _piece_error(p, err, lo, hi, u)
        out.append(err)
        lo, hi = lo.clamp_min(0), hi.clamp_min(0)
    return out


def output_error(mlp: ReluMLP, marg_last: torch.Tensor, h_hi: torch.Tensor) -> torch.Tensor:
    """Bound on |float logits - exact logits| given the last hidden layer's margin ``marg_last`` and an
    upper bound ``h_hi`` (>= 0) on relu of its exact pre-activations (the same recursion as ``margins``)."""
    lo, hi = torch.zeros_like(h_hi), h_hi + marg_last
    err = marg_last
    for p in mlp.layer_pieces(len(mlp.widths)):
        err, lo, hi = _piece_error(p, err, lo, hi, mlp.unit_roundoff)
    return err


def gradient_float_error(mlp: ReluMLP, target: int) -> torch.Tensor:
    """(n,) bound on |float g(x') - exact g_D| for the pattern D torch picks at x':
    autograd's backward pass v <- W_p^T v (a matmul, or a transposed convolution summing C_out kh kw
    terms per entry) rounds only in the products by W (D is exact 0/1), so per op
    F <- |W_p|^T F + gamma_{fan_out+2} |W_p|^T |v| with |v| <= |W|^T ... |e_y|; the first op (applied
    to the one-hot e_y: one nonzero term per entry) is exact; gamma doubled (second-order terms)
    + 1e-6 relative slack."""
    u = mlp.unit_roundoff
    v_abs = torch.zeros(mlp.weights[-1].shape[0], dtype=DT)
    v_abs[target] = 1.0
    err = torch.zeros_like(v_abs)
    first = True
    for k in range(len(mlp.widths), -1, -1):
        for p in reversed(mlp.layer_pieces(k)):
            wa = p.weight.abs().t()
            g = 0.0 if first else 2 * _gamma(p.fan_out + 2, u) + 1e-6
            err = wa @ err + g * (wa @ v_abs)
            first = False
            v_abs = wa @ v_abs
    return err + 1e-12


# ----------------------------------------------------------------------------------------------
# pre-activation bounds under splits (interval + CROWN), batched over subdomains
# ----------------------------------------------------------------------------------------------
def _relax(lo: torch.Tensor, hi: torch.Tensor):
    """CROWN relaxation of relu on [l, u]: upper slope/intercept (chord), lower slope (0 or 1)."""
    active, inactive = lo >= 0, hi <= 0
    unst = ~(active | inactive)
    width = (hi - lo).clamp_min(1e-300)
    su = torch.where(active, torch.ones_like(lo), torch.where(unst, hi / width, torch.zeros_like(lo)))
    iu = torch.where(unst, -lo * hi / width, torch.zeros_like(lo))
    sl = torch.where(
        active, torch.ones_like(lo), torch.where(unst & (hi > -lo), torch.ones_like(lo), torch.zeros_like(lo))
    )
    return su, iu, sl


def ball_upper(lam: torch.Tensor, ball) -> torch.Tensor:
    """max of lam x over the l2 ball ``ball`` = (x0, r):  lam x0 + r ||lam||_2 (Cauchy-Schwarz)."""
    x0, r = ball
    return lam @ x0 + r * lam.norm(dim=-1)


def _crown_upper(mlp, lam, bias, lows, highs, k_from, xl, xu, cons=None, iters: int = 0, ball=None):
    """Upper bound of lam h_{k_from} + bias (lam: (S, R, h)), h_j = relu(z_j), back to the input box
    (and, with ``cons``, improved by the layer-1 split constraints: ``_split_dual``).  With ``ball`` =
    (x0, r) the region is ball ∩ box: max over it of lam x is at most both the box maximum and the ball
    maximum (``ball_upper``), so the smaller of the two is a valid bound."""
    for j in range(k_from, -1, -1):
        su, iu, sl = _relax(lows[j], highs[j])
        pos, neg = lam.clamp_min(0), lam.clamp_max(0)
        bias = bias + torch.einsum("srh,sh->sr", pos, iu)
        lam = pos * su.unsqueeze(1) + neg * sl.unsqueeze(1)
        bias = bias + lam @ mlp.biases[j]
        lam = lam @ mlp.weights[j]
    mid, rad = (xu + xl) / 2, (xu - xl) / 2
    out = bias + lam @ mid + lam.abs() @ rad
    if ball is not None:
        out = torch.minimum(out, bias + ball_upper(lam, ball))
    if cons is not None and iters > 0:
        out = torch.minimum(out, _split_dual(lam, bias, cons, mid, rad, iters))
    return out


def first_layer_constraints(mlp: ReluMLP, splits: torch.Tensor, marg: list):
    """The layer-1 splits as half-spaces in x: s_i (W_1 x + b_1)_i + m_i >= 0, rows normalised to
    ||A_i||_1 = 1 -> (A (S, h_1, n), c (S, h_1)) with zero rows for unsplit units; None if no split."""
    s = mlp.layer(splits, 0).to(DT)
    if not bool((s != 0).any()):
        return None
    w, b = mlp.weights[0], mlp.biases[0]
    norm = w.abs().sum(dim=1).clamp_min(1e-300)
    a = s.unsqueeze(2) * (w / norm.unsqueeze(1)).unsqueeze(0)
    c = (s * b + marg[0] * (s != 0)) / norm
    return a, c


def _split_dual(lam, bias, cons, mid, rad, iters: int):
    """beta-CROWN-style Lagrangian bound (Wang et al. 2021) for the layer-1 split half-spaces
    A x + c >= 0: for every beta >= 0 and every feasible x,
        lam x + bias <= lam x + bias + beta (A x + c) <= max_box (lam + beta A) x + beta c + bias,
    so each beta gives a valid upper bound; we take the best of ``iters`` projected sign-gradient steps
    from beta = 0 (decreasing step, in units of the row's largest |lam|)."""
    a, c = cons
    beta = torch.zeros(lam.shape[0], lam.shape[1], a.shape[1], dtype=DT)
    active = (a.abs().sum(dim=2) > 0).to(DT).unsqueeze(1)  # (S, 1, h)
    step0 = 0.5 * lam.abs().amax(dim=2, keepdim=True)
    a_mid = (a @ mid).unsqueeze(1)  # (S, 1, h)
    best = None
    for t in range(iters + 1):
        coef = lam + beta @ a
        val = bias + (beta * c.unsqueeze(1)).sum(dim=2) + coef @ mid + coef.abs() @ rad
        best = val if best is None else torch.minimum(best, val)
        if t == iters:
            break
        grad = c.unsqueeze(1) + a_mid + (coef.sign() * rad) @ a.transpose(1, 2)
        beta = (beta - step0 * (1 - t / iters) * grad.sign() * active).clamp_min(0)
    return best


def _clamp(lo, hi, s, m):
    lo = torch.where(s > 0, torch.maximum(lo, -m), lo)
    hi = torch.where(s < 0, torch.minimum(hi, m), hi)
    return lo, hi


def preact_bounds(
    mlp: ReluMLP, splits: torch.Tensor, xl, xu, marg, beta_iters: int = 0, ball=None, prior=None,
    opt_iters: int = 0,
):
    """Bounds l_k <= exact z_k <= u_k on each subdomain (S, units) -> lists of (S, h_k), and a (S,)
    mask of subdomains proven empty (some l_i > u_i after the split clamps).

    Layer 1: the exact range over the box (one affine map); with ``ball`` = (x0, r) (l2) intersected
    with the range over the ball, w x0 + b +- r ||w||_2.  Layer k >= 2: CROWN (linear bounds back to
    the input through the relaxations of relu on the already clamped [l, u]) intersected with interval
    propagation; with ``beta_iters`` > 0 the CROWN bounds also use the layer-1 splits as constraints on
    x (``_split_dual``); with ``opt_iters`` > 0 the units CROWN leaves open are then tightened by
    alpha-beta-CROWN under the splits of every earlier layer (``complete_beta.refine``, that many Adam steps).
    Split clamps (see module doc): active -> l >= -m, inactive -> u <= m.
    ``prior``: bounds (lows, highs) valid on a superset (the root): intersected.  CROWN runs only for
    the units whose phase the interval bounds leave open in some subdomain of the batch (the others'
    relaxations are exact whatever their bounds)."""
    S = splits.shape[0]
    lows, highs = [], []
    empty = torch.zeros(S, dtype=torch.bool)
    cons = first_layer_constraints(mlp, splits, marg) if beta_iters > 0 else None
    mid, rad = (xu + xl) / 2, (xu - xl) / 2
    for k in range(len(mlp.widths)):
        w, b = mlp.weights[k], mlp.biases[k]
        if k == 0:
            c, r = w @ mid + b, w.abs() @ rad
            lo, hi = c - r, c + r
            if ball is not None:
                c2, r2 = w @ ball[0] + b, ball[1] * w.norm(dim=1)
                lo, hi = torch.maximum(lo, c2 - r2), torch.minimum(hi, c2 + r2)
            if prior is not None:
                lo, hi = torch.maximum(lo, prior[0][0]), torch.minimum(hi, prior[1][0])
            lo, hi = lo.expand(S, -1).clone(), hi.expand(S, -1).clone()
        else:
            pl, ph = lows[-1].clamp_min(0), highs[-1].clamp_min(0)
            c, r = (pl + ph) / 2 @ w.t() + b, (ph - pl) / 2 @ w.abs().t()
            lo, hi = c - r, c + r
            if prior is not None:
                lo, hi = torch.maximum(lo, prior[0][k]), torch.minimum(hi, prior[1][k])
            idx = torch.nonzero(((lo <= marg[k]) & (hi >= -marg[k])).any(dim=0)).flatten()
            if idx.numel():
                wi, bi = w[idx], b[idx]
                lam = torch.cat([wi, -wi]).unsqueeze(0).expand(S, -1, -1)
                bias = torch.cat([bi, -bi]).unsqueeze(0).expand(S, -1)
                cu = _crown_upper(mlp, lam, bias, lows, highs, k - 1, xl, xu, cons, beta_iters, ball)
                h = idx.numel()
                hi[:, idx] = torch.minimum(hi[:, idx], cu[:, :h])
                lo[:, idx] = torch.maximum(lo[:, idx], -cu[:, h:])
                if opt_iters > 0:  # alpha-beta-CROWN on the units CROWN leaves open (in place)
                    from .complete_beta import refine

                    refine(mlp, lam, bias, lows, highs, k, xl, xu, splits, marg, opt_iters, ball, lo, hi, idx)
        # our own float64 rounding: widen outward (relative to the magnitudes involved)
        slack = _OWN_ROUNDING * (lo.abs() + hi.abs() + 1.0)
        lo, hi = lo - slack, hi + slack
        lo, hi = _clamp(lo, hi, mlp.layer(splits, k), marg[k])
        empty |= (lo > hi).any(dim=1)
        hi = torch.maximum(hi, lo)  # keep empty ones well formed (they are dropped by the caller)
        lows.append(lo)
        highs.append(hi)
    return lows, highs, empty


def phases(mlp: ReluMLP, splits, lows, highs, marg) -> torch.Tensor:
    """(S, units) in {+1, -1, 0}: the phase torch picks on the whole subdomain (split, or stable with
    margin: exact l > m => float z > 0; exact u < -m => float z < 0), 0 if unknown."""
    out = splits.clone()
    for k in range(len(mlp.widths)):
        sk = mlp.layer(out, k)
        sure_on = lows[k] > marg[k]
        sure_off = highs[k] < -marg[k]
        sk[:] = torch.where(sk != 0, sk, torch.where(sure_on, 1, torch.where(sure_off, -1, 0)).to(sk.dtype))
    return out


# ----------------------------------------------------------------------------------------------
# gradient boxes and exact leaf gradients
# ----------------------------------------------------------------------------------------------
def gradient_box(mlp: ReluMLP, ph: torch.Tensor, target: int, record: list | None = None):
    """Interval backward pass: box [gL, gU] (S, n) containing W_1^T D_1 ... W_K^T D_K w for every D with
    D_k in {1} (phase +1), {0} (-1) or {0, 1} (0).  Per layer, v <- W^T (d * v) with the product box
    [min, max of the endpoint products] and midpoint-radius for W^T (Rump).  ``record`` gets the
    upstream box (vL, vU) of every hidden layer (index k) for the branching score."""
    S = ph.shape[0]
    v = mlp.weights[-1][target].unsqueeze(0).expand(S, -1)
    vl, vu = v, v
    for k in range(len(mlp.widths) - 1, -1, -1):
        if record is not None:
            record.insert(0, (vl, vu))
        p = mlp.layer(ph, k)
        dl = (p > 0).to(DT)
        du = (p >= 0).to(DT)
        cand = torch.stack([dl * vl, dl * vu, du * vl, du * vu])
        pl, pu = cand.min(dim=0).values, cand.max(dim=0).values
        w = mlp.weights[k]
        mid, rad = (pu + pl) / 2 @ w, (pu - pl) / 2 @ w.abs()
        vl, vu = mid - rad, mid + rad
    slack = _OWN_ROUNDING * (vl.abs() + vu.abs() + 1e-30)
    return vl - slack, vu + slack


def _product_planes(dl, du, vl, vu, upper: bool):
    """Mixed McCormick plane (alpha on d, beta on v, gamma) for d*v on [dl, du] x [vl, vu]: lower
    lam L1 + (1 - lam) L2, lam = clip(vu / (vu - vl), 0, 1); upper mu U1 + (1 - mu) U2,
    mu = clip(-vl / (vu - vl), 0, 1) (see ``lirpa_compat.BoundProduct``; each plane is valid on the box,
    so is every convex combination)."""
    width = vu - vl
    pos = width > 0
    safe = torch.where(pos, width, torch.ones_like(width))
    if upper:
        w1 = torch.where(pos, (-vl / safe).clamp(0, 1), torch.ones_like(width))
        p1, p2 = (vu, dl, -dl * vu), (vl, du, -du * vl)
    else:
        w1 = torch.where(pos, (vu / safe).clamp(0, 1), torch.ones_like(width))
        p1, p2 = (vl, dl, -dl * vl), (vu, du, -du * vu)
    return tuple(w1 * a + (1 - w1) * b for a, b in zip(p1, p2))


def gradient_box_linear(mlp: ReluMLP, ph: torch.Tensor, target: int, record: list, rows=None):
    """Linear-relaxation bound of g = W_1^T (d_1 * v_1) with v_k = W_{k+1}^T (d_{k+1} * v_{k+1}), v_K = w,
    batched over subdomains: for each row c of [I; -I], an upper bound of c^T g (``rows`` (S, R, n)
    given: an upper bound of each row's c^T g instead, returned as (S, R)).

    Backward (CROWN-style, d's as free variables in their boxes): the coefficient Lam on p_k = d_k * v_k
    is passed through the mixed McCormick planes (upper where Lam >= 0, lower where Lam < 0), giving
    coefficients on d_k (maximised over the d box at once: the d's are free), on v_k (pushed through
    v_k = W_{k+1}^T p_{k+1}, or multiplied by the constant w at the top) and a constant.  Needs the
    boxes of every v_k (``record`` from ``gradient_box``).  Returns (gL, gU) (S, n).  Our float64
    rounding here (about depth * h * 2^-53 relative to |W_1|^T ... |w|) is far below the 1e-6 relative
    slack of ``gradient_float_error``, which every caller adds (euclidean: at the end; cosine: to the box)."""
    S, n = ph.shape[0], mlp.n
    # work on the units whose d can be 1 in some subdomain of the batch only (an always-inactive unit
    # has d = 0: p_k = 0 there, its coefficients vanish)
    cols = [torch.nonzero((mlp.layer(ph, k) >= 0).any(dim=0)).flatten() for k in range(len(mlp.widths))]
    w1t = mlp.weights[0][cols[0]].t()
    if rows is None:
        lam = torch.cat([w1t, -w1t]).unsqueeze(0).expand(S, -1, -1)  # (S, 2n, |cols_1|): coefficients on p_1
    else:
        lam = rows.to(DT) @ w1t
    total = torch.zeros(S, lam.shape[1], dtype=DT)
    for k in range(len(mlp.widths)):
        p = mlp.layer(ph, k)[:, cols[k]]
        # a fixed phase makes d * v exactly linear in v (coefficient d); planes only for the units free
        # in some subdomain of the batch (on fixed ones the mixed planes are exact too: alpha d + d v -
        # d alpha = d v)
        coef_v = lam * (p > 0).to(DT).unsqueeze(1)
        idx = torch.nonzero((p == 0).any(dim=0)).flatten()
        if idx.numel():
            pu = p[:, idx]
            dl, du = (pu > 0).to(DT).unsqueeze(1), (pu >= 0).to(DT).unsqueeze(1)
            vl, vu = (t[:, cols[k][idx]].unsqueeze(1) for t in record[k])
            au, bu, cu = _product_planes(dl, du, vl, vu, True)
            al, bl, cl = _product_planes(dl, du, vl, vu, False)
            lu = lam[:, :, idx]
            pos, neg = lu.clamp_min(0), lu.clamp_max(0)
            coef_d = pos * au + neg * al
            total = (
                total + torch.maximum(coef_d * dl, coef_d * du).sum(dim=2) + (pos * cu + neg * cl).sum(dim=2)
            )
            coef_v[:, :, idx] = pos * bu + neg * bl
        if k + 1 < len(mlp.widths):
            lam = coef_v @ mlp.weights[k + 1][cols[k + 1]][:, cols[k]].t()
        else:
            total = total + coef_v @ mlp.weights[-1][target][cols[k]]
    if rows is not None:
        return total
    return -total[:, n:], total[:, :n]


def leaf_gradient(mlp: ReluMLP, ph: torch.Tensor, target: int) -> torch.Tensor:
    """(S, n) exact g_D for fully fixed patterns (ph in {+1, -1})."""
    S = ph.shape[0]
    v = mlp.weights[-1][target].unsqueeze(0).expand(S, -1)
    for k in range(len(mlp.widths) - 1, -1, -1):
        v = (v * (mlp.layer(ph, k) > 0).to(DT)) @ mlp.weights[k]
    return v


def branch_scores(mlp: ReluMLP, ph, lows, highs, record, layer_first: bool = False) -> torch.Tensor:
    """(S, units) heuristic: how much unit i can move the gradient box, |upstream v_i|max * (sum of
    |W_1|^T ... |W_k| reaching the input) (BaBSR-like, Bunel et al. 2020); -inf where the phase is fixed."""
    S = ph.shape[0]
    reach = mlp.weights[0].abs().sum(dim=1).unsqueeze(0).expand(S, -1)  # (S, h_1)
    scores = []
    for k in range(len(mlp.widths)):
        if k > 0:
            prev_du = (mlp.layer(ph, k - 1) >= 0).to(DT)
            reach = (prev_du * reach) @ mlp.weights[k].abs().t()
        vl, vu = record[k]
        sc = torch.maximum(vl.abs(), vu.abs()) * reach
        sc = sc * (1 + 1e-3 * torch.minimum(highs[k], -lows[k]).clamp_min(0))
        if layer_first:  # free units of earlier layers first (then deeper splits are linear in x)
            sc = sc.clamp_max(1e100) + 1e200 * (len(mlp.widths) - 1 - k)
        scores.append(torch.where(mlp.layer(ph, k) == 0, sc, torch.full_like(sc, -float("inf"))))
    return torch.cat(scores, dim=1)


def leaf_program(mlp: ReluMLP, ph, splits, xl, xu, marg, ball=None):
    """See ``complete_leaf.leaf_program`` (kept here for callers of the old location)."""
    from .complete_leaf import leaf_program as solve

    return solve(mlp, ph, splits, xl, xu, marg, ball)
