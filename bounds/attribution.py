"""The attribution maps that the bounds are about, as differentiable batched torch functions.

g(x) for a fixed label y (SPEC 1):  saliency d f_y/dx;  grad x input x * d f_y/dx;
integrated gradients (right Riemann sum, baseline b = 0 by default)
IG_i(x) = (x_i - b_i) (1/m) sum_{s=1..m} d f_y(b + (s/m)(x - b))/dx_i  (Sundararajan et al. 2017).
``certattr.attributions`` wraps these with input checks and Captum-style signatures.
"""
from __future__ import annotations

import torch
from torch import nn

NAMES = ("saliency", "grad_x_input", "ig")


def logit_gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """d f_target(x) / dx for a whole batch in one backward pass (samples are independent)."""
    if not x.requires_grad:
        x = x.detach().requires_grad_(True)
    logits = model(x)
    if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(f"model must return (B, classes) logits, got shape {tuple(logits.shape)}")
    if int(target.max()) >= logits.shape[1] or int(target.min()) < 0:
        raise ValueError(f"target out of range for {logits.shape[1]} classes")
    selected = logits.gather(1, target.view(-1, 1)).sum()
    (grad,) = torch.autograd.grad(selected, x, create_graph=create_graph)
    return grad


def integrated_gradients(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    steps: int = 50,
    baseline: torch.Tensor | None = None,
    create_graph: bool = False,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """IG with the right Riemann sum; the m path points of the batch run through the model together
    (in chunks of ``chunk_size`` rows).  Equals Captum's IntegratedGradients(method="riemann_right")."""
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if baseline is None:
        baseline = torch.zeros_like(x)
    batch, rest = x.shape[0], tuple(x.shape[1:])
    alphas = torch.arange(1, steps + 1, dtype=x.dtype, device=x.device) / steps
    diff = x - baseline
    path = baseline.unsqueeze(0) + alphas.view((steps,) + (1,) * x.dim()) * diff.unsqueeze(0)
    path = path.reshape((steps * batch,) + rest)
    if not create_graph:
        path = path.detach()
    path_target = target.repeat(steps)
    grads = []
    for start in range(0, path.shape[0], max(1, int(chunk_size))):
        stop = start + int(chunk_size)
        grads.append(logit_gradient(model, path[start:stop], path_target[start:stop], create_graph))
    return diff * torch.cat(grads).reshape((steps, batch) + rest).mean(dim=0)


def attribution(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    name: str = "saliency",
    *,
    steps: int = 50,
    create_graph: bool = False,
) -> torch.Tensor:
    """g(x) by name: "saliency" | "grad_x_input" | "ig" (``steps`` path points for IG)."""
    if name == "saliency":
        return logit_gradient(model, x, target, create_graph)
    if name == "grad_x_input":
        return x * logit_gradient(model, x, target, create_graph)
    if name in ("ig", "integrated_gradients"):
        return integrated_gradients(model, x, target, steps=steps, create_graph=create_graph)
    raise ValueError(f"unknown attribution {name!r}; choose from {', '.join(NAMES)}")
