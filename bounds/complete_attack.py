"""Incumbents for branch-and-bound: points of the ball whose deviation is measured on the real network.

Every value returned here is ||g(x') - g(x)||_2 with g computed by autograd on the user's model (its
dtype, relu'(0) = 0) at a point x' in the model's dtype that lies in the l_inf ball ∩ domain *as
checked in float64* (``project``).  Search: random box points and vertices, then PGD (sign steps) on
the softplus surrogate (same weights, beta annealed), scoring every iterate on the real network.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .attribution import logit_gradient
from .complete_mlp import DT, ReluMLP


def project(points: np.ndarray | torch.Tensor, xl64: torch.Tensor, xu64: torch.Tensor, dtype) -> torch.Tensor:
    """Round points (P, n) to ``dtype`` and move every coordinate that rounding pushed outside
    [xl, xu] (float64 box) one ulp back in (repeatedly): the result lies in the box exactly."""
    p = torch.as_tensor(points, dtype=DT)
    p = torch.minimum(torch.maximum(p, xl64), xu64)
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
) -> tuple[float, torch.Tensor]:
    """Best (badness, point) found by sampling and softplus-surrogate PGD; the point is in ``dtype``."""
    n = x64.numel()
    rad = (xu - xl) / 2
    u = torch.rand(samples, n, generator=rng, dtype=DT)
    vert = (torch.rand(samples, n, generator=rng, dtype=DT) > 0.5).to(DT)
    cand = torch.cat([x64.unsqueeze(0), xl + u * (xu - xl), xl + vert * (xu - xl)])
    pts = project(cand, xl, xu, dtype)
    dev, _ = real_badness(model, pts, target, obj, shape)
    best_i = int(dev.argmax())
    best, best_pt = float(dev[best_i]), pts[best_i].clone()
    # PGD from the best samples and random starts
    order = dev.argsort(descending=True)[: restarts // 2]
    start = torch.cat(
        [cand[order], xl + torch.rand(restarts - order.numel(), n, generator=rng, dtype=DT) * (xu - xl)]
    )
    z = start.clone()
    step = rad.max().item() / 4 if rad.max() > 0 else 0.0
    for it in range(steps):
        beta = 10.0 * (1 + 4 * it / max(steps - 1, 1))
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = obj.surrogate_loss(_surrogate_grad(mlp, z, target, beta))
            (grad,) = torch.autograd.grad(loss, z)
        lr = step * (1 - it / steps) + 1e-3 * step
        z = torch.minimum(torch.maximum(z.detach() + lr * grad.sign(), xl), xu)
        if it % 6 == 5 or it == steps - 1:
            pts = project(z, xl, xu, dtype)
            dev, _ = real_badness(model, pts, target, obj, shape)
            i = int(dev.argmax())
            if float(dev[i]) > best:
                best, best_pt = float(dev[i]), pts[i].clone()
    return best, best_pt
