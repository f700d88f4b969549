"""Incumbents and split scores of the input branch-and-bound (``complete_input``), on the REAL network.

Every deviation returned here is the objective's badness of torch's attribution A(x') (``attribution``:
saliency, gradient x input or IG with the caller's ``ig_steps``), computed by autograd on the user's model
in its dtype, at a point x' in the model's dtype that lies in B_p(x, eps) ∩ domain as BOTH a float64 and
a model-dtype check see it (``to_ball``: project in float64, round, verify, shrink towards x the rows that
fail; x itself always passes).

Search (``pgd``): projected gradient ascent on the badness, l_inf sign steps / l2 normalised steps of
eps/4 decaying to eps/40, from seeded random starts, every iterate scored on the real net.  The ascent
direction is the autograd gradient of the badness through the attribution (create_graph); for a net with
ReLUs (whose saliency is piecewise constant, second derivative 0) half the restarts follow a softplus
(beta 10) copy of the net instead (``surrogate``), still scored on the real net.  Inside a subdomain S
(a box) the iterates are clamped to S before the ball projection.

Split score (``smear``): for a box S with widths w and centre c, score_j = w_j * ||J_{:,j}||_2 with
J = dA/dx at c (ReluVal's "smear" with the Jacobian of the attribution), ||J_{:,j}||^2 estimated as
E_v (J^T v)_j^2 over seeded Gaussian probes v (one double-backward pass each, batched over boxes).
Halving w_j removes roughly w_j ||J_{:,j}|| / 2 from a first-order bound of the attribution's spread.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .attribution import attribution as compute_attribution

DT = torch.float64


def surrogate(model: nn.Module, beta: float = 10.0) -> nn.Module | None:
    """A copy of ``model`` with every nn.ReLU replaced by Softplus(beta); None if it has no nn.ReLU."""
    if not any(isinstance(m, nn.ReLU) for m in model.modules()):
        return None
    sur = copy.deepcopy(model)

    def swap(mod: nn.Module) -> None:
        for name, child in mod.named_children():
            if isinstance(child, nn.ReLU):
                setattr(mod, name, nn.Softplus(beta=beta))
            else:
                swap(child)

    swap(sur)
    return sur.eval()


class Deviation:
    """The badness of the attribution of one sample x (1, *shape) for a fixed target, on the real model."""

    def __init__(self, model: nn.Module, x: torch.Tensor, target: int, attribution: str, steps: int, objective):
        self.model, self.x, self.attribution, self.steps = model, x, attribution, int(steps)
        self.target = int(target)
        self.shape = tuple(x.shape[1:])
        self.dtype = x.dtype
        self.grad_models = [model] + [m for m in (surrogate(model),) if m is not None]
        self.obj = None
        self.g0 = self.attr(x).to(DT).reshape(-1)  # A(x) of the sample alone, as a caller recomputes it
        self.obj = objective(self.g0)

    def attr(self, pts: torch.Tensor, model: nn.Module | None = None, create_graph: bool = False) -> torch.Tensor:
        """A(pts) (P, n) in the model's dtype."""
        p = pts.reshape(pts.shape[0], *self.shape)
        t = torch.full((p.shape[0],), self.target, dtype=torch.long, device=p.device)
        with torch.enable_grad():
            a = compute_attribution(model or self.model, p, t, self.attribution, steps=self.steps,
                                    create_graph=create_graph)
        return a.reshape(p.shape[0], -1)

    def badness(self, pts: torch.Tensor) -> torch.Tensor:
        """(P,) float64 badness of the real model's attribution at points (P, n) of the model's dtype."""
        return self.obj.real(self.attr(pts).detach().to(DT)).detach()

    def ascent(self, pts: torch.Tensor, which: int) -> torch.Tensor:
        """d badness / dx' (P, n) float64, through grad_models[which] (create_graph)."""
        q = pts.detach().reshape(pts.shape[0], *self.shape).requires_grad_(True)
        with torch.enable_grad():
            a = self.attr(q, self.grad_models[which], create_graph=True).to(DT)
            loss = self.obj.surrogate_loss(a)
            # an attribution that does not depend on x' (saliency of an affine net): no ascent direction
            g = torch.autograd.grad(loss, q, allow_unused=True)[0] if loss.requires_grad else None
        if g is None:
            return torch.zeros(pts.shape[0], q[0].numel(), dtype=DT)
        return torch.nan_to_num(g.detach().reshape(pts.shape[0], -1).to(DT))


def _inside(q: torch.Tensor, x64: torch.Tensor, xd: torch.Tensor, eps: float, norm: str, dom) -> torch.Tensor:
    """(P,) bool: q (P, n) in the ball ∩ domain, checked in float64 and in q's dtype."""
    d64 = q.to(DT) - x64
    dd = q - xd
    # the model-dtype norm is compared as a float64 number (stricter than comparing with eps rounded to dtype)
    if norm == "inf":
        ok = (d64.abs().amax(dim=1) <= eps) & (dd.abs().amax(dim=1).to(DT) <= eps)
    else:
        ok = (d64.norm(dim=1) <= eps) & (dd.norm(dim=1).to(DT) <= eps)
    if dom is not None:
        ok &= (q.to(DT) >= dom[0]).all(dim=1) & (q.to(DT) <= dom[1]).all(dim=1)
        ok &= (q >= dom[0]).all(dim=1) & (q <= dom[1]).all(dim=1)
    return ok


