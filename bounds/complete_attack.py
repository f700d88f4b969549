"""Incumbents for branch-and-bound: points of the ball whose deviation is measured on the real network.

Every value returned here is ||g(x') - g(x)||_2 with g computed by autograd on the user's model (its
dtype, relu'(0) = 0) at a point x' in the model's dtype that lies in the l_inf ball ∩ domain *as
checked in float64* (``project``; l2: also as a float check of ||x' - x||_2 <= eps in the model's dtype
sees it, ``ball_radii``).  Search: random points of the region (box points and vertices; l2: random
directions at random and full radius), then PGD (sign steps; l2: normalised-gradient steps) on the
softplus surrogate (same weights, beta annealed), scoring every iterate on the real network.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .attribution import logit_gradient
from .complete_mlp import DT, ReluMLP


def ball_radii(eps: float, n: int, dtype) -> tuple[float, float]:
    """(inner, outer) radii for an l2 ball of radius eps in ``dtype``: a point at exact distance <= inner
    passes a float check ||x' - x||_2 <= eps in ``dtype`` (the computed norm errs by at most
    gamma_{n+4} relative, Higham), and every point that passes such a check is at exact distance
    <= outer.  Both use 4 gamma_{n+4} (at least 1e-4 relative for the inner one)."""
    u = float(torch.finfo(dtype).eps) / 2
    k = (n + 4) * u
    g = 4 * k / (1 - k) if k < 0.1 else 0.5
    return eps * (1 - max(1e-4, g)), eps * (1 + g)


def witness_box(x64: torch.Tensor, eps: float, xl: torch.Tensor, xu: torch.Tensor):
    """The l_inf box [xl, xu] for witnesses: where fl64(x -+ eps) rounded outwards (the exact error of
    the subtraction, by TwoSum (Knuth), has that sign) the end point moves one ulp inwards, so that a
    float64 check |x' - x| <= eps accepts every point of the box (the bounds keep [xl, xu])."""

    def two_sum(a: torch.Tensor, b: float) -> tuple[torch.Tensor, torch.Tensor]:
        s = a + b
        bb = s - a
        return s, (a - (s - bb)) + (b - bb)  # a + b = s + err exactly

    lo, e_lo = two_sum(x64, -eps)
    hi, e_hi = two_sum(x64, eps)
    lo = torch.where(e_lo > 0, torch.nextafter(lo, x64), lo)
    hi = torch.where(e_hi < 0, torch.nextafter(hi, x64), hi)
    return torch.maximum(xl, lo), torch.minimum(xu, hi)


def project(points: np.ndarray | torch.Tensor, xl64: torch.Tensor, xu64: torch.Tensor, dtype,
            ball=None) -> torch.Tensor:
    """Round points (P, n) to ``dtype`` inside the region as checked in float64.

    l_inf (``ball`` None): clamp to [xl, xu] and move every coordinate that rounding pushed outside one
    ulp back in (repeatedly).  l2 (``ball`` = (x0 float64 (n,), r): x0 exactly representable in
    ``dtype``, r the inner radius of ``ball_radii``): clamp to the box, scale x' - x0 to length <= r,
    clamp again (x0 lies in the box, so clamping moves every coordinate towards x0: the distance only
    shrinks), then round every coordinate towards x0 (nearest, or one ulp back where nearest went
    away from x0): each rounded coordinate lies between x0_i and x'_i, so the point stays in the box
    and at distance <= r from x0."""
    p = torch.as_tensor(points, dtype=DT)
    p = torch.minimum(torch.maximum(p, xl64), xu64)
    if ball is not None:
        x0, r = ball
        d = p - x0
        nrm = d.norm(dim=1, keepdim=True)
        scale = torch.where(nrm > r, r / nrm.clamp_min(1e-300), torch.ones_like(nrm))
        p = torch.minimum(torch.maximum(x0 + d * scale, xl64), xu64)
        q = p.to(dtype)
        away = (q.to(DT) - x0).abs() > (p - x0).abs()
        return torch.where(away, torch.nextafter(q, x0.to(dtype).expand_as(q)), q)
    q = p.to(dtype)
    for _ in range(4):
        low = q.to(DT) < xl64
        high = q.to(DT) > xu64
        if not (low.any() or high.any()):
            break
        inf = torch.tensor(float("inf"), dtype=dtype)
        q = torch.where(low, torch.nextafter(q, inf), q)
        q = torch.where(high, torch.nextafter(q, -inf), q)
    return q


