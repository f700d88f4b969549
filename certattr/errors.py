"""Errors and input validation shared by every certattr module.

Every user-facing mistake raises :class:`CertattrError` (a ``ValueError``) with a message that
names the bad value; the CLI prints that one line and exits non-zero.
"""
from __future__ import annotations

import torch

from bounds import checks as _bounds_checks


class CertattrError(ValueError):
    """A user-facing error: bad input, unknown name, corrupt file."""


def check_input(x: torch.Tensor, *, name: str = "x", ndim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Check that ``x`` is a floating tensor with finite entries (and, optionally, ``ndim`` dims)."""
    if not isinstance(x, torch.Tensor):
        raise CertattrError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise CertattrError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            raise CertattrError(f"{name} must have {' or '.join(map(str, allowed))} dimensions, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise CertattrError(f"{name} is empty (shape {tuple(x.shape)})")
    if not torch.isfinite(x).all():
        raise CertattrError(f"{name} contains NaN or inf")
    return x


def check_eps(eps: float, *, name: str = "eps") -> float:
    """A perturbation radius: a finite number >= 0."""
    try:
        return _bounds_checks.check_eps(eps)
    except ValueError as exc:
        raise CertattrError(str(exc).replace("eps", name, 1)) from None


def check_norm(norm) -> str:
    """Normalise a norm spelling (2, "l2", "inf", "linf", float("inf")) to "2" or "inf"."""
    try:
        return _bounds_checks.check_norm(norm)
    except ValueError as exc:
        raise CertattrError(str(exc)) from None


def check_choice(value: str, choices, *, what: str) -> str:
    if value not in choices:
        raise CertattrError(f"unknown {what} {value!r}; choose from {', '.join(sorted(choices))}")
    return value