def project64(p: torch.Tensor, x64: torch.Tensor, eps: float, norm: str, dom) -> torch.Tensor:
    """Projection (float64) of points (P, n) onto the ball, then the clamp to the domain (which moves
    coordinates towards x, x being in the domain, so the point stays in the ball)."""
    d = p - x64
    if norm == "inf":
        d = d.clamp(-eps, eps)
    else:
        nrm = d.norm(dim=1, keepdim=True)
        d = d * (eps / nrm.clamp_min(1e-300)).clamp(max=1.0)
    w = x64 + d
    return w.clamp(dom[0], dom[1]) if dom is not None else w


def to_ball(p: torch.Tensor, x64: torch.Tensor, xd: torch.Tensor, eps: float, norm: str, dom) -> torch.Tensor:
    """Points (P, n) float64 -> points in the model's dtype (xd's) inside the ball ∩ domain (``_inside``)."""
    d = project64(p, x64, eps, norm, dom) - x64
    q = xd.expand_as(d).clone()
    todo = torch.ones(d.shape[0], dtype=torch.bool)
    for i in range(64):
        w = x64 + d[todo]
        if dom is not None:
            w = w.clamp(dom[0], dom[1])
        cand = w.to(xd.dtype)
        ok = _inside(cand, x64, xd, eps, norm, dom)
        rows = torch.nonzero(todo).flatten()
        q[rows[ok]] = cand[ok]
        todo[rows[ok]] = False
        if not bool(todo.any()):
            break
        d[todo] = d[todo] * (1 - 2.0 ** min(-1, i - 10))  # shrink towards x: 1 ulp-ish first, then halve
        d[todo] = torch.where(d[todo].abs() < 1e-30, torch.zeros_like(d[todo]), d[todo])
    return q  # rows still failing stay at x


def sample_ball(count: int, x64: torch.Tensor, eps: float, norm: str, dom, gen: torch.Generator) -> torch.Tensor:
    """count float64 points: half uniform in the ball, half on its boundary (l_inf vertices, l2 sphere)."""
    n = x64.numel()
    half = count // 2
    if norm == "inf":
        uni = (torch.rand(count - half, n, generator=gen, dtype=DT) * 2 - 1) * eps
        edge = torch.where(torch.rand(half, n, generator=gen, dtype=DT) < 0.5, -eps, eps)
    else:
        dirs = torch.randn(count, n, generator=gen, dtype=DT)
        dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-300)
        r = torch.rand(count - half, 1, generator=gen, dtype=DT) ** (1.0 / n)
        uni, edge = dirs[half:] * eps * r, dirs[:half] * eps
    return project64(x64 + torch.cat([uni, edge]), x64, eps, norm, dom)


def pgd(dev: Deviation, starts: torch.Tensor, x64, eps: float, norm: str, dom, steps: int,
        box: tuple[torch.Tensor, torch.Tensor] | None = None, deadline: float | None = None):
    """PGD from float64 ``starts`` (P, n); returns (best badness, its point in the model's dtype).
    ``box``: (lo, hi) (P, n) per-start boxes the iterates are clamped to (then projected on the ball)."""
    import time

    xd = dev.x.reshape(1, -1)
    z = starts.clone()
    best, best_pt = -float("inf"), None
    groups = torch.arange(z.shape[0]) % len(dev.grad_models)
    for t in range(steps + 1):
        q = to_ball(z if box is None else z.clamp(box[0], box[1]), x64, xd, eps, norm, dom)
        vals = dev.badness(q)
        i = int(vals.argmax())
        if float(vals[i]) > best:
            best, best_pt = float(vals[i]), q[i].clone()
        if t == steps or (deadline is not None and time.perf_counter() > deadline):
            break
        grad = torch.zeros_like(z)
        for k in range(len(dev.grad_models)):
            rows = groups == k
            if rows.any():
                grad[rows] = dev.ascent(q[rows], k)
        lr = eps / 4 * (0.1 ** (t / max(1, steps - 1)))
        if norm == "inf":
            z = q.to(DT) + lr * grad.sign()
        else:
            z = q.to(DT) + lr * grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-300)
        z = project64(z, x64, eps, norm, dom)
    return best, best_pt


def smear(dev: Deviation, lo: torch.Tensor, hi: torch.Tensor, gen: torch.Generator, probes: int = 2) -> torch.Tensor:
    """(S,) coordinate to split for each box (lo, hi) (S, n): argmax of w_j ||J_{:,j}|| (module docstring),
    the widest coordinate where the estimate vanishes."""
    width = hi - lo
    centre = ((lo + hi) / 2).to(dev.dtype)
    model = dev.grad_models[-1]  # the softplus copy of a ReLU net (a ReLU net's J is 0 a.e.)
    q = centre.reshape(centre.shape[0], *dev.shape).requires_grad_(True)
    acc = torch.zeros_like(width)
    with torch.enable_grad():
        a = dev.attr(q, model, create_graph=True)
        for k in range(probes):
            v = torch.randn(a.shape, generator=gen, dtype=DT).to(a.dtype)
            (g,) = torch.autograd.grad((a * v).sum(), q, retain_graph=k < probes - 1, allow_unused=True)
            if g is not None:
                acc += g.detach().reshape(width.shape).to(DT).pow(2)
    score = torch.nan_to_num(width * (acc / probes).sqrt())
    flat = score.amax(dim=1) <= 0
    score[flat] = width[flat]
    return score.argmax(dim=1)


def widest(lo: torch.Tensor, hi: torch.Tensor, root_width: torch.Tensor) -> torch.Tensor:
    """(S,) the coordinate with the largest width relative to the root box."""
    return ((hi - lo) / root_width.clamp_min(1e-300)).argmax(dim=1)
