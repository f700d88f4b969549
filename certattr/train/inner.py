"""Building blocks of the robust trainers: inner maximisation (PGD), projections, the softplus branch,
the attributions the losses differentiate through, and mode handling.

Inner loops are *detached*: they only need d objective / d x', computed with ``torch.autograd.grad``
with respect to the input, so they never leave gradients on the parameters.  The returned x* is a
constant for the outer loss, which then differentiates (``create_graph=True`` where an attribution is
involved) through the model at x*.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CertattrError, check_norm

Objective = Callable[[torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------ modes
@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with ``model.eval()`` and restore every submodule's own training flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def softplus_branch(model: nn.Module, beta: float | None) -> Iterator[nn.Module]:
    """Temporarily replace every ``nn.ReLU`` of ``model`` by ``nn.Softplus(beta)`` *sharing the weights*.

    softplus_beta(z) = log(1 + exp(beta z)) / beta -> relu(z) as beta -> inf.  Unlike
    :func:`certattr.models.softplus_surrogate` (a copy) the branch is the model itself, so gradients
    of a loss computed inside the block reach the model's parameters (ART's "softplus beta branch",
    Singh et al. ECCV 2020).  Autograd records operations, not modules, so a graph built inside the
    block stays valid after the ReLUs are put back.  ``beta=None`` leaves the model as it is.
    """
    if beta is None:
        yield model
        return
    if beta <= 0:
        raise CertattrError(f"softplus beta must be > 0, got {beta}")
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                swapped.append((parent, name, child))
    try:
        for parent, name, _ in swapped:
            setattr(parent, name, nn.Softplus(beta=float(beta)))
        yield model
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


# ------------------------------------------------------------------------------------ projections
def project(
    x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str, lo: float = 0.0, hi: float = 1.0
) -> torch.Tensor:
    """Projection onto B_p(x, eps) ∩ [lo, hi]^n: exact for linf (clamp), for l2 the ball projection
    ``x + delta * min(1, eps / ||delta||_2)`` followed by clipping to the domain (clipping towards x
    never leaves the ball, since each coordinate of delta only shrinks)."""
    delta = x_adv - x
    if norm == "inf":
        delta = delta.clamp(-eps, eps)
    else:
        flat = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        scale = (eps / flat).clamp(max=1.0).view((-1,) + (1,) * (x.dim() - 1))
        delta = delta * scale
    return (x + delta).clamp(lo, hi)


def ascent_step(x_adv: torch.Tensor, grad: torch.Tensor, step_size: float, norm: str) -> torch.Tensor:
    """Steepest ascent step: ``step * sign(grad)`` (linf) or ``step * grad / ||grad||_2`` (l2)."""
    if norm == "inf":
        return x_adv + step_size * grad.sign()
    flat = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view((-1,) + (1,) * (grad.dim() - 1))
    return x_adv + step_size * grad / flat


def inner_max(
    objective: Objective,
    x: torch.Tensor,
    *,
    model: nn.Module,
    y: torch.Tensor,
    eps: float,
    norm: str = "inf",
    steps: int = 40,
    step_size: float = 0.01,
    random_init: bool | str = True,
    domain: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """Projected gradient ascent (Madry et al. 2018) on ``objective(x') -> (B,)`` per-sample values:

    x'_{t+1} = Proj_{B_p(x, eps) ∩ [lo, hi]^n}( x'_t + step * dir(grad_x' sum_b objective_b(x'_t)) ),
    run by :func:`certattr.attacks.pgd` (``loss_fn``; only input gradients, no parameter gradients).
    ``random_init``: True (uniform in the ball; the attack's seed is drawn from torch's global generator,
    which the training loop seeds per epoch, so runs are reproducible and resumable), False (start at
    x), or "trades" (x + 0.001 N(0, I), Zhang et al. 2019: a start attacks.pgd does not offer, so that
    variant runs the same iteration here).  Returns the last iterate, detached.
    """
    norm = check_norm(norm)
    lo, hi = float(domain[0]), float(domain[1])
    x = x.detach()
    if eps == 0:
        return x.clone()
    if random_init != "trades":
        from ..attacks import pgd

        seed = int(torch.randint(0, 2**31 - 1, (1,)))
        return pgd(
            model,
            x,
            y,
            eps=eps,
            norm=norm,
            steps=int(steps),
            step_size=step_size,
            random_start=bool(random_init),
            seed=seed,
            loss_fn=lambda _m, z, _y: objective(z),
            domain=(lo, hi),
        )
    x_adv = project(x + 0.001 * torch.randn_like(x), x, eps, norm, lo, hi)
    for _ in range(int(steps)):
        x_adv = x_adv.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(x_adv).sum(), x_adv)
        x_adv = project(ascent_step(x_adv.detach(), grad, step_size, norm), x, eps, norm, lo, hi)
    return x_adv.detach()


# ----------------------------------------------------------------------------------- attributions
def loss_ig(
    model: nn.Module,
    x: torch.Tensor,
    x_star: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    *,
    create_graph: bool,
) -> torch.Tensor:
    """IG of the cross-entropy from x to x* (Chen et al., NeurIPS 2019), right Riemann sum:

    IG^CE(x -> x*) = (x* - x) * (1/m) sum_{s=1..m} grad_z CE(f(z), y) at z = x + (s/m)(x* - x).
    The m path points of the whole batch go through the model at once.  Gradients flow to x* (when it
    requires grad, e.g. in the inner attack) and, with ``create_graph=True``, to the parameters.
    Summation: sum_i IG_i ~ CE(x*) - CE(x).
    """
    m = int(steps)
    alphas = torch.arange(1, m + 1, device=x.device, dtype=x.dtype) / m
    diff = x_star - x
    path = x.unsqueeze(0) + alphas.view((m,) + (1,) * x.dim()) * diff.unsqueeze(0)
    path = path.reshape((m * x.shape[0],) + tuple(x.shape[1:]))
    if not path.requires_grad:
        path.requires_grad_(True)
    logits = model(path)
    # sum of per-point CE: the gradient at each point is that point's own grad_z CE (samples independent)
    ce = F.cross_entropy(logits, y.repeat(m), reduction="sum")
    (grad,) = torch.autograd.grad(ce, path, create_graph=create_graph or x_star.requires_grad)
    return diff * grad.reshape((m,) + tuple(x.shape)).mean(dim=0)


def logit_ig(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, steps: int, *, create_graph: bool
) -> torch.Tensor:
    """IG of the logit f_target with baseline 0 (SPEC 1): x * (1/m) sum_s grad f_t((s/m) x).  Differentiable
    in x whenever x requires grad, and in the parameters with ``create_graph=True``."""
    m = int(steps)
    alphas = torch.arange(1, m + 1, device=x.device, dtype=x.dtype) / m
    path = (alphas.view((m,) + (1,) * x.dim()) * x.unsqueeze(0)).reshape(
        (m * x.shape[0],) + tuple(x.shape[1:])
    )
    if not path.requires_grad:
        path.requires_grad_(True)
    selected = model(path).gather(1, target.repeat(m).view(-1, 1)).sum()
    (grad,) = torch.autograd.grad(selected, path, create_graph=create_graph or x.requires_grad)
    return x * grad.reshape((m,) + tuple(x.shape)).mean(dim=0)


def logit_saliency(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, create_graph: bool
) -> torch.Tensor:
    """Saliency d f_target / dx, differentiable in x (when x requires grad) and, with create_graph, in
    the weights."""
    inp = x if x.requires_grad else x.detach().requires_grad_(True)
    selected = model(inp).gather(1, target.view(-1, 1)).sum()
    (grad,) = torch.autograd.grad(selected, inp, create_graph=create_graph or x.requires_grad)
    return grad


def attribution(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, name: str, *, ig_steps: int, create_graph: bool
) -> torch.Tensor:
    """saliency | grad_x_input | ig of the logit of ``target``, batched and differentiable."""
    if name == "saliency":
        return logit_saliency(model, x, target, create_graph=create_graph)
    if name == "grad_x_input":
        return x * logit_saliency(model, x, target, create_graph=create_graph)
    if name == "ig":
        return logit_ig(model, x, target, ig_steps, create_graph=create_graph)
    raise CertattrError(f"unknown training attribution {name!r}; choose saliency, grad_x_input or ig")


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity of two (B, ...) tensors (0 when either is zero)."""
    a, b = a.flatten(1), b.flatten(1)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


def kl_rows(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(softmax(p) || softmax(q)) = sum_c p_c (log p_c - log q_c)."""
    log_p = F.log_softmax(logits_p, dim=1)
    log_q = F.log_softmax(logits_q, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1)


def most_confusing(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """argmax_{c != y} logits_c: the strongest wrong class per sample."""
    masked = logits.detach().clone()
    masked.scatter_(1, y.view(-1, 1), -math.inf)
    return masked.argmax(1)