def real_badness(model: nn.Module, pts: torch.Tensor, target: int, obj, shape) -> tuple:
    """(badness float64 (P,), gradients (P, n) float64) on the real network at points (P, n)."""
    with torch.enable_grad():
        x = pts.reshape(pts.shape[0], *shape).detach().requires_grad_(True)
        t = torch.full((pts.shape[0],), int(target), dtype=torch.long)
        g = logit_gradient(model, x, t).detach().reshape(pts.shape[0], -1).to(DT)
    return obj.real(g), g


def _surrogate_grad(mlp: ReluMLP, x: torch.Tensor, target: int, beta: float) -> torch.Tensor:
    """Saliency of the softplus_beta surrogate (float64, differentiable)."""
    h = x
    zs = []
    for k in range(len(mlp.widths)):
        z = h @ mlp.weights[k].t() + mlp.biases[k]
        zs.append(z)
        h = torch.nn.functional.softplus(z, beta=beta)
    v = mlp.weights[-1][target].unsqueeze(0).expand(x.shape[0], -1)
    for k in range(len(mlp.widths) - 1, -1, -1):
        v = (v * torch.sigmoid(beta * zs[k])) @ mlp.weights[k]
    return v


def attack(
    model: nn.Module,
    mlp: ReluMLP,
    x64: torch.Tensor,
    xl: torch.Tensor,
    xu: torch.Tensor,
    target: int,
    obj,
    shape,
    dtype,
    rng: torch.Generator,
    samples: int = 256,
    restarts: int = 16,
    steps: int = 24,
    ball=None,
) -> tuple[float, torch.Tensor]:
    """Best (badness, point) found by sampling and softplus-surrogate PGD; the point is in ``dtype``.
    l_inf: uniform box points and vertices, sign steps.  l2 (``ball`` = (x0, inner radius)): uniform
    directions at uniform and full radius, normalised-gradient steps; every point goes through
    ``project``."""
    n = x64.numel()
    if ball is None:
        u = torch.rand(samples, n, generator=rng, dtype=DT)
        vert = (torch.rand(samples, n, generator=rng, dtype=DT) > 0.5).to(DT)
        cand = torch.cat([x64.unsqueeze(0), xl + u * (xu - xl), xl + vert * (xu - xl)])
        rad_inf = (xu - xl) / 2
        step = rad_inf.max().item() / 4 if rad_inf.max() > 0 else 0.0
    else:
        r = ball[1]
        dirs = torch.randn(2 * samples, n, generator=rng, dtype=DT)
        dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-300)
        rad = torch.cat([torch.rand(samples, 1, generator=rng, dtype=DT) * r, torch.full((samples, 1), r, dtype=DT)])
        cand = torch.cat([x64.unsqueeze(0), x64 + rad * dirs])
        step = r / 4
    pts = project(cand, xl, xu, dtype, ball)
    dev, _ = real_badness(model, pts, target, obj, shape)
    best_i = int(dev.argmax())
    best, best_pt = float(dev[best_i]), pts[best_i].clone()
    if step <= 0:
        return best, best_pt
    # PGD from the best samples and random starts
    order = dev.argsort(descending=True)[: restarts // 2]
    extra = restarts - order.numel()
    if ball is None:
        start = torch.cat([cand[order], xl + torch.rand(extra, n, generator=rng, dtype=DT) * (xu - xl)])
    else:
        start = torch.cat([cand[order], cand[1 + torch.randint(cand.shape[0] - 1, (extra,), generator=rng)]])
    z = project(start, xl, xu, DT, ball) if ball is not None else start.clone()
    return _pgd(model, mlp, z, xl, xu, target, obj, shape, dtype, steps, step, ball, best, best_pt)


def _pgd(model, mlp, z, xl, xu, target, obj, shape, dtype, steps, step, ball, best, best_pt, splits=None):
    """PGD chains from z (P, n) float64 on the softplus-surrogate badness (beta annealed 10 -> 50),
    plus, with ``splits``, 2 x the normalised descent direction of the split hinge (``_hinge``); sign
    steps (l_inf) or normalised steps projected to ball ∩ box (l2).  Every sixth iterate is projected to
    ``dtype`` and scored on the real network; returns the best (badness, point) including (best, best_pt)."""
    for it in range(steps):
        beta = 10.0 * (1 + 4 * it / max(steps - 1, 1))
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = obj.surrogate_loss(_surrogate_grad(mlp, z, target, beta))
            (grad,) = torch.autograd.grad(loss, z)
            if splits is not None:
                (g_h,) = torch.autograd.grad(_hinge(mlp, z, splits).sum(), z)
                grad = _unit(grad) - 2 * _unit(g_h)
        lr = step * (1 - it / steps) + 1e-3 * step
        if ball is None:
            z = torch.minimum(torch.maximum(z.detach() + lr * grad.sign(), xl), xu)
        else:
            z = project(z.detach() + lr * _unit(grad), xl, xu, DT, ball)
        if it % 6 == 5 or it == steps - 1:
            pts = project(z, xl, xu, dtype, ball)
            dev, _ = real_badness(model, pts, target, obj, shape)
            i = int(dev.argmax())
            if float(dev[i]) > best:
                best, best_pt = float(dev[i]), pts[i].clone()
    return best, best_pt


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)


