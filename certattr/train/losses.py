"""Training losses, one per method, registered by name (SPEC 5).

A loss is ``fn(model, x, y, hp) -> scalar tensor`` where ``hp`` is the dict of the method's
hyperparameters (defaults from :data:`DEFAULTS`, overridden by the user).  The single training loop
in :mod:`certattr.train.loop` serves every method.  Robust methods live in
:mod:`certattr.train.adversarial` (pgd-at, trades) and :mod:`certattr.train.attributional`
(ig-norm, ig-sum-norm, art, far-aat, far-advaat, sarkar, igr) and :mod:`certattr.train.certified`
(cert-ibp, cert-crown-ibp); importing this module registers them.

Every registered loss validates its hyperparameters (:func:`validate_hparams`) on each call, so a
bad value (negative eps or weight, eps larger than the data domain, unknown key) is a clear
:class:`CertattrError` before the first optimiser step.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterator
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CertattrError, check_eps, check_norm

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, dict], torch.Tensor]

LOSSES: dict[str, LossFn] = {}

# Per-method, per-dataset default hyperparameters (from the papers' configs; "*" = any dataset).
DEFAULTS: dict[str, dict[str, dict]] = {"natural": {"*": {}}}

# The hyperparameter that ``--lambda`` sets for each method (its main regulariser weight), if any.
WEIGHT_KEYS: dict[str, str | None] = {"natural": None}

# Method-specific checks run after the per-key ones: fn(method, hp) -> hp (raise CertattrError).
METHOD_CHECKS: dict[str, Callable[[str, dict], dict]] = {}

# Training progress (epoch, step, steps_per_epoch), set by the loop around every loss call, for the
# methods with a schedule (eps / lambda ramp-up of the certified trainers).  A function of the loop's
# own counters, so a resumed run sees the same schedule as an uninterrupted one.
_PROGRESS: contextvars.ContextVar[tuple[int, int, int] | None] = contextvars.ContextVar(
    "certattr_training_progress", default=None)


@contextlib.contextmanager
def training_progress(epoch: int, step: int, steps_per_epoch: int) -> Iterator[None]:
    """Within the block, :func:`current_progress` returns epoch + step / steps_per_epoch (0-based)."""
    token = _PROGRESS.set((int(epoch), int(step), max(1, int(steps_per_epoch))))
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def current_progress() -> float | None:
    """Training progress in epochs (0.0 = first step of the first epoch), or None outside the loop."""
    value = _PROGRESS.get()
    if value is None:
        return None
    epoch, step, per = value
    return epoch + step / per


def register_loss(name: str, defaults: dict[str, dict] | None = None, *, weight: str | None = None,
                  check: Callable[[str, dict], dict] | None = None):
    """Decorator: register ``fn`` as the loss of method ``name`` with per-dataset ``defaults``.

    ``weight`` names the hyperparameter that is the method's regulariser weight (what the CLI's
    ``--lambda`` sets; e.g. "beta" for TRADES).  ``check(method, hp)`` adds method-specific
    validation (e.g. eps > 0).  The registered callable validates ``hp`` first.
    """

    def wrap(fn: LossFn) -> LossFn:
        @functools.wraps(fn)
        def checked(model: nn.Module, x: torch.Tensor, y: torch.Tensor, hp: dict) -> torch.Tensor:
            return fn(model, x, y, validate_hparams(name, hp, in_shape=tuple(x.shape[1:])))

        LOSSES[name] = checked
        DEFAULTS[name] = defaults or {"*": {}}
        WEIGHT_KEYS[name] = weight
        if check is not None:
            METHOD_CHECKS[name] = check
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


def weight_key(method: str) -> str | None:
    """The name of ``method``'s regulariser weight (set by ``--lambda``), or None if it has none."""
    get_loss(method)
    return WEIGHT_KEYS.get(method)


