"""Attribution methods, batched and differentiable (``create_graph=True``).

All functions share the signature ``(model, x, target=None, *, create_graph=False, ...)`` of Captum's
``attribute(inputs, target=...)``: ``x`` is (B, ...) and ``target`` is None (the predicted label of
``x``), an int, or a (B,) tensor of labels.  They return the signed raw attribution, same shape as
``x``.  :func:`attribution_map` gives the channel-collapsed absolute map used by rank metrics.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bounds.attribution import integrated_gradients as _ig_core
from bounds.attribution import logit_gradient

from .errors import CertattrError, check_input


def check_model_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x must be a finite float batch (B, ...) matching the model's recorded input shape, if any."""
    check_input(x)
    if x.dim() < 2:
        raise CertattrError(f"x must be a batch (B, C, H, W) or (B, n), got shape {tuple(x.shape)}")
    spec = getattr(model, "certattr_spec", None) or {}
    in_shape = spec.get("kwargs", {}).get("in_shape")
    if in_shape is not None and tuple(x.shape[1:]) != tuple(in_shape):
        raise CertattrError(f"x has shape {tuple(x.shape)} but the model takes (B, {', '.join(map(str, in_shape))})")
    return x


def resolve_target(model: nn.Module, x: torch.Tensor, target=None) -> torch.Tensor:
    """Labels as a (B,) int64 tensor on x's device; None means argmax of the model's logits."""
    batch = x.shape[0]
    if target is None:
        with torch.no_grad():
            try:
                logits = model(x)
            except RuntimeError as exc:
                raise CertattrError(f"the model cannot take x of shape {tuple(x.shape)}: {exc}") from None
            if logits.dim() != 2 or logits.shape[0] != batch:
                raise CertattrError(f"model must return (B, classes) logits, got shape {tuple(logits.shape)}")
            return logits.argmax(dim=1)
    if isinstance(target, int):
        return torch.full((batch,), target, dtype=torch.long, device=x.device)
    target = torch.as_tensor(target, device=x.device).long().reshape(-1)
    if target.numel() == 1 and batch > 1:
        target = target.expand(batch)
    if target.numel() != batch:
        raise CertattrError(f"target has {target.numel()} entries for a batch of {batch}")
    return target


def _checked_gradient(model, x, target, create_graph):
    try:
        return logit_gradient(model, x, target, create_graph)
    except (ValueError, RuntimeError) as exc:
        raise CertattrError(str(exc)) from None


def saliency(model: nn.Module, x: torch.Tensor, target=None, *, create_graph: bool = False) -> torch.Tensor:
    """Saliency g(x) = d f_y(x) / dx (signed; Simonyan et al. 2014)."""
    check_model_input(model, x)
    target = resolve_target(model, x, target)
    return _checked_gradient(model, x, target, create_graph)


def grad_x_input(model: nn.Module, x: torch.Tensor, target=None, *, create_graph: bool = False) -> torch.Tensor:
    """Gradient x input g(x) = x * d f_y(x) / dx (Shrikumar et al. 2016)."""
    check_model_input(model, x)
    target = resolve_target(model, x, target)
    return x * _checked_gradient(model, x, target, create_graph)


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
    check_model_input(model, x)
    if int(steps) < 1:
        raise CertattrError(f"steps must be >= 1, got {steps}")
    target = resolve_target(model, x, target)
    if baseline is not None:
        baseline = torch.as_tensor(baseline, dtype=x.dtype, device=x.device).expand_as(x)
    return _ig_core(model, x, target, steps=int(steps), baseline=baseline, create_graph=create_graph,
                    chunk_size=chunk_size)


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
    check_model_input(model, x)
    if sigma < 0 or int(n) < 1:
        raise CertattrError(f"smoothgrad needs sigma >= 0 and n >= 1, got sigma={sigma}, n={n}")
    target = resolve_target(model, x, target)
    gen = torch.Generator(device=x.device).manual_seed(int(seed))
    noise = torch.randn((int(n),) + tuple(x.shape), generator=gen, device=x.device, dtype=x.dtype) * sigma
    noisy = (x.unsqueeze(0) + noise).reshape((int(n) * x.shape[0],) + tuple(x.shape[1:]))
    if not create_graph:
        noisy = noisy.detach()
    grad = _checked_gradient(model, noisy, target.repeat(int(n)), create_graph)
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
