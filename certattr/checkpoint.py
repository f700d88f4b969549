"""Checkpoints: safetensors weights plus a JSON spec, and user models loaded through a factory.

A certattr checkpoint is a directory holding two files:

* ``model.safetensors``: the model's ``state_dict`` (contiguous CPU tensors, no pickle);
* ``certattr.json``: ``{"format": "certattr-checkpoint", "format_version": 1, "architecture":
  {"name", "kwargs"} (a zoo model) or {"factory": "module:function", "kwargs"}, "dataset",
  "in_shape", "normalisation", "method", "hyperparameters", "metrics", "seed", "created",
  "versions", "sha256", ...}`` where ``sha256`` is the SHA-256 of ``model.safetensors``.

A user's own model is a ``module:function`` factory plus a state_dict file (``torch.save`` or
safetensors), read with ``torch.load(weights_only=True)``: certattr never unpickles code, and it
never imports a module named inside a checkpoint file (the caller must pass ``factory=``).
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import pickle
import platform
import re
import secrets
import shutil
import warnings
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CertattrError
from .models import ZOO, build_model

FORMAT = "certattr-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "certattr.json"

# Keys that save() writes itself; meta may not override them.
_RESERVED = ("format", "format_version", "architecture", "created", "versions", "sha256")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


# ----------------------------------------------------------------------------------------- hashing
def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(_CHUNK), b""):
                digest.update(block)
    except OSError as exc:
        raise CertattrError(f"cannot read {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()


# -------------------------------------------------------------------------------------------- save
def save(model: nn.Module, path: str | os.PathLike, **meta: Any) -> Path:
    """Write ``model`` as a certattr checkpoint directory ``path`` and return it.

    ``meta`` fills the spec (dataset, in_shape, normalisation, method, hyperparameters, metrics,
    seed, and any other JSON-serialisable keys).  A model without ``certattr_spec`` (i.e. not
    built by ``certattr.models.build_model``) needs ``factory="module:function"`` (and optionally
    ``factory_kwargs={...}``) in ``meta``.  Both files are written to temporary names and moved
    into place with ``os.replace`` (a fresh directory is staged whole and renamed), so an
    interrupted save never leaves a checkpoint whose files look valid but are partial.
    """
    if not isinstance(model, nn.Module):
        raise CertattrError(f"save expects a torch.nn.Module, got {type(model).__name__}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CertattrError(f"checkpoint path {path} exists and is not a directory")
    bad = [k for k in _RESERVED if k in meta]
    if bad:
        raise CertattrError(f"meta key {bad[0]!r} is reserved: save() writes it itself")

    architecture = _architecture_of(model, meta.pop("factory", None), meta.pop("factory_kwargs", None))
    spec: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "dataset": meta.pop("dataset", None),
        "in_shape": meta.pop("in_shape", None) or _default_in_shape(architecture),
        "normalisation": meta.pop("normalisation", None),
        "method": meta.pop("method", None),
        "hyperparameters": meta.pop("hyperparameters", None) or {},
        "metrics": meta.pop("metrics", None) or {},
        "seed": meta.pop("seed", None),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    spec.update(meta)
    _check_jsonable(spec)
    tensors = _cpu_state(model)

    if path.exists():
        _write_files(path, tensors, spec)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.partial"
    staging.mkdir()  # not mkdtemp: that makes the folder 0700 regardless of the umask
    try:
        _write_files(staging, tensors, spec)
        try:
            os.rename(staging, path)  # atomic when path does not exist
        except OSError:
            if not path.is_dir():  # appeared meanwhile as a file, or the rename failed for real
                raise
            _write_files(path, tensors, spec)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return path


def _architecture_of(model: nn.Module, factory: str | None, factory_kwargs: Any) -> dict:
    if factory_kwargs is not None and not isinstance(factory_kwargs, Mapping):
        raise CertattrError(f"factory_kwargs must be a dict, got {type(factory_kwargs).__name__}")
    if factory is not None:
        _split_factory(factory)
        return {"factory": factory, "kwargs": dict(factory_kwargs or {})}
    if factory_kwargs is not None:
        raise CertattrError("factory_kwargs given without factory='module:function'")
    spec = getattr(model, "certattr_spec", None)
    if spec is not None:
        if not isinstance(spec, Mapping) or spec.get("name") not in ZOO:
            raise CertattrError(f"model.certattr_spec is not a zoo spec: {spec!r}")
        kwargs = dict(spec.get("kwargs") or {})
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left untouched
            rebuilt = build_model(spec["name"], **kwargs)
        if repr(rebuilt) != repr(model):  # e.g. softplus_surrogate() of a ReLU zoo model
            raise CertattrError(
                f"model no longer matches its certattr_spec {spec['name']!r} {kwargs} (layers were "
                "changed after build_model); rebuild it with build_model(...) or pass "
                "factory='module:function'"
            )
        return {"name": spec["name"], "kwargs": kwargs}
    previous = getattr(model, "certattr_checkpoint", None)
    if isinstance(previous, Mapping) and isinstance(previous.get("architecture"), Mapping):
        arch = previous["architecture"]
        if "factory" in arch:
            return {"factory": arch["factory"], "kwargs": dict(arch.get("kwargs") or {})}
    raise CertattrError(
        f"cannot record the architecture of this {type(model).__name__}: it was not built by "
        "certattr.models.build_model; pass factory='module:function' (and factory_kwargs={...}) to save()"
    )


def _default_in_shape(architecture: dict) -> list[int] | None:
    kwargs = architecture.get("kwargs") or {}
    if "in_shape" in kwargs:
        return [int(v) for v in kwargs["in_shape"]]
    if "name" in architecture:
        default = inspect.signature(ZOO[architecture["name"]]).parameters["in_shape"].default
        return [int(v) for v in default]
    return None


def _versions() -> dict[str, str]:
    from . import __version__

    return {"certattr": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _json_default(obj: Any) -> Any:
    """Convert the few non-JSON types that metadata commonly holds; refuse everything else."""
    if isinstance(obj, torch.Tensor) and obj.dim() == 0:
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if type(obj).__module__ == "numpy" and hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def _check_jsonable(spec: dict) -> None:
    for key, value in spec.items():
        if not isinstance(key, str):
            raise CertattrError(f"checkpoint metadata keys must be strings, got {key!r}")
        try:
            json.dumps(value, default=_json_default)
        except (TypeError, ValueError) as exc:
            raise CertattrError(f"checkpoint metadata {key!r} is not JSON-serialisable: {exc}") from None


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = {}
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise CertattrError(f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
        # a fresh contiguous CPU copy per entry: safetensors refuses shared or strided storage
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
    return tensors


def _write_files(folder: Path, tensors: dict[str, torch.Tensor], spec: dict) -> None:
    """Weights first, then the spec that records their hash; each via a temp file + os.replace."""
    from safetensors.torch import save as to_bytes

    blob = to_bytes(tensors, metadata={"format": "pt"})
    spec = dict(spec, sha256=hashlib.sha256(blob).hexdigest())
    text = json.dumps(spec, indent=2, default=_json_default) + "\n"
    _atomic_write(folder / WEIGHTS_FILE, blob)
    _atomic_write(folder / SPEC_FILE, text.encode("utf-8"))


def _atomic_write(target: Path, data: bytes) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:  # open() honours the umask (safetensors.save_file writes 0600)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


# -------------------------------------------------------------------------------------------- load
def load(
    path: str | os.PathLike,
    factory: str | None = None,
    map_location: str | torch.device = "cpu",
    **factory_kwargs: Any,
) -> nn.Module:
    """Load a model in eval mode on ``map_location``.

    * a certattr checkpoint directory (or its ``.json`` / ``.safetensors`` file): the zoo model is
      rebuilt from the spec, the weights' SHA-256 is checked against the one recorded, and the
      weights are loaded strictly;
    * a user's weights file (``torch.save`` state_dict, or ``.safetensors``) with
      ``factory="module:function"``: ``function(**factory_kwargs)`` builds the model and the
      state_dict (raw, or under a "state_dict"/"model" key) is read with
      ``torch.load(weights_only=True)``.

    The result carries ``model.certattr_checkpoint`` (the spec, the weights' sha256 and the path).
    """
    path = Path(path)
    if not path.exists():
        raise CertattrError(f"checkpoint not found: {path}")
    device = _device(map_location)
    spec_file = _spec_file(path)

    if spec_file is not None:
        spec = _read_spec(spec_file)
        is_weights = path.is_file() and path.suffix == ".safetensors"
        weights = path if is_weights else spec_file.parent / WEIGHTS_FILE
        if not weights.is_file():
            raise CertattrError(f"checkpoint {spec_file.parent} has no {WEIGHTS_FILE}")
        state = _read_safetensors(weights, device)
        digest = sha256_file(weights)
        if digest != spec["sha256"]:
            raise CertattrError(
                "checkpoint weights do not match their recorded hash: "
                f"{weights} has sha256 {digest[:12]}..., "
                f"{spec_file.name} records {spec['sha256'][:12]}..."
            )
        model = _build(spec["architecture"], factory, factory_kwargs, where=spec_file.parent)
        info_dict = dict(spec, sha256=digest, path=str(spec_file.parent))
    else:
        if factory is None:
            raise CertattrError(
                f"{path} is not a certattr checkpoint (no {SPEC_FILE} next to it); to load your own "
                "model pass factory='module:function' that builds it"
            )
        if path.is_dir():
            raise CertattrError(f"{path} is a directory without {SPEC_FILE}; pass the weights file itself")
        if path.suffix == ".safetensors":
            state = _read_safetensors(path, device)
        else:
            state = _extract_state(_torch_load(path, device), path)
        digest = sha256_file(path)
        model = _call_factory(factory, factory_kwargs)
        info_dict = {
            "format": None,
            "architecture": {"factory": factory, "kwargs": dict(factory_kwargs)},
            "sha256": digest,
            "path": str(path),
        }

    _load_state(model, state, device, source=path)
    model.eval()
    model.certattr_checkpoint = info_dict
    return model


def info(path: str | os.PathLike) -> dict:
    """The checkpoint's JSON spec plus ``sha256`` computed from its weights file (the value stored
    in the JSON is kept as ``recorded_sha256``) and ``path``; the model is not built."""
    path = Path(path)
    if not path.exists():
        raise CertattrError(f"checkpoint not found: {path}")
    spec_file = _spec_file(path)
    if spec_file is None:
        raise CertattrError(f"{path} is not a certattr checkpoint (no {SPEC_FILE})")
    spec = _read_spec(spec_file)
    weights = spec_file.parent / WEIGHTS_FILE
    if not weights.is_file():
        raise CertattrError(f"checkpoint {spec_file.parent} has no {WEIGHTS_FILE}")
    return dict(spec, sha256=sha256_file(weights), recorded_sha256=spec["sha256"], path=str(spec_file.parent))


def _device(map_location: Any) -> torch.device:
    if map_location is None:
        return torch.device("cpu")
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError):
        raise CertattrError(
            f"bad map_location {map_location!r}: use a device such as 'cpu' or 'cuda:0'"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CertattrError(f"map_location {map_location!r} requested but CUDA is not available")
    return device


def _spec_file(path: Path) -> Path | None:
    """The certattr.json that describes ``path`` (a checkpoint dir or a file in it), if any."""
    if path.is_dir():
        candidate = path / SPEC_FILE
        return candidate if candidate.is_file() else None
    if path.suffix == ".json":
        return path
    if path.suffix == ".safetensors":
        candidate = path.parent / SPEC_FILE
        return candidate if candidate.is_file() else None
    return None


def _read_spec(spec_file: Path) -> dict:
    try:
        spec = json.loads(spec_file.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise CertattrError(f"cannot read {spec_file}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CertattrError(f"corrupt checkpoint spec {spec_file}: {exc}") from None
    if not isinstance(spec, dict):
        raise CertattrError(f"corrupt checkpoint spec {spec_file}: expected a JSON object")
    if spec.get("format") != FORMAT:
        raise CertattrError(f"{spec_file} is not a certattr checkpoint spec (format {spec.get('format')!r})")
    version = spec.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CertattrError(f"corrupt checkpoint spec {spec_file}: bad format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CertattrError(
            f"{spec_file} has format_version {version}; this certattr reads up to "
            f"{FORMAT_VERSION} (upgrade certattr)"
        )
    arch = spec.get("architecture")
    if not isinstance(arch, dict) or not ("name" in arch or "factory" in arch):
        raise CertattrError(f"corrupt checkpoint spec {spec_file}: no architecture name or factory")
    if not isinstance(arch.get("kwargs", {}), dict):
        raise CertattrError(f"corrupt checkpoint spec {spec_file}: architecture kwargs must be an object")
    if not isinstance(spec.get("sha256"), str) or not _SHA256.match(spec["sha256"]):
        raise CertattrError(f"corrupt checkpoint spec {spec_file}: missing or malformed sha256")
    return spec


def _read_safetensors(file: Path, device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(file), device=str(device))
    except OSError as exc:
        raise CertattrError(f"cannot read {file}: {exc.strerror or exc}") from None
    except Exception as exc:  # SafetensorError (Rust) and friends: bad header, truncated data
        raise CertattrError(f"corrupt or truncated safetensors file {file}: {exc}") from None


def _torch_load(file: Path, device: torch.device) -> Any:
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it then refuses anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(file, weights_only=True, map_location=device)
    except pickle.UnpicklingError as exc:
        raise CertattrError(f"refusing to unpickle {file}: {_unpickle_reason(exc)} (weights_only)") from None
    except OSError as exc:
        if exc.strerror and exc.filename:  # a real I/O error on the file
            raise CertattrError(f"cannot read {file}: {exc.strerror}") from None
        raise CertattrError(f"corrupt or truncated torch file {file}: OSError: {exc}") from None
    except Exception as exc:  # RuntimeError (bad zip), EOFError, KeyError, ...: not a readable torch file
        lines = str(exc).strip().splitlines()
        detail = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
        raise CertattrError(f"corrupt or truncated torch file {file}: {detail}") from None


def _unpickle_reason(exc: BaseException) -> str:
    """The short cause inside torch's long weights_only message, e.g. 'Unsupported global: GLOBAL
    posix.system'."""
    inner = exc.__cause__ or exc.__context__
    text = str(inner) if isinstance(inner, pickle.UnpicklingError) and str(inner) else str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = lines[0] if lines else "not a plain state_dict"
    reason = reason.split(" was not an allowed global", 1)[0]
    return f"only tensors and plain containers are allowed ({reason[:200]})"


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _extract_state(obj: Any, file: Path) -> Mapping[str, torch.Tensor]:
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and _is_state_dict(obj[key]):
                return obj[key]
    raise CertattrError(
        f"{file} holds no state_dict: expected a dict of tensors, or a dict whose 'state_dict' or "
        f"'model' entry is one (found {type(obj).__name__})"
    )


