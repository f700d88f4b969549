"""Attribution methods, batched and differentiable (``create_graph=True``).

All functions share the signature ``(model, x, target=None, *, create_graph=False, ...)`` of Captum's
``attribute(inputs, target=...)``: ``x`` is (B, ...) and ``target`` is None (the predicted label of
``x``), an int, or a (B,) tensor of labels.  They return the signed raw attribution, same shape as
``x``.  :func:`attribution_map` gives the channel-collapsed absolute map used by rank metrics.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .errors import CertattrError, check_input


def resolve_target(model: nn.Module, x: torch.Tensor, target=None) -> torch.Tensor:
    """Labels as a (B,) int64 tensor on x's device; None means argmax of the model's logits."""
    batch = x.shape[0]
    if target is None:
        with torch.no_grad():
            return model(x).argmax(dim=1)
    if isinstance(target, int):
        return torch.full((batch,), target, dtype=torch.long, device=x.device)
    target = torch.as_tensor(target, device=x.device).long().reshape(-1)
    if target.numel() == 1 and batch > 1:
        target = target.expand(batch)
    if target.numel() != batch:
        raise CertattrError(f"target has {target.numel()} entries for a batch of {batch}")
    return target


def _logit_gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """d f_target / dx for the whole batch in one backward pass (samples are independent)."""
    if not x.requires_grad:
        x = x.detach().requires_grad_(True)
    logits = model(x)
    if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        raise CertattrError(f"model must return (B, classes) logits, got shape {tuple(logits.shape)}")
    if int(target.max()) >= logits.shape[1] or int(target.min()) < 0:
        raise CertattrError(f"target out of range for {logits.shape[1]} classes")
    selected = logits.gather(1, target.view(-1, 1)).sum()
    (grad,) = torch.autograd.grad(selected, x, create_graph=create_graph)
    return grad


def saliency(model: nn.Module, x: torch.Tensor, target=None, *, create_graph: bool = False) -> torch.Tensor:
    """Saliency g(x) = d f_y(x) / dx (signed; Simonyan et al. 2014)."""
    check_input(x)
    target = resolve_target(model, x, target)
    return _logit_gradient(model, x, target, create_graph)


def grad_x_input(model: nn.Module, x: torch.Tensor, target=None, *, create_graph: bool = False) -> torch.Tensor:
    """Gradient x input g(x) = x * d f_y(x) / dx (Shrikumar et al. 2016)."""
    check_input(x)
    target = resolve_target(model, x, target)
    return x * _logit_gradient(model, x, target, create_graph)


def integrated_gradients(
    model: nn.Module,
    x: torch.Tensor,
    target=None,
    *,
    create_graph: bool = False,
    steps: int = 50,
    baseline: torch.Tensor | float | None = None,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Integrated gradients with the right Riemann sum (Sundararajan et al. 2017):

    IG_i(x) = (x_i - b_i) * (1/m) sum_{s=1..m} d f_y(b + (s/m)(x - b)) / dx_i,  b = 0 by default.
    The m path points of the whole batch go through the model together (in chunks of
    ``chunk_size`` rows), so there is no per-sample loop.  Equals Captum's
    ``IntegratedGradients(method="riemann_right", n_steps=m)``.
    """
    check_input(x)
    if int(steps) < 1:
        raise CertattrError(f"steps must be >= 1, got {steps}")
    steps = int(steps)
    target = resolve_target(model, x, target)
    if baseline is None:
        baseline = torch.zeros_like(x)
    else:
        baseline = torch.as_tensor(baseline, dtype=x.dtype, device=x.device).expand_as(x)
    batch = x.shape[0]
    alphas = torch.arange(1, steps + 1, dtype=x.dtype, device=x.device) / steps  # (m,)
    diff = x - baseline
    shape = (steps, batch) + tuple(x.shape[1:])
    view = (steps, 1) + (1,) * (x.dim() - 1)
    path = baseline.unsqueeze(0) + alphas.view(view) * diff.unsqueeze(0)  # (m, B, ...)
    path = path.reshape((steps * batch,) + tuple(x.shape[1:]))
    path_target = target.repeat(steps)
    if not create_graph:
        path = path.detach()
    grads = []
    for start in range(0, path.shape[0], max(1, int(chunk_size))):
        chunk = path[start:start + chunk_size]
        if not chunk.requires_grad:
            chunk = chunk.requires_grad_(True)
        grads.append(_logit_gradient_at(model, chunk, path_target[start:start + chunk_size], create_graph))
    mean_grad = torch.cat(grads).reshape(shape).mean(dim=0)
    return diff * mean_grad


def _logit_gradient_at(model, points, target, create_graph):
    logits = model(points)
    selected = logits.gather(1, target.view(-1, 1)).sum()
    (grad,) = torch.autograd.grad(selected, points, create_graph=create_graph)
    return grad


def smoothgrad(
    model: nn.Module,
    x: torch.Tensor,
    target=None,
    *,
    create_graph: bool = False,
    sigma: float = 0.15,
    n: int = 50,
    seed: int = 0,
) -> torch.Tensor:
    """SmoothGrad (Smilkov et al. 2017): (1/n) sum_i saliency(x + N(0, sigma^2 I)), target fixed to
    the label of the clean x.  ``sigma`` is absolute (in input units); noise is drawn from ``seed``."""
    check_input(x)
    if sigma < 0 or int(n) < 1:
        raise CertattrError(f"smoothgrad needs sigma >= 0 and n >= 1, got sigma={sigma}, n={n}")
    target = resolve_target(model, x, target)
    gen = torch.Generator(device=x.device).manual_seed(int(seed))
    noise = torch.randn((int(n),) + tuple(x.shape), generator=gen, device=x.device, dtype=x.dtype) * sigma
    noisy = (x.unsqueeze(0) + noise).reshape((int(n) * x.shape[0],) + tuple(x.shape[1:]))
    if not create_graph:
        noisy = noisy.detach()
    grad = _logit_gradient(model, noisy, target.repeat(int(n)), create_graph)
    return grad.reshape((int(n),) + tuple(x.shape)).mean(dim=0)


ATTRIBUTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "saliency": saliency,
    "grad_x_input": grad_x_input,
    "ig": integrated_gradients,
    "integrated_gradients": integrated_gradients,
    "smoothgrad": smoothgrad,
}


def get_attribution(name: str) -> Callable[..., torch.Tensor]:
    """Look up an attribution function by name (saliency, grad_x_input, ig, smoothgrad)."""
    if name not in ATTRIBUTIONS:
        raise CertattrError(f"unknown attribution {name!r}; choose from {', '.join(ATTRIBUTIONS)}")
    return ATTRIBUTIONS[name]


def attribution_map(g: torch.Tensor) -> torch.Tensor:
    """Map for rank metrics: m_ij = sum_c |g_cij|, flattened to (B, H*W).  Accepts (B,C,H,W) or (B,H,W)."""
    if g.dim() == 4:
        return g.abs().sum(dim=1).flatten(1)
    if g.dim() == 3:
        return g.abs().flatten(1)
    if g.dim() == 2:
        return g.abs()
    raise CertattrError(f"attribution must be (B,C,H,W), (B,H,W) or (B,n), got shape {tuple(g.shape)}")
