"""Tabular data sets shipped inside a registry package (scikit-learn's bundled CSV files), for (B, n)
models: attacks, bounds and metrics take (B, n) batches as well as images (SPEC 9.5).

* ``breast-cancer``: Wisconsin diagnostic breast cancer, 569 samples, 30 features, 2 classes
  (``sklearn.datasets.load_breast_cancer``; the data ship in scikit-learn's wheel, BSD-3-Clause);
* ``wine``: 178 samples, 13 features, 3 classes (``sklearn.datasets.load_wine``).

No download: the CSV files are part of the installed package (``pip install scikit-learn``).
Preprocessing, fixed and documented so results are reproducible: a seeded permutation (numpy
``default_rng(0)``) splits the samples 80% train / 20% test; every feature is min-max scaled with the
TRAIN split's minimum and maximum, ``x' = (x - min) / (max - min)`` (a constant feature maps to 0),
and the test split is clipped to [0, 1], so the data domain is [0, 1]^n like the image sets.
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import CertattrError

TABULAR: dict[str, dict] = {
    "breast-cancer": {"loader": "load_breast_cancer", "in_shape": (30,), "num_classes": 2,
                      "classes": ["malignant", "benign"]},
    "wine": {"loader": "load_wine", "in_shape": (13,), "num_classes": 3,
             "classes": ["class_0", "class_1", "class_2"]},
}
TRAIN_FRACTION = 0.8
SPLIT_SEED = 0


def _raw(name: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        import sklearn.datasets as skd
    except ImportError:
        raise CertattrError(f"dataset {name!r} comes with scikit-learn: pip install scikit-learn") from None
    bunch = getattr(skd, TABULAR[name]["loader"])()
    return np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)


def load_tabular(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x float32 (N, n) in [0, 1], y int64 (N,)) for one split (see the module docstring)."""
    if name not in TABULAR:
        raise CertattrError(f"unknown tabular dataset {name!r}; choose from {', '.join(TABULAR)}")
    x, y = _raw(name)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    cut = round(TRAIN_FRACTION * len(x))
    train, test = order[:cut], order[cut:]
    lo, hi = x[train].min(axis=0), x[train].max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    rows = train if split == "train" else test
    xs = np.clip((x[rows] - lo) / span, 0.0, 1.0)
    return torch.from_numpy(xs.astype(np.float32)), torch.from_numpy(y[rows].copy())