# ----------------------------------------------------------------------------- building the model
def _split_factory(factory: Any) -> tuple[str, str]:
    if not isinstance(factory, str) or factory.count(":") != 1:
        raise CertattrError(f"factory must be 'module:function', got {factory!r}")
    module_name, attr = factory.split(":")
    if not module_name or not attr:
        raise CertattrError(f"factory must be 'module:function', got {factory!r}")
    return module_name, attr


def _import_factory(factory: str):
    module_name, attr = _split_factory(factory)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise CertattrError(
                f"cannot import factory module {module_name!r}: no module named {exc.name!r}"
            ) from None
        raise CertattrError(f"importing factory module {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise CertattrError(
            f"importing factory module {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CertattrError(f"factory module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CertattrError(f"factory {factory!r} is not callable ({type(obj).__name__})")
    return obj


def _call_factory(factory: str, kwargs: Mapping[str, Any]) -> nn.Module:
    fn = _import_factory(factory)
    try:
        with torch.random.fork_rng(devices=[]):  # weight init must not shift the caller's RNG
            model = fn(**kwargs)
    except CertattrError:
        raise
    except Exception as exc:
        raise CertattrError(f"factory {factory!r} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise CertattrError(f"factory {factory!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _build(arch: dict, factory: str | None, factory_kwargs: dict, *, where: Path) -> nn.Module:
    kwargs = dict(arch.get("kwargs") or {})
    if factory is not None:
        # the caller's factory wins; the recorded kwargs apply only when it is the recorded factory
        merged = {**(kwargs if arch.get("factory") == factory else {}), **factory_kwargs}
        return _call_factory(factory, merged)
    if factory_kwargs:
        raise CertattrError(f"factory keyword arguments {sorted(factory_kwargs)} given without factory=")
    if "name" in arch:
        try:
            with torch.random.fork_rng(devices=[]):
                return build_model(arch["name"], **kwargs)
        except CertattrError as exc:
            raise CertattrError(f"checkpoint {where}: {exc}") from None
    raise CertattrError(
        f"checkpoint {where} was saved from the user factory {arch['factory']!r}; certattr does not import "
        f"code named in a checkpoint file: pass factory={arch['factory']!r} to load it"
    )


def _load_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], device: torch.device, *, source: Path
) -> None:
    """Strict load with one clear error naming the first key that does not fit."""
    expected = model.state_dict()
    what = f"weights in {source} do not fit the {type(model).__name__} architecture"
    missing = [k for k in expected if k not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CertattrError(f"{what}: missing key {missing[0]!r}{more}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CertattrError(f"{what}: unexpected key {unexpected[0]!r}{more}")
    for key, value in expected.items():  # in the model's order, so the first layer is named first
        if tuple(state[key].shape) != tuple(value.shape):
            raise CertattrError(
                f"{what}: shape mismatch at key {key!r}: checkpoint {tuple(state[key].shape)}, "
                f"model {tuple(value.shape)}"
            )
    # keep a checkpoint saved in another float precision (e.g. float64) in that precision
    float_dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    model_dtypes = {v.dtype for v in expected.values() if v.is_floating_point()}
    model.to(device)
    if len(float_dtypes) == 1 and float_dtypes != model_dtypes:
        model.to(next(iter(float_dtypes)))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CertattrError(f"{what}: {first[-1].strip() if first else exc}") from None
