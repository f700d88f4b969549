"""alpha-beta-CROWN pre-activation bounds of a subdomain under ReLU split constraints (issue 10, SPEC 9.2).

Used by ``complete_mlp.preact_bounds`` (``opt_iters > 0``: ``refine`` after its CROWN pass) for the
layers k >= 2 of the phase-mode branch-and-bound of ``complete``.  Notation as in ``complete_mlp``:
z_j = W_j h_{j-1} + b_j, h_j = relu(z_j), h_0 = x; a subdomain C is the input region (box, or
ball ∩ box) intersected with its split constraints
      g_i(x) = s_i z_{j,i}(x) + m_i >= 0   (s_i = +1 active: exact z >= -m; s_i = -1 inactive: z <= m),
m_i the float margin of ``complete_mlp.margins``.  Given sound bounds l_j <= z_j(x) <= u_j on C for j < k
(already clamped by the splits), we want, for every row lam of [W_k; -W_k] (restricted to the units the
caller asks for), an upper bound of  F(x) = lam h_{k-1}(x) + c  over C.

The bound (beta-CROWN, Wang et al., NeurIPS 2021, "Beta-CROWN: Efficient Bound Propagation with Per-neuron
Split Constraints for Complete and Incomplete Neural Network Verification", eqs. 5-7; alpha-CROWN, Xu et al.,
ICLR 2021).  For multipliers beta_j >= 0 (one per split unit of every layer j < k, per row) and lower
slopes alpha_j in [0, 1] (per unstable unit, per row):

    for x in C:  F(x) <= F(x) + sum_j beta_j . g_j(x)                      (beta >= 0, g >= 0 on C)

and the right-hand side is bounded by the CROWN backward pass in which, on reaching z_j, the coefficient
vector Lam_j on z_j (after relaxing h_j = relu(z_j): upper plane su z + iu (the chord on [l, u]) where
Lam >= 0, lower plane alpha z where Lam < 0 -- both valid for every z in [l_j, u_j], which contains z_j(x)
for x in C, and alpha z <= relu(z) for every alpha in [0, 1]) is replaced by Lam_j + beta_j * s_j, and
beta_j . m_j is added to the constant.  Each step is an upper bound valid on C, and the last linear form
Lam_0 x + c' is maximised over the box (and, with ``ball`` = (x0, r) for l2, also over the ball,
c' + Lam_0 x0 + r ||Lam_0||_2; the smaller of the two is valid on ball ∩ box ⊇ C).  So EVERY
(alpha, beta) in the feasible set gives a valid upper bound (weak duality: it is the Lagrangian of the
split-constrained, relaxed problem); no optimality is needed.  alpha = CROWN's default slope (1 where
u > -l, else 0) and beta = 0 is exactly ``complete_mlp._crown_upper``: we start there, take ``iters``
Adam steps on sum(bounds) by autograd, project (alpha -> [0, 1], beta -> >= 0) after each step, and keep,
per row, the parameters of the best iterate.  The search runs in float32 (``OPT_DTYPE``; it only proposes
parameters: a float32 alpha in [0, 1] or beta >= 0 is an exact, feasible float64 value), the bound is
then evaluated once in float64 with those parameters.  Only the rows whose unit CROWN leaves open in
that subdomain are optimised (``refine``: gathered per subdomain, padded to the largest count), and the
parameters live only on the columns unstable / split somewhere in the batch.  beta_j = scale_j * b_j,
scale_j (per row) the largest |Lam_j| of the first pass, so that one step size fits every layer and
row.  A layer-1 split (j = 1) is a half-space in x: its beta subsumes ``complete_mlp._split_dual``.

Float contract.  The returned bound is recomputed once with the chosen parameters (no autograd) together
with its magnitude companion M: the same backward pass on absolute values (|Lam| propagated through |W|,
|iu|, |b|, beta m, and max(|xl|, |xu|) (+ r ||.||_2) at the input).  Every quantity is a sum of products
formed in float64 by inner products of length at most h_j per layer, so (Higham, Thm 3.5, applied layer by
layer) the computed bound differs from the exact value of the same expression by at most
gamma_N * M with N = sum_j (h_j + 8) + 2 n + 8 (+ 8 for the rounding of the chord's su, iu and of the
elementwise products: each contributes at most a few u relative to a term counted in M).  A sign of Lam
decided on a rounded value selects the wrong plane only where |exact Lam| <= |rounding error of Lam|, which
changes the bound by at most that error times (su - alpha) |z| <= the same terms of M.  We add 2 gamma_N M
(doubled: second-order terms) + 1e-300; ``preact_bounds`` adds its own ``_OWN_ROUNDING`` widening on top.
"""

