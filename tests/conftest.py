"""Shared fixtures: the real MNIST test split and small models trained on MNIST once per session.

Trained models are cached under tests/.cache (safetensors, keyed by the training recipe) so repeated
local runs skip training; CI starts from a clean clone and trains them (a few seconds each).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

CACHE = Path(__file__).parent / ".cache"

# Small ops dominate the tests: one intra-op thread per pytest process is the fastest setting (measured
# 1.5-7x faster than 2 threads on the 2-core CI machine); CERTATTR_TEST_THREADS overrides it.
torch.set_num_threads(int(os.environ.get("CERTATTR_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def mnist_test():
    from certattr.data import load_dataset

    x, y = load_dataset("mnist", "test")
    return x[:1000].contiguous(), y[:1000].contiguous()


@pytest.fixture(scope="session")
def mnist_train():
    from certattr.data import load_dataset

    return load_dataset("mnist", "train")


@pytest.fixture(scope="session")
def mnist_train_small(mnist_train):
    x, y = mnist_train
    return x[:10000].contiguous(), y[:10000].contiguous()


def _trained(name: str, train, test, epochs: int, lr: float, activation: str = "relu"):
    from safetensors.torch import load_file, save_file

    from certattr.models import build_model
    from certattr.train import accuracy, fit

    recipe = {"name": name, "epochs": epochs, "lr": lr, "activation": activation, "n": int(train[0].shape[0]),
              "seed": 0}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    path = CACHE / f"{name}-{key}.safetensors"
    torch.manual_seed(0)
    model = build_model(name, activation=activation)
    cached = path.exists()
    if cached:
        model.load_state_dict(load_file(str(path)))
    else:
        fit(model, train, epochs=epochs, batch_size=64, lr=lr, seed=0, progress=False)
    model.eval()
    acc = accuracy(model, *test)
    assert acc >= 0.95, f"fixture {name} reached only {acc:.3f} test accuracy"
    if not cached:  # only a model that passed the check is cached; write atomically (parallel workers)
        CACHE.mkdir(exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        os.replace(tmp, path)
    model.fixture_accuracy = acc
    return model


@pytest.fixture(scope="session")
def trained_cnn_small(mnist_train, mnist_test):
    """ReLU cnn-small, 2 epochs on 20k MNIST training images (0.976 on the first 1000 test images)."""
    x, y = mnist_train
    return _trained("cnn-small", (x[:20000], y[:20000]), mnist_test, epochs=2, lr=2e-3)


@pytest.fixture(scope="session")
def trained_lenet5(mnist_train_small, mnist_test):
    """ReLU lenet5 (conv, maxpool), 2 epochs on 10k MNIST training images (0.964 measured)."""
    return _trained("lenet5", mnist_train_small, mnist_test, epochs=2, lr=1e-3)
