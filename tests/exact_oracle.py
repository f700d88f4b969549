"""Exact oracle for the saliency of tiny ReLU MLPs over an ℓ∞ (or ℓ2) ball (SPEC 9.2).

For f = W_K ∘ relu ∘ ... ∘ relu ∘ W_1 (affine maps, nn.Sequential of Linear/ReLU, Flatten/Identity/
Dropout-in-eval as no-ops) every activation pattern D = (D_1, ..., D_{K-1}) (D_k diagonal 0/1) makes f
affine on its region

    R(D) = { x' : z_i(x') > 0 for the active units, z_i(x') <= 0 for the inactive ones }

(autograd's convention relu'(0) = 0: a unit is active iff its pre-activation is > 0), and the saliency
is constant there:  g_D = W_1^T D_1 W_2^T D_2 ... D_{K-1} W_K^T e_y.  Hence over the region
S = ball(x, eps) ∩ [lo, hi]^n

    max_{x' in S} ||g(x') - g(x)||_2 = max_{D reachable} ||g_D - g(x)||_2,
    min / max_{x' in S} g_j(x')      = min / max_{D reachable} (g_D)_j,

where D is *reachable* iff R(D) ∩ S is non-empty.  We enumerate the reachable patterns by depth-first
search over the units in layer order.  Along a branch the pre-activation of the next unit is an affine
function a·x' + c of x' (the earlier units' phases are fixed), so each branch is one feasibility
problem, solved as the linear program (scipy HiGHS; ℓ2 adds one second-order cone, solved by cvxpy)

    max t  s.t.  x' in S,   a_i·x' + c_i >= t ||a_i||   (active units),
                            a_i·x' + c_i <= 0           (inactive units),       t <= 1,

and the branch is feasible iff t* > ``strict_tol`` (> 0: the strict inequalities hold).  Cheap exact
shortcuts avoid most programs: a unit whose affine function keeps one sign over the bounding box of S is
stable (one branch, no program), and the parent's witness point always certifies one of the two
branches (only the other one needs a program).  The only approximation is ``strict_tol``: regions
thinner than ``strict_tol`` (in input units, rows normalised) are dropped, and inactive constraints
hold up to HiGHS's feasibility tolerance (1e-7).  All arithmetic is float64 on the model's weights.

API (stable: ``tests/test_exact_oracle.py`` and the branch-and-bound tests import it)::

    exact_saliency_range(model, x, eps, target, domain=(0., 1.), norm="inf")
        -> dict(lower, upper, max_euclidean, patterns, witnesses, gradients, g_x, argmax, lp_calls)
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linprog
from torch import nn

Region = tuple[np.ndarray, np.ndarray, np.ndarray, float, str]  # (lo, hi, center, eps, norm)


def affine_layers(model: nn.Module) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """The model as a list of affine maps (W, b) (float64) and ``None`` for every ReLU.

    Accepts nn.Sequential (nested too) of Linear / ReLU, with Flatten, Identity and Dropout (eval) as
    no-ops.  Anything else is a ValueError: the oracle is only exact for piecewise-affine ReLU MLPs."""
    out: list = []
    for m in model.modules():
        if isinstance(m, nn.Sequential):
            continue
        if isinstance(m, nn.Linear):
            w = m.weight.detach().double().cpu().numpy()
            b = m.bias.detach().double().cpu().numpy() if m.bias is not None else np.zeros(w.shape[0])
            out.append((w, b))
        elif isinstance(m, nn.ReLU):
            out.append(None)
        elif isinstance(m, (nn.Flatten, nn.Identity)) or (isinstance(m, nn.Dropout) and not m.training):
            continue
        else:
            raise ValueError(f"exact oracle supports Linear/ReLU MLPs only, got {type(m).__name__}")
    if not out or out[0] is None:
        raise ValueError("exact oracle needs a Linear first layer")
    return out


def _blocks(layers: list) -> list[tuple[np.ndarray, np.ndarray]]:
    """Compose consecutive affine maps: blocks[k] maps the k-th ReLU's output to the next ReLU's input
    (blocks[0] maps x; the last block gives the logits)."""
    blocks: list = []
    cur: tuple[np.ndarray, np.ndarray] | None = None
    for layer in layers:
        if layer is None:
            if cur is None:
                raise ValueError("two ReLUs in a row are not supported by the oracle")
            blocks.append(cur)
            cur = None
        else:
            w, b = layer
            cur = (w, b) if cur is None else (w @ cur[0], w @ cur[1] + b)
    if cur is None:
        raise ValueError("the model must end with a Linear layer (logits)")
    blocks.append(cur)
    return blocks


class _Feasibility:
    """max-slack programs over the region S (ℓ∞: an LP with variable bounds; ℓ2: an SOCP)."""

    def __init__(self, region: Region, strict_tol: float):
        self.lo, self.hi, self.center, self.eps, self.norm = region
        self.n = self.lo.size
        self.strict_tol = strict_tol
        self.calls = 0

    def solve(self, active: list, inactive: list, symmetric: bool = False) -> tuple[float, np.ndarray | None]:
        """Max slack t and a maximiser x' (None if infeasible).  ``active``/``inactive``: lists of
        (a, c) with ||a|| = 1.  ``symmetric``: inactive units must also satisfy a·x' + c <= -t."""
        self.calls += 1
        n = self.n
        rows, rhs = [], []
        for a, c in active:
            rows.append(np.append(-a, 1.0))
            rhs.append(c)
        for a, c in inactive:
            rows.append(np.append(a, 1.0 if symmetric else 0.0))
            rhs.append(-c)
        if self.norm == "inf":
            cost = np.zeros(n + 1)
            cost[-1] = -1.0
            res = linprog(
                cost,
                A_ub=np.array(rows) if rows else None,
                b_ub=np.array(rhs) if rows else None,
                bounds=list(zip(self.lo, self.hi)) + [(None, 1.0)],
                method="highs",
            )
            if res.status != 0:
                return -np.inf, None
            return float(-res.fun), np.asarray(res.x[:n], dtype=np.float64)
        import cvxpy as cp

        xv, tv = cp.Variable(n), cp.Variable()
        cons = [xv >= self.lo, xv <= self.hi, cp.norm(xv - self.center, 2) <= self.eps, tv <= 1.0]
        if rows:
            mat = np.array(rows)
            cons.append(mat[:, :n] @ xv + mat[:, n] * tv <= np.array(rhs))
        prob = cp.Problem(cp.Maximize(tv), cons)
        prob.solve(solver="CLARABEL")
        if prob.status not in ("optimal", "optimal_inaccurate") or xv.value is None:
            return -np.inf, None
        return float(tv.value), np.asarray(xv.value, dtype=np.float64)

    def box_range(self, a: np.ndarray, c: float) -> tuple[float, float]:
        """Exact range of a·x' + c over the bounding box of S."""
        lo_t = np.minimum(a * self.lo, a * self.hi).sum() + c
        hi_t = np.maximum(a * self.lo, a * self.hi).sum() + c
        return float(lo_t), float(hi_t)