from __future__ import annotations

import torch

DT = torch.float64
ITERS = 4  # Adam steps per layer bound (complete_bound(subdomain_bound="alpha-beta"))
LR_ALPHA = 0.5  # Adam step on the slopes in [0, 1]
LR_BETA = 2.0  # Adam step on b = beta / scale (scale: the row's largest |Lam_j| at CROWN)
OPT_DTYPE = torch.float32  # dtype of the search for (alpha, beta) (the returned bound is float64)
SUBDOMAIN_BOUNDS = ("auto", "crown", "alpha-beta")  # complete_bound(subdomain_bound=...)
# "auto": alpha-beta up to this many ReLUs, crown above: alpha-beta closed more samples on random MLPs and the
# MNIST 784-100-100 MLP (200 ReLUs); on the MNIST cnn-small (4804 ReLUs) it gained nothing (3 images x 2
# norms at 10 s: 2 uppers lower, 2 higher, 2 equal; 1.3-5x fewer subdomains, ~1 s more budget overrun);
# benchmarks/results/complete_beta.txt
AUTO_MAX_UNITS = 1000
MEMORY_BYTES = 2**27  # per chunk of subdomains: parameters, Adam state and the autograd graph


def opt_iters_for(mode: str, units: int) -> int:
    """Adam steps per layer bound for ``complete_bound(subdomain_bound=mode)`` on a net of ``units`` ReLUs
    (0: plain CROWN)."""
    if mode == "crown":
        return 0
    if mode == "alpha-beta":
        return ITERS
    return ITERS if units <= AUTO_MAX_UNITS else 0


class _Adam:
    """Plain Adam (Kingma & Ba 2015; betas 0.9, 0.999) on a few tensors, updated in place (no torch.optim:
    its first use costs seconds of imports, and the steps here are tiny)."""

    def __init__(self, params_lr: list):
        self.params = params_lr
        self.m = [torch.zeros_like(p) for p, _ in params_lr]
        self.v = [torch.zeros_like(p) for p, _ in params_lr]
        self.t = 0

    def step(self, grads) -> None:
        self.t += 1
        c1, c2 = 1 - 0.9**self.t, 1 - 0.999**self.t
        for (p, lr), g, m, v in zip(self.params, grads, self.m, self.v):
            m.mul_(0.9).add_(g, alpha=0.1)
            v.mul_(0.999).addcmul_(g, g, value=0.001)
            p.sub_(lr * (m / c1) / ((v / c2).sqrt() + 1e-12))


def _relax(lo: torch.Tensor, hi: torch.Tensor):
    """CROWN's relaxation of relu on [l, u] (as ``complete_mlp._relax``) plus the unstable mask."""
    active, inactive = lo >= 0, hi <= 0
    unst = ~(active | inactive)
    width = (hi - lo).clamp_min(1e-300)
    one, zero = torch.ones_like(lo), torch.zeros_like(lo)
    su = torch.where(active, one, torch.where(unst, hi / width, zero))
    iu = torch.where(unst, -lo * hi / width, zero)
    sl = torch.where(active, one, torch.where(unst & (hi > -lo), one, zero))
    return su, iu, sl, unst


