"""Training losses, one per method, registered by name (SPEC 5).

A loss is ``fn(model, x, y, hp) -> scalar tensor`` where ``hp`` is the dict of the method's
hyperparameters (defaults from :data:`DEFAULTS`, overridden by the user).  The single training loop
in :mod:`certattr.train.loop` serves every method.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CertattrError

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, dict], torch.Tensor]

LOSSES: dict[str, LossFn] = {}

# Per-method, per-dataset default hyperparameters (from the papers' configs; "*" = any dataset).
DEFAULTS: dict[str, dict[str, dict]] = {"natural": {"*": {}}}


def register_loss(name: str, defaults: dict[str, dict] | None = None):
    """Decorator: register ``fn`` as the loss of method ``name`` with per-dataset ``defaults``."""

    def wrap(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        DEFAULTS[name] = defaults or {"*": {}}
        return fn

    return wrap


def get_loss(name: str) -> LossFn:
    if name not in LOSSES:
        raise CertattrError(f"unknown training method {name!r}; choose from {', '.join(LOSSES)}")
    return LOSSES[name]


def default_hparams(method: str, dataset: str | None = None) -> dict:
    """The method's defaults for ``dataset`` (falling back to the "*" entry)."""
    get_loss(method)
    table = DEFAULTS.get(method, {"*": {}})
    merged = dict(table.get("*", {}))
    if dataset is not None:
        merged.update(table.get(dataset, {}))
    return merged


@register_loss("natural")
def natural(model: nn.Module, x: torch.Tensor, y: torch.Tensor, hp: dict) -> torch.Tensor:
    """Natural training: cross-entropy CE(f(x), y)."""
    return F.cross_entropy(model(x), y)