def _region(x: np.ndarray, eps: float, domain, norm: str) -> Region:
    lo, hi = x - eps, x + eps
    if domain is not None:
        lo, hi = np.maximum(lo, float(domain[0])), np.minimum(hi, float(domain[1]))
    return lo, hi, x, float(eps), norm


def enumerate_patterns(
    model: nn.Module,
    x: np.ndarray,
    eps: float,
    domain=(0.0, 1.0),
    norm: str = "inf",
    strict_tol: float = 1e-7,
    max_patterns: int = 200_000,
) -> tuple[list, list, np.ndarray, int]:
    """Every activation pattern reachable from ball(x, eps) ∩ domain.

    Returns (patterns, witnesses, composed output maps (P, classes, n) as stacked rows, program calls):
    patterns[p] is a tuple of bool arrays (one per ReLU layer, True = active), witnesses[p] a point of
    S whose pattern is patterns[p] (the centre of a max-slack program where possible), and the
    logits are affine A_p x' + c_p on that region (A_p returned)."""
    blocks = _blocks(affine_layers(model))
    feas = _Feasibility(_region(np.asarray(x, np.float64), eps, domain, norm), strict_tol)
    patterns: list = []
    witnesses: list = []
    maps: list = []

    def descend(depth: int, amat: np.ndarray, cvec: np.ndarray, act: list, inact: list, w: np.ndarray, pat: list):
        # amat, cvec: pre-activations of ReLU layer ``depth`` as an affine function of x'
        if depth == len(blocks) - 1:
            if len(patterns) >= max_patterns:
                raise RuntimeError(f"more than {max_patterns} reachable patterns")
            t_sym, w_sym = feas.solve(act, inact, symmetric=True) if inact else (np.inf, None)
            patterns.append(tuple(pat))
            witnesses.append(w_sym if (w_sym is not None and t_sym > strict_tol) else w)
            maps.append(amat)
            return
        m = amat.shape[0]
        phase = np.zeros(m, dtype=bool)

        def unit(i: int, act: list, inact: list, w: np.ndarray):
            if i == m:
                d = phase.astype(np.float64)
                w_next, b_next = blocks[depth + 1]
                descend(depth + 1, w_next @ (d[:, None] * amat), w_next @ (d * cvec) + b_next,
                        act, inact, w, pat + [phase.copy()])
                return
            a, c = amat[i], float(cvec[i])
            norm_a = float(np.linalg.norm(a))
            if norm_a == 0.0:  # a constant unit: relu'(c) with relu'(0) = 0
                phase[i] = c > 0
                unit(i + 1, act, inact, w)
                return
            an, cn = a / norm_a, c / norm_a
            zmin, zmax = feas.box_range(an, cn)
            z_w = float(an @ w + cn)
            options = []
            if zmin > 0:
                options = [(True, w)]
            elif zmax <= 0:
                options = [(False, w)]
            else:
                # the witness certifies its own side; the other side needs one program
                own = z_w > 0
                options.append((own, w))
                other_act = act + [(an, cn)] if not own else act
                other_inact = inact + [(an, cn)] if own else inact
                t, w_other = feas.solve(other_act, other_inact)
                if w_other is not None and t > strict_tol:
                    options.append((not own, w_other))
            for is_active, point in options:
                phase[i] = is_active
                if zmin > 0 or zmax <= 0:
                    unit(i + 1, act, inact, point)
                elif is_active:
                    unit(i + 1, act + [(an, cn)], inact, point)
                else:
                    unit(i + 1, act, inact + [(an, cn)], point)

        unit(0, act, inact, w)

    w0, b0 = blocks[0]
    descend(0, w0.copy(), b0.copy(), [], [], np.asarray(x, np.float64).copy(), [])
    return patterns, witnesses, np.stack(maps), feas.calls


