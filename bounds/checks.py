"""Input checks shared by every bound function (ValueError / TypeError with a message naming the value).

``certattr.errors`` re-raises these as CertattrError for the rest of the toolkit.
"""
from __future__ import annotations

import math

import torch
from torch import nn

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


def check_domain_of(x: torch.Tensor, domain, slack: float = 0.0) -> tuple[float, float] | None:
    """``check_domain``, and x inside [lo - slack, hi + slack]."""
    dom = check_domain(domain)
    if dom is not None and ((x < dom[0] - slack).any() or (x > dom[1] + slack).any()):
        raise ValueError(f"x lies outside the domain [{dom[0]}, {dom[1]}]")
    return dom


def resolve_target(model: nn.Module, x: torch.Tensor, target) -> tuple[torch.Tensor, torch.Tensor]:
    """(target (B,) int64, logits of the real model (B, C)); target None = argmax of the real model."""
    with torch.no_grad():
        logits = model(x)
    if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(f"model must return (B, classes) logits, got shape {tuple(logits.shape)}")
    if target is None:
        return logits.argmax(1), logits
    t = torch.as_tensor(target, device=x.device)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError("target must be integer class indices")
    t = t.to(torch.int64).reshape(-1)
    if t.numel() == 1:
        t = t.expand(x.shape[0]).clone()
    if t.numel() != x.shape[0]:
        raise ValueError(f"target has {t.numel()} entries for a batch of {x.shape[0]}")
    if int(t.min()) < 0 or int(t.max()) >= logits.shape[1]:
        raise ValueError(f"target out of range for {logits.shape[1]} classes")
    return t, logits


class PhaseBranchingUnsupported(ValueError):
    """The network / norm / attribution is outside what branching on activation phases supports
    (``complete_bound(branching="phases")``); ``branching="auto"`` falls back to input branching."""


def check_search_args(budget_s, tol, max_memory_mb, **integers) -> None:
    """The numbers of a branch-and-bound call: budget_s > 0, tol >= 0, max_memory_mb > 0 (finite), and
    every keyword in ``integers`` an integer >= 1."""
    checks = [
        ("budget_s", budget_s, lambda v: v > 0, "> 0"),
        ("tol", tol, lambda v: v >= 0, ">= 0"),
        ("max_memory_mb", max_memory_mb, lambda v: v > 0, "> 0"),
    ] + [(name, value, lambda v: v >= 1 and v == int(v), ">= 1 (an integer)") for name, value in integers.items()]
    for name, value, ok, text in checks:
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r}") from None
        if not math.isfinite(v) or not ok(v):
            raise ValueError(f"{name} must be a finite number {text}, got {value!r}")
