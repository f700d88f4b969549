"""Import auto_LiRPA (Xu et al., NeurIPS 2020) on current torch / numpy, patching 0.3 where needed.

auto_LiRPA 0.3 (the newest release on PyPI, 2022) was written for torch < 1.13.  On torch 2.x it
misses four things that this module restores *before* importing it, each only when missing:

* ``torch.onnx.symbolic_helper._set_opset_version``: sets the opset on the TorchScript exporter's
  ``GLOBALS`` object (``torch.onnx._internal.torchscript_exporter._globals`` in torch 2.9+);
* ``torch._C.Node.__getitem__``: attribute access by name, dispatched on ``Node.kindOf(name)``;
* ``BoundedModule._named_members(..., remove_duplicate=)``: torch 2 passes that keyword;
* ``numpy.lib.arraysetops``: removed in numpy 2; auto_LiRPA imports it but never uses it.

It also adds the linear relaxation that 0.3 lacks for ``Softplus`` (ONNX ``Softplus``, beta = 1;
torch exports ``nn.Softplus(beta)`` as ``Div(Softplus(Mul(x, beta)), beta)``): softplus is
convex, so on [l, u] the chord lies above it and the tangent at the midpoint below it.

A newer auto_LiRPA (>= 0.4, installed from git) is imported as it is.  Tested on torch 2.2 - 2.13.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import sys
import types
from typing import Any

import torch

_PATCHED_VERSION = "0.3"
_state: dict[str, Any] = {}


def _installed_version() -> str | None:
    for dist in ("auto_LiRPA", "auto-lirpa", "auto_lirpa"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _needs_patches(version: str | None) -> bool:
    if version is None:  # a source checkout without metadata: decide by the package's own version later
        return True
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    while len(parts) < 2:
        parts.append(0)
    return tuple(parts) < (0, 4)


def _patch_torch_and_numpy() -> None:
    import torch.onnx.symbolic_helper as symbolic_helper

    if not hasattr(symbolic_helper, "_set_opset_version"):
        try:
            from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
        except ImportError:  # torch < 2.9
            from torch.onnx._globals import GLOBALS  # type: ignore[no-redef]

        def _set_opset_version(opset_version: int) -> None:
            GLOBALS.export_onnx_opset_version = int(opset_version)

        symbolic_helper._set_opset_version = _set_opset_version

    node_cls = torch._C.Node
    if not hasattr(node_cls, "__getitem__"):
        def _node_getitem(node, name: str):
            # kindOf returns the accessor's name: "f", "fs", "i", "is", "s", "ss", "t", "ts", "g", ...
            return getattr(node, node.kindOf(name))(name)

        node_cls.__getitem__ = _node_getitem

    try:
        importlib.import_module("numpy.lib.arraysetops")
    except ImportError:
        import numpy

        stub = types.ModuleType("numpy.lib.arraysetops")
        stub.isin = numpy.isin
        sys.modules["numpy.lib.arraysetops"] = stub


def _patch_bounded_module(auto_lirpa) -> None:
    cls = auto_lirpa.BoundedModule
    original = cls._named_members
    if getattr(original, "_certattr_patched", False):
        return

    def _named_members(self, get_members_fn, prefix="", recurse=True, remove_duplicate=True):
        return original(self, get_members_fn, prefix=prefix, recurse=recurse)

    _named_members._certattr_patched = True
    cls._named_members = _named_members


def _softplus_relaxation(auto_lirpa) -> None:
    """Linear bounds for softplus(x) = log(1 + e^x) on [l, u] (convex): upper = chord through
    (l, f(l)), (u, f(u)); lower = tangent at the midpoint m: f(m) + sigmoid(m) (x - m)."""
    from auto_LiRPA.operators import activation

    cls = activation.BoundSoftplus
    if getattr(cls, "_certattr_relaxation", False):
        return

    def bound_relax(self, x):
        lower, upper = x.lower, x.upper
        f = torch.nn.functional.softplus
        f_l, f_u = f(lower), f(upper)
        width = upper - lower
        close = width < 1e-6
        slope_chord = torch.where(close, torch.sigmoid(upper), (f_u - f_l) / width.clamp_min(1e-6))
        # chord above (for a (nearly) zero width: the line through (l, f(l)) with slope f'(u) >= chord)
        self.add_linear_relaxation(mask=None, type="upper", k=slope_chord, x0=lower, y0=f_l)
        mid = (lower + upper) / 2
        self.add_linear_relaxation(mask=None, type="lower", k=torch.sigmoid(mid), x0=mid, y0=f(mid))

    cls.bound_relax = bound_relax
    cls._certattr_relaxation = True


def import_auto_lirpa():
    """Import auto_LiRPA, restoring what 0.3 misses on current torch/numpy (only when missing).

    Returns the ``auto_LiRPA`` module (``BoundedModule``, ``BoundedTensor``, ``PerturbationLpNorm``).
    Raises ImportError with an installation hint when it is not installed.
    """
    if "module" in _state:
        return _state["module"]
    version = _installed_version()
    patch = _needs_patches(version)
    if patch:
        _patch_torch_and_numpy()
    try:
        auto_lirpa = importlib.import_module("auto_LiRPA")
    except ImportError as exc:
        raise ImportError(
            "auto_LiRPA is required for certified bounds: pip install --no-deps auto-lirpa==0.3 "
            f"(plus tqdm appdirs pyyaml packaging); import failed: {exc}"
        ) from exc
    if patch and _needs_patches(str(getattr(auto_lirpa, "__version__", version or _PATCHED_VERSION))):
        _patch_bounded_module(auto_lirpa)
        _softplus_relaxation(auto_lirpa)
    _state["module"] = auto_lirpa
    return auto_lirpa
