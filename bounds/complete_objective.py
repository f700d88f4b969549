"""Objectives of the branch-and-bound, written as a *badness* to maximise (``bounds.complete``).

* "euclidean": badness = ||g' - g0||_2 (the deviation);  reported lower = badness reached, upper = bound.
* "cosine":    badness = -cos(g0, g') (``certattr.metrics`` convention: 0 when exactly one vector is 0);
  reported lower = a certified lower bound on min cos over the ball, upper = cos reached.

Each objective gives (1) ``node``: an upper bound on the badness over every g in a box [gL, gU];
(2) ``leaf``: the same for one known float64 gradient g_D, the box being g_D +- err (err: the bound on
torch's float error, ``complete_mlp.gradient_float_error``; for euclidean the widening is added once at
the end instead, by the triangle inequality); (3) ``real``: the exact badness of torch's gradients
(differentiable, used by the attack on the surrogate too).

Box bound on the cosine (proof): for g in [l, u], <g0, g> >= N := sum_j min(g0_j l_j, g0_j u_j) (each
term separately), ||g|| <= Mx := ||max(|l|, |u|)||, and ||g|| >= Mn := ||dist(0, [l_j, u_j])||.  If
N >= 0: cos >= N / (||g0|| Mx); if N < 0 and Mn > 0: cos >= N / (||g0|| Mn); else cos >= -1.  A zero g
(cos = 0 by convention) is covered: if 0 is in the box every term of N is <= 0, so N < 0 (bound < 0) or
N = 0 (bound 0).  Clamped to [-1, 1]; g0 = 0 gives -1.

Chord bound on the Euclidean deviation (``euclid_chord``, the node bound of "euclidean" with the linear
gradient relaxation; as ``bounds.objectives`` does for certified_bound): with t = g - g0 in the box
[a, b] (a = gL - g0, b = gU - g0), each t_j^2 <= (a_j + b_j) t_j - a_j b_j (the chord of a convex
function lies above it on [a_j, b_j]), so  ||g - g0||^2 <= c.g - c.g0 - sum_j a_j b_j,  c = a + b, and
one more row of the linear relaxation bounds c.g above on the whole subdomain.  It keeps the
correlation between coordinates that the box norm ||max(b, -a)|| throws away (measured 7-9% lower on
MNIST cnn-small subdomains).
"""

from __future__ import annotations

import torch

OBJECTIVES = ("euclidean", "cosine")


def cos_box_lower(g0: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """(S,) lower bound on cos(g0, g) over g in [lo, hi] (S, n); g0 (n,)."""
    tiny = torch.finfo(lo.dtype).tiny
    n0 = g0.norm()
    num = torch.minimum(g0 * lo, g0 * hi).sum(dim=1)
    mx = torch.maximum(lo.abs(), hi.abs()).norm(dim=1)
    gap = torch.where((lo <= 0) & (hi >= 0), torch.zeros_like(lo), torch.minimum(lo.abs(), hi.abs()))
    mn = gap.norm(dim=1)
    pos = num / (n0 * mx).clamp_min(tiny)
    neg = torch.where(mn > 0, num / (n0 * mn).clamp_min(tiny), torch.full_like(num, -1.0))
    out = torch.where(num >= 0, pos, neg).clamp(-1.0, 1.0)
    # relative slack for our own float64 arithmetic
    out = out - 1e-12
    if float(n0) == 0.0:
        return torch.full_like(num, -1.0)
    return out


def euclid_chord(upper_cg: torch.Tensor, gl: torch.Tensor, gu: torch.Tensor, g0: torch.Tensor) -> torch.Tensor:
    """(S,) upper bound on ||g - g0||_2 over g in [gl, gu] (S, n) with c.g <= ``upper_cg`` (S,),
    c = gl + gu - 2 g0 (module docstring).  Our float64 rounding of the sums is covered by a relative
    slack of 1e-9 on the magnitudes summed (n 2^-53 ~ 1e-13 for n ~ 1e3; the backward pass that produced
    ``upper_cg`` rounds at the same relative level as ``gradient_box_linear``); a box with some
    gl_j > gu_j (empty up to rounding) gets +inf (the caller keeps the box norm)."""
    a, b = gl - g0, gu - g0
    c = a + b
    cg0, ab = (c * g0).sum(dim=1), (a * b).sum(dim=1)
    mag = upper_cg.abs() + (c * g0).abs().sum(dim=1) + (a * b).abs().sum(dim=1)
    mag = mag + (c.abs() * torch.maximum(gl.abs(), gu.abs())).sum(dim=1)
    sq = upper_cg - cg0 - ab + 1e-9 * mag
    out = sq.clamp_min(0).sqrt()
    return torch.where((a > b).any(dim=1), torch.full_like(out, float("inf")), out)


class Objective:
    """Badness functions for one sample: g0 (n,) float64, err (n,) float64 (torch's float error)."""

    def __init__(self, name: str, g0: torch.Tensor, err: torch.Tensor):
        if name not in OBJECTIVES:
            raise ValueError(f"unsupported objective {name!r}; choose from {', '.join(OBJECTIVES)}")
        self.name, self.g0, self.err = name, g0, err
        self.widen = float(err.norm()) if name == "euclidean" else 0.0

    def node(self, gl: torch.Tensor, gu: torch.Tensor) -> torch.Tensor:
        if self.name == "euclidean":
            return torch.maximum(gu - self.g0, self.g0 - gl).norm(dim=1)
        return -cos_box_lower(self.g0, gl - self.err, gu + self.err)

    def leaf(self, g: torch.Tensor) -> torch.Tensor:
        if self.name == "euclidean":
            return (g - self.g0).norm(dim=1)
        return -cos_box_lower(self.g0, g - self.err, g + self.err)

    def real(self, g: torch.Tensor) -> torch.Tensor:
        """Exact badness of gradients g (P, n) (float64 math on torch's values); differentiable."""
        if self.name == "euclidean":
            return (g - self.g0).norm(dim=1)
        na, nb = self.g0.norm(), g.norm(dim=1)
        denom = na * nb
        ok = denom > 0
        cos = ((g * self.g0).sum(dim=1) / torch.where(ok, denom, torch.ones_like(denom))).clamp(-1.0, 1.0)
        fallback = ((na == 0) & (nb == 0)).to(g.dtype)
        return -torch.where(ok, cos, fallback)

    def surrogate_loss(self, g: torch.Tensor) -> torch.Tensor:
        """Smooth loss for PGD on the surrogate (summed over the batch)."""
        if self.name == "euclidean":
            return (g - self.g0).pow(2).sum()
        return self.real(g).sum()

    def closed(self, upper_bad: float, best_bad: float, tol: float) -> bool:
        """Stop rule: euclidean relative (or float-widening size), cosine absolute."""
        if self.name == "euclidean":
            upper = upper_bad + self.widen
            return upper - best_bad <= max(tol * upper, 2 * self.widen)
        return upper_bad - best_bad <= tol

    def report(self, best_bad: float, upper_bad: float) -> tuple[float, float]:
        """(lower, upper) in the user's terms."""
        if self.name == "euclidean":
            return best_bad, upper_bad + self.widen
        return -upper_bad, -best_bad