def _backward(lam, bias, ctx, alphas, betas, scales, mlp, k_from, box, ball, mag=False):
    """One backward pass (module docstring) -> (bound (S, R), magnitude M or None, per-layer |Lam_j|max).

    ``ctx``: per layer j the relaxation (su, iu, sl, unstable) (S, h_j), the split signs (S, h_j) in
    {+1, -1, 0}, the margins (h_j,), and the columns (units) ``acol`` unstable / ``bcol`` split in some
    subdomain of the batch: ``alphas[j]`` (S, R, |acol|) (None: CROWN's slopes), ``betas[j]``
    (S, R, |bcol|) (None: no split in layer j), ``scales[j]`` (S, R, 1).  The parameters live on those
    columns only (the others' slopes are fixed and their multipliers 0) and enter by ``index_add``."""
    xl, xu = box
    lam_abs = lam.abs() if mag else None
    bias_abs = bias.abs() if mag else None
    seen = []
    for j in range(k_from, -1, -1):
        su, iu, sl, unst = ctx["relax"][j]
        pos, neg = lam.clamp_min(0), lam.clamp_max(0)
        bias = bias + torch.einsum("srh,sh->sr", pos, iu)
        lam = pos * su.unsqueeze(1) + neg * sl.unsqueeze(1)
        if alphas[j] is not None:  # slope alpha instead of sl on the unstable units
            ca = ctx["acol"][j]
            corr = (alphas[j] - sl[:, ca].unsqueeze(1)) * unst[:, ca].unsqueeze(1)
            lam = lam.index_add(2, ca, neg[:, :, ca] * corr)
        seen.append(lam.detach().abs().amax(dim=2, keepdim=True))
        if mag:  # |new Lam| <= |Lam| max(su, slope), slope <= 1 on unstable units
            bias_abs = bias_abs + torch.einsum("srh,sh->sr", lam_abs, iu.abs())
            lam_abs = lam_abs * torch.where(unst, 1.0, torch.maximum(su, sl)).unsqueeze(1)
        if betas[j] is not None:
            cb = ctx["bcol"][j]
            beta = betas[j] * scales[j]
            sg = ctx["signs"][j][:, cb].unsqueeze(1)
            lam = lam.index_add(2, cb, beta * sg)
            beta_m = (beta * (sg.abs() * ctx["margs"][j][cb])).sum(dim=2)
            bias = bias + beta_m
            if mag:
                lam_abs = lam_abs.index_add(2, cb, beta * sg.abs())
                bias_abs = bias_abs + beta_m
        bias = bias + lam @ mlp.biases[j]
        lam = lam @ mlp.weights[j]
        if mag:
            bias_abs = bias_abs + lam_abs @ mlp.biases[j].abs()
            lam_abs = lam_abs @ mlp.weights[j].abs()
    mid, rad = (xu + xl) / 2, (xu - xl) / 2
    out = bias + lam @ mid + lam.abs() @ rad
    m = None
    if mag:
        m = bias_abs + lam_abs @ torch.maximum(xl.abs(), xu.abs())
    if ball is not None:
        x0, r = ball
        out = torch.minimum(out, bias + lam @ x0 + r * lam.norm(dim=-1))
        if mag:
            m = m + lam_abs @ x0.abs() + r * lam_abs.norm(dim=-1)
    return out, m, seen[::-1]


def _cast(ctx, mlp, k_from, lam, bias, box, ball, dtype):
    """(lam, bias, ctx, weights-holder, box, ball) in ``dtype`` for the optimisation passes."""
    from types import SimpleNamespace

    c = {
        "relax": [tuple(t if t.dtype == torch.bool else t.to(dtype) for t in r) for r in ctx["relax"]],
        "signs": [t.to(dtype) for t in ctx["signs"]],
        "margs": [t.to(dtype) for t in ctx["margs"]],
        "acol": ctx["acol"],
        "bcol": ctx["bcol"],
    }
    net = SimpleNamespace(
        weights=[mlp.weights[j].to(dtype) for j in range(k_from + 1)],
        biases=[mlp.biases[j].to(dtype) for j in range(k_from + 1)],
    )
    b = None if ball is None else (ball[0].to(dtype), float(ball[1]))
    return lam.to(dtype), bias.to(dtype), c, net, (box[0].to(dtype), box[1].to(dtype)), b


def _float_slack(mlp, k_from: int, mag: torch.Tensor) -> torch.Tensor:
    """2 gamma_N M, N = sum_{j <= k_from} (h_j + 16) + 2 n + 8 (module docstring), u = 2^-53."""
    n_terms = sum(mlp.widths[j] + 16 for j in range(k_from + 1)) + 2 * mlp.n + 8
    u = 2.0**-53
    gamma = n_terms * u / (1 - n_terms * u)
    return 2 * gamma * mag + 1e-300


