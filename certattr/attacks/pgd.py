"""Projected gradient descent on the prediction (Madry et al., ICLR 2018, "Towards Deep Learning Models
Resistant to Adversarial Attacks"): ``x <- Proj_{B_p(x0, eps) ∩ [lo, hi]}(x + alpha * s)``, with
``s = sign(grad L)`` for l_inf and ``grad L / ||grad L||_2`` for l_2, L = cross-entropy (or ``loss_fn``).

Also the inner maximisation of adversarial training (PGD-AT, TRADES, IG-NORM): it works in train mode,
leaves the model's mode alone and never writes parameter gradients (only ``torch.autograd.grad`` w.r.t.
the input is taken).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CertattrError, check_eps, check_norm
from .base import (
    SampleStream,
    assert_feasible,
    check_batch,
    check_positive_int,
    check_step_size,
    project,
    resolve_labels,
    sample_keys,
    stack,
    step,
)

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _cross_entropy(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x_adv), y, reduction="none")


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | int | None = None,
    *,
    eps: float,
    norm: str | int = "inf",
    steps: int = 40,
    step_size: float = 0.01,
    random_start: bool = True,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    domain: tuple[float, float] | None = (0.0, 1.0),
    restarts: int = 1,
) -> torch.Tensor:
    """Adversarial inputs (B, ...) maximising ``loss_fn(model, x_adv, y)`` over ``B_p(x, eps) ∩ domain``.

    ``y``: labels (None: the model's argmax at x).  ``loss_fn(model, x_adv, y)`` returns per-sample
    losses (B,) or their scalar sum/mean (default: cross-entropy), e.g. TRADES' KL:
    ``lambda m, xa, y: F.kl_div(F.log_softmax(m(xa), 1), p_clean, reduction="none").sum(1)``.
    With ``restarts > 1`` the restarts are stacked restart-major into one batch of R*B rows (tensors a
    loss_fn captured for the clean batch must be ``.repeat(R, ...)``) and, per sample, the restart with
    the largest final loss is returned (per-sample losses needed).  ``random_start``: uniform in the
    ball (restart 0 too); noise is a function of (seed, restart, sample), independent of the batch.
    """
    x, dom = check_batch(x, domain)
    eps = check_eps(eps)
    norm = check_norm(norm)
    steps = check_positive_int(steps, "steps", minimum=0)
    step_size = check_step_size(step_size)
    restarts = check_positive_int(restarts, "restarts")
    loss_fn = loss_fn or _cross_entropy
    y = resolve_labels(model, x, y)

    x0 = stack(x, restarts)
    ys = stack(y, restarts)
    xa = x0.clone()
    if random_start and eps > 0:
        stream = SampleStream(sample_keys(x, seed, restarts), x.shape[1:], x.dtype)
        xa = project(x0 + stream.ball(eps, norm), x0, eps, norm, dom)
    with torch.enable_grad():
        for _ in range(steps):
            xa = xa.detach().requires_grad_(True)
            loss = loss_fn(model, xa, ys)
            (grad,) = torch.autograd.grad(loss.sum(), xa)
            xa = project(step(xa.detach(), grad, step_size, norm), x0, eps, norm, dom)
    xa = xa.detach()
    if restarts > 1:
        with torch.no_grad():
            final = loss_fn(model, xa, ys)
        if final.dim() != 1 or final.shape[0] != xa.shape[0]:
            raise CertattrError("pgd with restarts > 1 needs a loss_fn that returns one loss per sample")
        pick = final.view(restarts, -1).argmax(dim=0)
        cols = torch.arange(x.shape[0], device=x.device)
        xa = xa[pick * x.shape[0] + cols]
    assert_feasible(xa, x, eps, norm, dom)
    return xa