# ------------------------------------------------------------------------------------ validation
def _number(key: str, value) -> float:
    if isinstance(value, bool):
        raise CertattrError(f"hyperparameter {key} must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(Fraction(value.strip()))  # accepts "8/255"
        except (ValueError, ZeroDivisionError):
            raise CertattrError(f"hyperparameter {key} must be a number, got {value!r}") from None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise CertattrError(f"hyperparameter {key} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise CertattrError(f"hyperparameter {key} must be finite, got {value!r}")
    return value


def _nonneg(key, value):
    value = _number(key, value)
    if value < 0:
        raise CertattrError(f"hyperparameter {key} must be >= 0, got {value:g}")
    return value


def _positive(key, value):
    value = _number(key, value)
    if value <= 0:
        raise CertattrError(f"hyperparameter {key} must be > 0, got {value:g}")
    return value


def _count(minimum: int):
    def check(key, value):
        number = _number(key, value)
        if number != int(number) or number < minimum:
            raise CertattrError(f"hyperparameter {key} must be an integer >= {minimum}, got {value!r}")
        return int(number)
    return check


def _flag(key, value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if value in (0, 1):
        return bool(value)
    raise CertattrError(f"hyperparameter {key} must be true or false, got {value!r}")


def _eps(key, value):
    return check_eps(_number(key, value), name=key)


def _domain(key, value):
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise CertattrError(f"hyperparameter {key} must be [lo, hi], got {value!r}")
    lo, hi = _number(key, value[0]), _number(key, value[1])
    if not lo < hi:
        raise CertattrError(f"hyperparameter {key} needs lo < hi, got {value!r}")
    return [lo, hi]


def _attribution(key, value):
    if value not in ("saliency", "grad_x_input", "ig"):
        raise CertattrError(f"hyperparameter {key} must be saliency, grad_x_input or ig, got {value!r}")
    return value


def _optional_positive(key, value):
    return None if value is None else _positive(key, value)


def _grad_clip(key, value):
    """Max global gradient norm for the loop's clipping (None or 0: off)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "off")):
        return None
    value = _nonneg(key, value)
    return None if value == 0 else value


# Hyperparameters of the training loop itself, accepted by every method (not passed on to a paper's
# recipe): ``grad_clip`` = max global L2 norm of the gradient (torch.nn.utils.clip_grad_norm_ before the
# optimiser step), None / 0 = off (the default of every method unless its DEFAULTS say otherwise).
LOOP_KEYS = ("grad_clip",)


CHECKS: dict[str, Callable] = {
    "eps": _eps, "norm": lambda k, v: check_norm(v), "steps": _count(0), "step_size": _positive,
    "random_start": _flag, "domain": _domain,
    "lambda": _nonneg, "beta": _nonneg, "ig_steps": _count(1), "attack_ig_steps": _count(1),
    "softplus_beta": _positive, "inner_beta": _optional_positive, "tau": _positive,
    "attribution": _attribution,
    # certified trainers (certattr.train.certified)
    "kappa": _number, "crown_start": _number, "crown_end": _number, "warmup_epochs": _nonneg,
    "ramp_epochs": _nonneg, "adv_steps": _count(0), "schedule": lambda k, v: str(v).lower(),
    "attr_loss": lambda k, v: str(v).lower(), "ibp_init": _flag,
    # the training loop (every method)
    "grad_clip": _grad_clip,
}


def validate_hparams(method: str, hp: dict, in_shape: tuple[int, ...] | None = None) -> dict:
    """Check ``hp`` for ``method`` and return a normalised copy (norm spelled "2"/"inf", counts as int).

    Errors (CertattrError): unknown method or key, negative eps/weights, non-positive step sizes,
    and eps larger than the data domain: eps > hi - lo for linf, eps > sqrt(n) (hi - lo) for l2
    (n = prod(in_shape)): such a ball contains the whole domain and the method is meaningless.
    """
    get_loss(method)
    allowed = set(LOOP_KEYS)
    for table in DEFAULTS.get(method, {}).values():
        allowed.update(table)
    out = {}
    for key, value in dict(hp).items():
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise CertattrError(f"method {method!r} has no hyperparameter {key!r} (it takes: {known})")
        check = CHECKS.get(key)
        out[key] = check(key, value) if check is not None else value
    if "eps" in out:
        lo, hi = out.get("domain", [0.0, 1.0])
        width = hi - lo
        if out.get("norm", "inf") == "inf":
            limit, what = width, f"hi - lo = {width:g}"
        elif in_shape is not None:
            n = math.prod(int(s) for s in in_shape)
            limit, what = math.sqrt(n) * width, f"sqrt(n) (hi - lo) = {math.sqrt(n) * width:g} (n = {n})"
        else:
            limit = math.inf
        if out["eps"] > limit:
            raise CertattrError(f"eps = {out['eps']:g} is larger than the data domain ({what}): "
                                "the ball would contain every input")
    if method in METHOD_CHECKS:
        out = METHOD_CHECKS[method](method, out)
    return out


@register_loss("natural")
def natural(model: nn.Module, x: torch.Tensor, y: torch.Tensor, hp: dict) -> torch.Tensor:
    """Natural training: cross-entropy CE(f(x), y)."""
    return F.cross_entropy(model(x), y)


# Register the robust families (they import register_loss from this module).
from . import adversarial as _adversarial  # noqa: F401
from . import attributional as _attributional  # noqa: F401
from . import certified as _certified  # noqa: F401