def optimized_upper(
    mlp,
    lam: torch.Tensor,
    bias: torch.Tensor,
    lows: list,
    highs: list,
    k_from: int,
    xl: torch.Tensor,
    xu: torch.Tensor,
    splits: torch.Tensor,
    marg: list,
    iters: int = ITERS,
    ball=None,
    need: torch.Tensor | None = None,
) -> torch.Tensor:
    """(S, R) upper bounds of lam h_{k_from} + bias over each subdomain (module docstring for the proof):
    the best over ``iters`` Adam steps of alpha-beta-CROWN, recomputed with its float widening.
    ``lam`` (S, R, h_{k_from}) / (1 or S broadcast), ``bias`` (S, R); ``lows``/``highs`` lists of (S, h_j)
    (j <= k_from: sound, split-clamped); ``splits`` (S, units) int8; ``marg`` the float margins.
    ``need`` (S, R) bool: the rows worth optimising (e.g. units whose phase is still open in that
    subdomain); the others get +inf (the caller keeps its own bounds there).  The needed rows of each
    subdomain are gathered to the front (padded to the largest count), so the optimisation runs on
    (S, max need)."""
    S, R = lam.shape[0], lam.shape[1]
    if need is not None and iters > 0:
        counts = need.sum(dim=1)
        rn = int(counts.max()) if S else 0
        if rn < R:
            order = torch.argsort((~need).to(torch.int8), dim=1, stable=True)[:, : max(rn, 1)]
            lam_e, bias_e = lam.expand(S, -1, -1), bias.expand(S, -1)
            crown = torch.full((S, R), float("inf"), dtype=DT)
            if rn == 0:
                return crown
            lam_g = lam_e.gather(1, order.unsqueeze(2).expand(-1, -1, lam.shape[2]))
            opt = optimized_upper(
                mlp, lam_g, bias_e.gather(1, order), lows, highs, k_from, xl, xu, splits, marg, iters, ball
            )
            return crown.scatter_reduce(1, order, opt, reduce="amin")
    per_row = 8 * (sum(mlp.widths[: k_from + 1]) * 12 + mlp.n * 6)  # bytes: graph, parameters, Adam
    rows = max(1, int(MEMORY_BYTES // per_row))
    if R > rows:  # rows are independent (per-row parameters): chunk them first
        parts = [
            optimized_upper(
                mlp,
                lam[:, a : a + rows],
                bias[:, a : a + rows],
                lows,
                highs,
                k_from,
                xl,
                xu,
                splits,
                marg,
                iters,
                ball,
            )
            for a in range(0, R, rows)
        ]
        return torch.cat(parts, dim=1)
    chunk = max(1, int(MEMORY_BYTES // (per_row * R)))
    if S > chunk:
        return torch.cat(
            [
                optimized_upper(
                    mlp,
                    lam[a : a + chunk],
                    bias[a : a + chunk],
                    [t[a : a + chunk] for t in lows],
                    [t[a : a + chunk] for t in highs],
                    k_from,
                    xl,
                    xu,
                    splits[a : a + chunk],
                    marg,
                    iters,
                    ball,
                )
                for a in range(0, S, chunk)
            ]
        )
    lam, bias = lam.to(DT), bias.to(DT)
    layers = range(k_from + 1)
    relax = [_relax(lows[j], highs[j]) for j in layers]
    signs = [mlp.layer(splits, j).to(DT) for j in layers]
    ctx = {
        "relax": relax,
        "signs": signs,
        "margs": [marg[j].to(DT) for j in layers],
        "acol": [torch.nonzero(relax[j][3].any(dim=0)).flatten() for j in layers],
        "bcol": [torch.nonzero((signs[j] != 0).any(dim=0)).flatten() for j in layers],
    }
    box = (xl, xu)
    none = [None] * (k_from + 1)
    # the search runs in float32 (half the memory traffic): it only proposes (alpha, beta); the bound
    # returned is the float64 pass with the chosen parameters and its own float widening
    o32 = _cast(ctx, mlp, k_from, lam, bias, box, ball, OPT_DTYPE)
    with torch.no_grad():
        best, _, seen = _backward(*o32[:3], none, none, none, o32[3], k_from, *o32[4:])
    has_a = [ctx["acol"][j].numel() > 0 for j in layers]
    has_b = [ctx["bcol"][j].numel() > 0 for j in layers]
    if iters <= 0 or not (any(has_a) or any(has_b)):
        params = (none, none, none)
    else:
        scales = [seen[j].clamp_min(1e-300) if has_b[j] else None for j in layers]
        alphas = [
            relax[j][2][:, ctx["acol"][j]]
            .to(OPT_DTYPE)
            .unsqueeze(1)
            .expand(S, R, -1)
            .clone()
            .requires_grad_(True)
            if has_a[j]
            else None
            for j in layers
        ]
        betas = [
            torch.zeros(S, R, ctx["bcol"][j].numel(), dtype=OPT_DTYPE, requires_grad=True)
            if has_b[j]
            else None
            for j in layers
        ]
        params_lr = [(a, LR_ALPHA) for a in alphas if a is not None] + [
            (b, LR_BETA) for b in betas if b is not None
        ]
        adam = _Adam(params_lr)
        best_a = [None if a is None else a.detach().clone() for a in alphas]
        best_b = [None if b is None else b.detach().clone() for b in betas]
        with torch.enable_grad():
            for t in range(iters + 1):
                out, _, _ = _backward(*o32[:3], alphas, betas, scales, o32[3], k_from, *o32[4:])
                if t > 0:  # iterate 0 is CROWN (== best already)
                    better = out.detach() < best
                    best = torch.where(better, out.detach(), best)
                    sel = better.unsqueeze(2)
                    for j in range(k_from + 1):
                        if alphas[j] is not None:
                            best_a[j] = torch.where(sel, alphas[j].detach(), best_a[j])
                        if betas[j] is not None:
                            best_b[j] = torch.where(sel, betas[j].detach(), best_b[j])
                if t == iters:
                    break
                grads = torch.autograd.grad(out.sum(), [p for p, _ in params_lr])
                with torch.no_grad():
                    adam.step(grads)
                    for a in alphas:
                        if a is not None:
                            a.clamp_(0.0, 1.0)
                    for b in betas:
                        if b is not None:
                            b.clamp_(min=0.0)
        # float32 overflow can only spoil the search, never the bound: non-finite proposals fall back to
        # CROWN's parameters (alpha = sl, beta = 0), and the float64 pass below is valid for any feasible ones
        fa = [
            None
            if a is None
            else torch.where(a.isfinite(), a.to(DT), relax[j][2][:, ctx["acol"][j]].unsqueeze(1))
            for j, a in enumerate(best_a)
        ]
        fb = [None if b is None else torch.nan_to_num(b.to(DT), nan=0.0, posinf=0.0) for b in best_b]
        fs = [None if c is None else torch.nan_to_num(c.to(DT), nan=1.0, posinf=1.0) for c in scales]
        params = (fa, fb, fs)
    with torch.no_grad():
        out, mag, _ = _backward(lam, bias, ctx, *params, mlp, k_from, box, ball, mag=True)
    return out + _float_slack(mlp, k_from, mag)


def refine(mlp, lam, bias, lows, highs, k, xl, xu, splits, marg, iters, ball, lo, hi, idx) -> None:
    """``preact_bounds``' hook for layer k (0-based, k >= 1): tighten in place the bounds lo, hi (S, h_k)
    of the units ``idx`` (rows lam = [W_k[idx]; -W_k[idx]], ``bias`` likewise) with ``optimized_upper``,
    optimising only the rows of units whose phase CROWN left open in that subdomain (``need``); the
    others keep their bounds.  Intersection: both bounds are valid on the subdomain, so is their meet."""
    h = idx.numel()
    m = marg[k][idx]
    need = (lo[:, idx] <= m) & (hi[:, idx] >= -m) & (lo[:, idx] <= hi[:, idx])
    if not bool(need.any()):
        return
    cu = optimized_upper(
        mlp, lam, bias, lows, highs, k - 1, xl, xu, splits, marg, iters, ball, need.repeat(1, 2)
    )
    cu = torch.nan_to_num(cu, nan=float("inf"))  # never reached (finite parameters), but a NaN must not pass
    hi[:, idx] = torch.minimum(hi[:, idx], cu[:, :h])
    lo[:, idx] = torch.maximum(lo[:, idx], -cu[:, h:])
