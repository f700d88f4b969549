"""Zoo checkpoint references ``zoo:MODEL@DATASET[:RECIPE]``: trained on first use, then cached.

The checkpoint lands in ``$CERTATTR_CACHE/zoo/MODEL-DATASET-RECIPE`` (default cache
``~/.cache/certattr``) and is reused by every later campaign, so a spec can name a model that does
not exist yet.  Recipes (natural training, Adam, seed 0, ReLU zoo architecture):

* ``quick``: one epoch over the whole training split, batch 128 (cnn-small: ~98% on MNIST);
* ``tiny``: 150 steps of batch 64 on the first 10,000 training images (seconds; for tests and smoke runs).
"""
from __future__ import annotations

import os
from pathlib import Path

RECIPES: dict[str, dict] = {
    "quick": {"epochs": 1, "batch_size": 128, "n_train": None, "max_steps": None, "lr": 1e-3},
    "tiny": {"epochs": 1, "batch_size": 64, "n_train": 10_000, "max_steps": 150, "lr": 2e-3},
}
ZOO_DATASETS = ("mnist", "fashion-mnist")


def zoo_dir() -> Path:
    """Folder of cached zoo checkpoints: ``$CERTATTR_CACHE/zoo`` (default ``~/.cache/certattr/zoo``)."""
    root = os.environ.get("CERTATTR_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "certattr") / "zoo"


def resolve_checkpoint(ref: str, *, device: str = "cpu", progress: bool = True) -> str:
    """A checkpoint path for ``ref``: a zoo reference is trained (once) and cached; a path is returned as is."""
    from .spec import ZOO_PREFIX, parse_zoo_ref

    if not ref.startswith(ZOO_PREFIX):
        return ref
    model, dataset, recipe = parse_zoo_ref(ref)
    target = zoo_dir() / f"{model}-{dataset}-{recipe}"
    if (target / "certattr.json").is_file():
        return str(target)
    train_zoo_model(model, dataset, target, recipe=recipe, device=device, progress=progress)
    return str(target)


def train_zoo_model(model_name: str, dataset: str, out: str | Path, *, recipe: str = "quick",
                    device: str = "cpu", progress: bool = True, seed: int = 0, threads: int | None = 1,
                    activation: str = "relu", beta: float = 10.0, **overrides) -> dict:
    """Train ``model_name`` naturally on ``dataset`` with a recipe (overrides: epochs, batch_size,
    n_train, max_steps, lr) and save a certattr checkpoint at ``out``; returns fit's summary.
    ``activation``: "relu" (the zoo default) or "softplus" with ``beta`` (softplus_beta(z) =
    log(1 + exp(beta z)) / beta, a smooth network whose own input-Hessian the practical bound uses).

    ``threads``: torch intra-op threads while training (default 1: these small nets train fastest
    single-threaded on CPU, and a busy machine cannot stall them; measured for cnn-small "quick" on a
    shared 2-core box: 5 s with 1 thread, 44 s with 2).  None keeps the current setting.
    """
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _train(model_name, dataset, out, recipe, device, progress, seed, overrides,
                      {"activation": activation, "beta": float(beta)} if activation != "relu" else {})
    finally:
        torch.set_num_threads(previous)


def _train(model_name, dataset, out, recipe, device, progress, seed, overrides, arch=None) -> dict:
    import torch

    from ..data import dataset_info, load_dataset
    from ..models import build_model
    from ..train import fit

    cfg = dict(RECIPES[recipe])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    info = dataset_info(dataset)
    x, y = load_dataset(dataset, "train")
    if cfg["n_train"] is not None:
        x, y = x[: cfg["n_train"]], y[: cfg["n_train"]]
    xt, yt = load_dataset(dataset, "test")
    torch.manual_seed(seed)
    model = build_model(model_name, in_shape=info["in_shape"], num_classes=info["num_classes"], **(arch or {}))
    return fit(model, (x, y), method="natural", dataset=dataset, epochs=cfg["epochs"],
               batch_size=cfg["batch_size"], lr=cfg["lr"], seed=seed, device=device, out=out,
               test=(xt[:2000], yt[:2000]), progress=progress, max_steps=cfg["max_steps"],
               meta={"zoo_recipe": recipe, "in_shape": list(info["in_shape"])})
