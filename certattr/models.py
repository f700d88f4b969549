"""Model zoo for MNIST-sized inputs and the softplus surrogate.

Every zoo model is a plain ``nn.Sequential`` of Conv2d / MaxPool2d / Flatten / Linear / activation
layers, so that ``bounds`` can walk it layer by layer.  ``build_model`` records the name and
arguments on the model (``model.certattr_spec``) so checkpoints can rebuild it.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from .errors import CertattrError


def _activation(activation: str, beta: float) -> nn.Module:
    if activation == "relu":
        return nn.ReLU()
    if activation == "softplus":
        return nn.Softplus(beta=beta)
    raise CertattrError(f"unknown activation {activation!r}; choose relu or softplus")


def _flat_size(features: nn.Module, in_shape: tuple[int, int, int]) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, *in_shape)).numel())


def mlp(in_shape=(1, 28, 28), num_classes=10, activation="relu", beta=10.0, hidden=(256, 256)) -> nn.Sequential:
    """Fully connected net: Flatten, then Linear + activation per hidden width, then Linear.

    ``in_shape`` (C, H, W) for images or (n,) for tabular (B, n) inputs (Flatten leaves those as they are)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = int(torch.tensor(in_shape).prod())
    for h in hidden:
        layers += [nn.Linear(width, int(h)), _activation(activation, beta)]
        width = int(h)
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn_small(in_shape=(1, 28, 28), num_classes=10, activation="relu", beta=10.0) -> nn.Sequential:
    """Wong & Kolter's small CNN: conv4x4-16 s2, conv4x4-32 s2, fc 100."""
    c = in_shape[0]
    feats = nn.Sequential(
        nn.Conv2d(c, 16, 4, stride=2, padding=1), _activation(activation, beta),
        nn.Conv2d(16, 32, 4, stride=2, padding=1), _activation(activation, beta),
        nn.Flatten(),
    )
    n = _flat_size(feats, in_shape)
    return nn.Sequential(*feats, nn.Linear(n, 100), _activation(activation, beta), nn.Linear(100, num_classes))


def lenet5(in_shape=(1, 28, 28), num_classes=10, activation="relu", beta=10.0) -> nn.Sequential:
    """LeNet-5 style: conv3x3-32, maxpool2, conv3x3-64, maxpool2, fc 200."""
    c = in_shape[0]
    feats = nn.Sequential(
        nn.Conv2d(c, 32, 3), _activation(activation, beta), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), _activation(activation, beta), nn.MaxPool2d(2),
        nn.Flatten(),
    )
    n = _flat_size(feats, in_shape)
    return nn.Sequential(*feats, nn.Linear(n, 200), _activation(activation, beta), nn.Linear(200, num_classes))


def madry_cnn(in_shape=(1, 28, 28), num_classes=10, activation="relu", beta=10.0) -> nn.Sequential:
    """Madry et al.'s MNIST CNN (used by the robust-attribution papers):
    conv5x5-32, maxpool2, conv5x5-64, maxpool2, fc 1024."""
    c = in_shape[0]
    feats = nn.Sequential(
        nn.Conv2d(c, 32, 5, padding=2), _activation(activation, beta), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), _activation(activation, beta), nn.MaxPool2d(2),
        nn.Flatten(),
    )
    n = _flat_size(feats, in_shape)
    return nn.Sequential(*feats, nn.Linear(n, 1024), _activation(activation, beta), nn.Linear(1024, num_classes))


ZOO: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn-small": cnn_small,
    "lenet5": lenet5,
    "madry-cnn": madry_cnn,
}


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a zoo model by name; ``kwargs``: in_shape, num_classes, activation, beta (and hidden for mlp)."""
    if name not in ZOO:
        raise CertattrError(f"unknown model {name!r}; choose from {', '.join(ZOO)}")
    kwargs.setdefault("in_shape", (1, 28, 28))
    kwargs.setdefault("num_classes", 10)
    kwargs["in_shape"] = tuple(int(v) for v in kwargs["in_shape"])
    if len(kwargs["in_shape"]) != 3 and not (name == "mlp" and len(kwargs["in_shape"]) == 1):
        raise CertattrError(f"in_shape must be (C, H, W) (or (n,) for a tabular mlp), got {kwargs['in_shape']}")
    try:
        model = ZOO[name](**kwargs)
    except TypeError as exc:
        raise CertattrError(f"bad arguments for model {name!r}: {exc}") from None
    model.certattr_spec = {"name": name, "kwargs": _jsonable(kwargs)}
    return model


def _jsonable(kwargs: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}


def softplus_surrogate(model: nn.Module, beta: float = 10.0) -> nn.Module:
    """Copy of ``model`` with every ``nn.ReLU`` module replaced by ``nn.Softplus(beta)``; same weights.

    softplus_beta(z) = log(1 + exp(beta z)) / beta -> relu(z) as beta -> inf; its input-Hessian is
    non-zero, which first-order bounds and attribution attacks need (Ghorbani et al. 2019).
    ReLUs applied functionally inside ``forward`` cannot be seen and are left as they are.
    """
    if beta <= 0:
        raise CertattrError(f"surrogate beta must be > 0, got {beta}")
    surrogate = copy.deepcopy(model)
    replaced = _replace_relu(surrogate, float(beta))  # a net without ReLU (softplus/tanh) is its own surrogate
    spec = getattr(surrogate, "certattr_spec", None)
    if replaced and spec is not None:  # keep the spec true to the layers, so checkpoints rebuild it
        surrogate.certattr_spec = {"name": spec["name"],
                                   "kwargs": {**spec["kwargs"], "activation": "softplus", "beta": float(beta)}}
    return surrogate


def _replace_relu(module: nn.Module, beta: float) -> bool:
    found = False
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, nn.Softplus(beta=beta))
            found = True
        else:
            found = _replace_relu(child, beta) or found
    return found


def has_relu(model: nn.Module) -> bool:
    """True if the model has any ``nn.ReLU`` module (piecewise-linear: zero input-Hessian a.e.)."""
    return any(isinstance(m, nn.ReLU) for m in model.modules())


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a parameter-free model)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")
