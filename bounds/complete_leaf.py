"""Leaf feasibility for phase branch-and-bound with verified emptiness (``bounds.complete``).

A leaf fixes every ReLU phase, so every pre-activation is affine in x there: z_i = a_i x + c_i (from
the pattern: a = W_k D_{k-1} a_prev, c = W_k D_{k-1} c_prev + b_k).  Torch's float pattern equals the
leaf's at x' only if every split unit satisfies s_i (a_i x' + c_i) >= -M_i (``complete_mlp`` margins;
M_i also covers the pattern-vs-exact relu discrepancy of the earlier layers, |W| (disc + m), and the
float64 rounding of our own a_i, c_i: rho_i = 2 gamma_{N}(2^-53) (|a|_i |x|max + |c|_i), N the total
number of terms summed, |a|, |c| the same recursion on |W|, |b|).  Rows are normalised,
A_i = -s_i a_i / ||a_i||_1, b_i = s_i c_i / ||a_i||_1, so the leaf set is {A x <= b} and the
margin-widened set {A x <= b + M / ||a||_1}.

Program (always feasible: t is free):  t* = min t  s.t.  A x - t <= b',  x in R, with the region
R = box (l_inf: an LP, scipy HiGHS) or box ∩ ball(x0, r) (l2: a second-order cone program, Clarabel).  ``leaf_program``:

* l2 first: the widened rows over the box alone (an LP); a verified certificate there drops the leaf
  without any cone program (box ⊇ ball ∩ box);
* t* < 0 on the plain rows (ball shrunk by 1e-4 relative for l2, so a rounded point still passes a float
  check): "feasible", x* lies at normalised depth -t* inside every split half-space;
* t* > 0 on the widened rows (ball widened by the float error of a float32 norm) with a VERIFIED Farkas
  certificate: "empty".  The duals y >= 0 of the rows give, for every x in R satisfying the widened
  rows, y.(A x - b') <= 0.  ``farkas_verified`` recomputes in float64 a lower bound of
  min_{x in R} y.(A x - b'): box: sum_i min(c_i l_i, c_i u_i) - y.b' with c = A^T y; ball: c.x0 - r ||c||_2
  - y.b'; l2 also the split c = d + (c - d) with d = box duals' part (min over box ∩ ball of c.x >=
  min_box d.x + min_ball (c - d).x); it takes the largest and accepts only if it exceeds its own
  float64 rounding bound 4 gamma_{m+n+8}(2^-53) (|A|^T y . max(|l|, |u|, |x0|) + y.|b'| + r ||A^T y||...).
  No point of R can then lie in the leaf: the solver's tolerances never enter the decision;
* otherwise "unsure" (the caller keeps the leaf's value in the upper bound: sound).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linprog

from .complete_mlp import DT, ReluMLP, _gamma

U64 = 2.0**-53
BALL_SHRINK = 1e-4  # relative: the witness program's ball, so that float rounding keeps it inside


def leaf_rows(mlp: ReluMLP, ph: torch.Tensor, splits: torch.Tensor, marg: list):
    """(a, c, M, s) of the split units whose pre-activations are affine in x on the subdomain (all of
    them on a leaf; on an inner subdomain those of the layers after fully fixed ones)."""
    a, c = mlp.weights[0], mlp.biases[0]
    amag, cmag = a.abs(), c.abs()
    terms = mlp.n + 1
    disc = torch.zeros(mlp.widths[0], dtype=DT)
    rows: list = []
    for k in range(len(mlp.widths)):
        if k > 0:
            prev = mlp.layer(ph.unsqueeze(0), k - 1)[0]
            if bool((prev == 0).any()):
                break  # an earlier layer is not fixed: deeper pre-activations are not affine in x
            d = (prev > 0).to(DT)
            w = mlp.weights[k]
            a, c = w @ (d.unsqueeze(1) * a), w @ (d * c) + mlp.biases[k]
            amag, cmag = w.abs() @ (d.unsqueeze(1) * amag), w.abs() @ (d * cmag) + mlp.biases[k].abs()
            disc = w.abs() @ (disc + marg[k - 1])
            terms += w.shape[1] + 1
        sel = mlp.layer(splits.unsqueeze(0), k)[0] != 0
        rows.append((a[sel], c[sel], marg[k][sel] + disc[sel], mlp.layer(splits.unsqueeze(0), k)[0][sel], amag[sel], cmag[sel]))
    a_all, c_all, m_all, s_all, am, cm = (torch.cat([r[j] for r in rows]) for j in range(6))
    return a_all, c_all, m_all, s_all.to(DT), am, cm, terms


def _solve_lp(rows: np.ndarray, rhs: np.ndarray, xl: np.ndarray, xu: np.ndarray):
    """min t s.t. rows x - t <= rhs, xl <= x <= xu -> (t*, x*, y >= 0, None) or None on failure."""
    m, n = rows.shape
    cost = np.zeros(n + 1)
    cost[-1] = 1.0
    a_ub = np.hstack([rows, -np.ones((m, 1))])
    bounds = list(zip(xl.tolist(), xu.tolist())) + [(None, None)]
    res = linprog(cost, A_ub=a_ub, b_ub=rhs, bounds=bounds, method="highs")
    if res.status != 0:
        return None
    y = np.clip(-np.asarray(res.ineqlin.marginals, dtype=np.float64), 0.0, None)
    return float(res.fun), np.asarray(res.x[:n], dtype=np.float64), y, None


def _solve_socp(rows, rhs, xl, xu, x0, r):
    """The same with the ball ||x - x0||_2 <= r (Clarabel directly: variables (x, t), cones
    rows x - t + s = rhs, x + s = xu, -x + s = -xl (s >= 0) and (r, x0 - x) in the second-order cone)
    -> (t*, x*, y >= 0 row duals, d = box duals' part mu_l - mu_u) or None."""
    import clarabel
    from scipy import sparse

    m, n = rows.shape
    eye = sparse.identity(n, format="csc")
    zcol = sparse.csc_matrix((n, 1))
    a = sparse.vstack(
        [
            sparse.hstack([sparse.csc_matrix(rows), -np.ones((m, 1))]),
            sparse.hstack([eye, zcol]),
            sparse.hstack([-eye, zcol]),
            sparse.csc_matrix((1, n + 1)),
            sparse.hstack([eye, zcol]),
        ],
        format="csc",
    )
    b = np.concatenate([rhs, xu, -xl, [r], x0])
    q = np.zeros(n + 1)
    q[-1] = 1.0
    cones = [clarabel.NonnegativeConeT(m + 2 * n), clarabel.SecondOrderConeT(n + 1)]
    settings = clarabel.DefaultSettings()
    settings.verbose = False
    try:
        sol = clarabel.DefaultSolver(sparse.csc_matrix((n + 1, n + 1)), q, a, b, cones, settings).solve()
    except Exception:  # noqa: BLE001 - any solver failure only means "unsure"
        return None
    if str(sol.status) not in ("Solved", "AlmostSolved"):
        return None
    v, z = np.asarray(sol.x, dtype=np.float64), np.asarray(sol.z, dtype=np.float64)
    y = np.clip(z[:m], 0.0, None)
    d = z[m + n : m + 2 * n] - z[m : m + n]
    return float(v[-1]), v[:n], y, d


def farkas_verified(rows: np.ndarray, rhs: np.ndarray, y: np.ndarray, xl: np.ndarray, xu: np.ndarray,
                    ball=None, d: np.ndarray | None = None) -> bool:
    """True iff y >= 0 proves {x in region : rows x <= rhs} empty (see the module docstring):
    a float64 lower bound of min_region y.(rows x - rhs) exceeds its own rounding bound."""
    y = np.clip(np.asarray(y, dtype=np.float64), 0.0, None)
    if not np.all(np.isfinite(y)) or y.sum() <= 0:
        return False
    m, n = rows.shape
    c = rows.T @ y
    yb = float(y @ rhs)
    mag = np.maximum(np.abs(xl), np.abs(xu))
    cabs = np.abs(rows).T @ y
    vals = [float(np.minimum(c * xl, c * xu).sum()) - yb]
    if ball is not None:
        x0, r = ball
        mag = np.maximum(mag, np.abs(x0))
        vals.append(float(c @ x0 - r * np.linalg.norm(c)) - yb)
        if d is not None and np.all(np.isfinite(d)):
            e = c - d
            vals.append(float(np.minimum(d * xl, d * xu).sum() + e @ x0 - r * np.linalg.norm(e)) - yb)
            cabs = cabs + 2 * np.abs(d)
        r_term = r * float(cabs.sum()) * 2
    else:
        r_term = 0.0
    err = 4 * _gamma(m + n + 8, U64) * (2 * float(cabs @ mag) + float(y @ np.abs(rhs)) + r_term) + 1e-300
    best = max(vals)
    return math.isfinite(best) and best > err


def leaf_program(mlp: ReluMLP, ph: torch.Tensor, splits: torch.Tensor, xl, xu, marg, ball=None):
    """Feasibility of a fully fixed pattern (module docstring) -> (status, x*, depth):
    "feasible" (x* at normalised depth > 0 inside every split half-space, in the region), "empty"
    (verified Farkas certificate on the margin-widened rows) or "unsure".  ``ball`` = (x0, eps, eps_b):
    l2 ball of radius eps (the witness program uses eps (1 - 1e-4)) and eps_b >= eps (the largest
    radius a float check may accept; the emptiness program uses it)."""
    a, c, m, s, am, cm, terms = leaf_rows(mlp, ph, splits, marg)
    xmag = torch.maximum(xl.abs(), xu.abs())
    if ball is not None:
        xmag = torch.maximum(xmag, ball[0].abs() + ball[2])
    rho = 2 * _gamma(terms + 2, U64) * (am @ xmag + cm) + 1e-300
    m = m + rho
    norm1 = a.abs().sum(dim=1)
    flat = norm1 <= 1e-300
    if flat.any():  # constant rows: decided by the sign of c alone
        sc = s[flat] * c[flat]
        if (sc < -m[flat]).any():
            return "empty", None, -np.inf
        if (sc <= rho[flat]).any():
            return "unsure", None, 0.0
    keep = ~flat
    a, c, m, s, norm1 = a[keep], c[keep], m[keep], s[keep], norm1[keep]
    lo_np, hi_np = xl.numpy(), xu.numpy()
    if a.shape[0] == 0:  # no constraint: the whole region
        x_c = ball[0].numpy().copy() if ball is not None else (lo_np + hi_np) / 2
        return "feasible", x_c, 1.0
    rows = (-(s / norm1).unsqueeze(1) * a).numpy()
    rhs = (s * c / norm1).numpy()
    widened = rhs + (m / norm1).numpy()
    if ball is None:
        first = _solve_lp(rows, rhs, lo_np, hi_np)
    else:
        # the box contains ball ∩ box: a verified certificate over the box alone (one cheap LP) is one
        # for the ball too; only the leaves it cannot drop need the cone programs
        box = _solve_lp(rows, widened, lo_np, hi_np)
        if box is not None and box[0] > 0 and farkas_verified(rows, widened, box[2], lo_np, hi_np):
            return "empty", None, -np.inf
        x0 = ball[0].numpy()
        first = _solve_socp(rows, rhs, lo_np, hi_np, x0, ball[1] * (1 - BALL_SHRINK))
    if first is None:
        return "unsure", None, 0.0
    t, xs = first[0], first[1]
    if t < 0:
        return "feasible", xs, -t
    if ball is None:
        second = _solve_lp(rows, widened, lo_np, hi_np)
        region = None
    else:
        region = (x0, float(ball[2]))
        second = _solve_socp(rows, widened, lo_np, hi_np, x0, region[1])
    if (
        second is not None
        and second[0] > 0
        and farkas_verified(rows, widened, second[2], lo_np, hi_np, region, second[3])
    ):
        return "empty", None, -t
    return "unsure", xs, -t
