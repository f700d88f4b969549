"""Input checks shared by every bound function (ValueError / TypeError with a message naming the value).

``certattr.errors`` re-raises these as CertattrError for the rest of the toolkit.
"""
from __future__ import annotations

import math

import torch

ATTRIBUTIONS = ("saliency", "grad_x_input", "ig")


def check_x(x) -> torch.Tensor:
    """x must be a non-empty finite floating batch (B, ...)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2 or x.shape[0] == 0 or x[0].numel() == 0:
        raise ValueError(f"x must be a non-empty batch (B, ...), got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or inf")
    return x


def check_eps(eps) -> float:
    """A radius: a finite number >= 0."""
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise ValueError(f"eps must be a number, got {eps!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return value


def check_norm(norm) -> str:
    """2 | "2" | "l2" -> "2";  inf | "inf" | "linf" -> "inf"; anything else is a ValueError."""
    if isinstance(norm, (int, float)) and not isinstance(norm, bool):
        if norm == 2:
            return "2"
        if norm == float("inf"):
            return "inf"
        raise ValueError(f"unknown norm {norm!r}: use 2 or 'inf'")
    key = str(norm).strip().lower()
    key = key.removeprefix("l")
    if key == "2":
        return "2"
    if key in ("inf", "infty", "infinity"):
        return "inf"
    raise ValueError(f"unknown norm {norm!r}: use 2 or 'inf'")


def check_attribution(name) -> str:
    """"saliency" | "grad_x_input" | "ig" ("integrated_gradients" is an alias of "ig")."""
    key = "ig" if name == "integrated_gradients" else name
    if key not in ATTRIBUTIONS:
        raise ValueError(f"unknown attribution {name!r}; choose from {', '.join(ATTRIBUTIONS)}")
    return key


def check_domain(domain) -> tuple[float, float] | None:
    """None, or a pair (lo, hi) with lo < hi."""
    if domain is None:
        return None
    try:
        lo, hi = (float(v) for v in domain)
    except (TypeError, ValueError):
        raise ValueError(f"domain must be None or a pair (lo, hi), got {domain!r}") from None
    if not lo < hi:
        raise ValueError(f"domain needs lo < hi, got {domain!r}")
    return lo, hi