def _hinge(mlp: ReluMLP, x: torch.Tensor, splits: torch.Tensor) -> torch.Tensor:
    """(P,) sum over split units of relu(-s_i z_i(x)) (z from the dense float64 model, exact relu): zero
    iff every split unit has its split's sign (up to z_i = 0)."""
    h, out = x, torch.zeros(x.shape[0], dtype=x.dtype)
    for k in range(len(mlp.widths)):
        z = h @ mlp.weights[k].t() + mlp.biases[k]
        s = mlp.layer(splits, k).to(x.dtype)
        out = out + torch.relu(-s * z).sum(dim=1)
        h = torch.relu(z)
    return out


def subdomain_attack(
    model: nn.Module,
    mlp: ReluMLP,
    starts: torch.Tensor,
    splits: torch.Tensor,
    xl: torch.Tensor,
    xu: torch.Tensor,
    target: int,
    obj,
    shape,
    dtype,
    steps: int = 24,
    ball=None,
) -> tuple[float, torch.Tensor | None]:
    """PGD inside subdomains (issue 10: "the deviation attack, run inside promising subdomains").

    Chain p starts at ``starts[p]`` (float64 points of the region) and climbs the softplus-surrogate
    badness while a hinge on the split units of ``splits[p]`` (``_hinge``) pulls it into that subdomain:
    step direction = normalised surrogate gradient + 2 x normalised hinge descent direction (sign steps
    for l_inf, normalised steps for l2, as ``attack``).  Every few iterates are projected to ``dtype``
    inside the region and scored on the real network: the returned (badness, point) is a deviation
    actually reached (whether or not the point lies in the subdomain).  (None when nothing beat -inf.)"""
    rad_inf = (xu - xl) / 2
    step = (ball[1] if ball is not None else float(rad_inf.max())) / 4
    best, best_pt = -float("inf"), None
    if step <= 0 or starts.shape[0] == 0:
        return best, best_pt
    return _pgd(model, mlp, starts.clone(), xl, xu, target, obj, shape, dtype, steps, step, ball, best, best_pt,
                splits)