def pattern_at(model: nn.Module, x: np.ndarray) -> tuple[tuple, np.ndarray]:
    """The activation pattern at x (float64, z > 0 active) and the composed logit map A (classes, n)."""
    blocks = _blocks(affine_layers(model))
    amat, cvec = blocks[0]
    pat = []
    h = np.asarray(x, np.float64)
    for w_next, b_next in blocks[1:]:
        d = ((amat @ h + cvec) > 0).astype(np.float64)
        pat.append(d > 0)
        amat, cvec = w_next @ (d[:, None] * amat), w_next @ (d * cvec) + b_next
    return tuple(pat), amat


def exact_saliency_range(
    model: nn.Module,
    x,
    eps: float,
    target: int,
    domain=(0.0, 1.0),
    norm: str = "inf",
    strict_tol: float = 1e-7,
    max_patterns: int = 200_000,
) -> dict:
    """Exact range of the saliency d f_target / dx' over ball_norm(x, eps) ∩ domain (domain None: R^n).

    x: one sample, shape (n,) (or (1, n)).  Returns a dict of float64 numpy arrays / numbers:

    * ``lower``, ``upper`` (n,): min / max of g_j over the region (= over the reachable patterns);
    * ``max_euclidean``: max ||g(x') - g(x)||_2 over the region; ``argmax``: its pattern index;
    * ``patterns``: list of reachable patterns (tuple of bool arrays per ReLU layer, True = z > 0);
    * ``witnesses`` (P, n): a point of the region with that pattern; ``gradients`` (P, n): g on it;
    * ``g_x`` (n,): the saliency at x (autograd's convention); ``lp_calls``: programs solved.
    """
    xv = torch.as_tensor(x).detach().double().cpu().numpy().reshape(-1)
    if norm not in ("inf", "2"):
        raise ValueError(f"norm must be 'inf' or '2', got {norm!r}")
    pats, wits, maps, calls = enumerate_patterns(model, xv, eps, domain, norm, strict_tol, max_patterns)
    grads = maps[:, int(target), :]
    _, a_x = pattern_at(model, xv)
    g_x = a_x[int(target)]
    dev = np.linalg.norm(grads - g_x[None], axis=1)
    return {
        "lower": np.minimum(grads.min(axis=0), g_x),
        "upper": np.maximum(grads.max(axis=0), g_x),
        "max_euclidean": float(dev.max()),
        "argmax": int(dev.argmax()),
        "patterns": pats,
        "witnesses": np.stack(wits),
        "gradients": grads,
        "g_x": g_x,
        "lp_calls": calls,
    }
