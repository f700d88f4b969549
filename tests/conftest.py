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

# Tests run on 2 cores; one intra-op thread per pytest process is the fastest setting for small ops.
torch.set_num_threads(int(os.environ.get("CERTATTR_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def mnist_test():
    from certattr.data import load_dataset

    x, y = load_dataset("mnist", "test")
    return x[:1000].contiguous(), y[:1000].contiguous()


@pytest.fixture(scope="session")
def mnist_train_small():
    from certattr.data import load_dataset

    x, y = load_dataset("mnist", "train")
    return x[:10000].contiguous(), y[:10000].contiguous()


def _trained(name: str, train, test, epochs: int, activation: str = "relu"):
    from safetensors.torch import load_file, save_file

    from certattr.models import build_model
    from certattr.train import accuracy, fit

    recipe = {"name": name, "epochs": epochs, "activation": activation, "n": int(train[0].shape[0]), "seed": 0}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    path = CACHE / f"{name}-{key}.safetensors"
    torch.manual_seed(0)
    model = build_model(name, activation=activation)
    if path.exists():
        model.load_state_dict(load_file(str(path)))
    else:
        fit(model, train, epochs=epochs, batch_size=64, lr=1e-3, seed=0, progress=False)
        CACHE.mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    model.eval()
    acc = accuracy(model, *test)
    assert acc >= 0.95, f"fixture {name} reached only {acc:.3f} test accuracy"
    model.fixture_accuracy = acc
    return model


@pytest.fixture(scope="session")
def trained_cnn_small(mnist_train_small, mnist_test):
    """ReLU cnn-small, 2 epochs on 10k MNIST training images (>= 95% on the first 1000 test images)."""
    return _trained("cnn-small", mnist_train_small, mnist_test, epochs=2)


@pytest.fixture(scope="session")
def trained_lenet5(mnist_train_small, mnist_test):
    """ReLU lenet5 (conv, maxpool), 2 epochs on 10k MNIST training images."""
    return _trained("lenet5", mnist_train_small, mnist_test, epochs=2)
