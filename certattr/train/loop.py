"""The single training loop shared by every method (natural, PGD-AT, TRADES, IG-NORM, ...).

Resumable: after every epoch the model (safetensors) and the optimiser/epoch state (tensors only,
read back with ``torch.load(weights_only=True)``) are written atomically under ``out/``; ``resume=True``
continues from the last finished epoch.  Shuffling uses a generator seeded by (seed, epoch), so a resumed
run sees the same batches as an uninterrupted one.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import CertattrError
from .losses import default_hparams, get_loss, training_progress, validate_hparams

STATE_FILE = "train_state.pt"
LAST_DIR = "last"


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on (x, y), evaluated in batches on the model's device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device)
        yb = y[start:start + batch_size].to(device)
        correct += int((model(xb).argmax(1) == yb).sum())
    model.train(was_training)
    return correct / max(1, x.shape[0])


def _save_state(out: Path, model, optimizer, epoch: int, history: list, meta: dict) -> None:
    from .. import checkpoint

    checkpoint.save(model, out / LAST_DIR, **meta, epoch=epoch)
    tmp = out / (STATE_FILE + ".tmp")
    torch.save({"optimizer": optimizer.state_dict(), "epoch": torch.tensor(epoch),
                "history": torch.tensor(history, dtype=torch.float64)}, tmp)
    os.replace(tmp, out / STATE_FILE)


def _load_state(out: Path, model, optimizer, map_location) -> tuple[int, list]:
    from .. import checkpoint

    state_path = out / STATE_FILE
    if not state_path.exists() or not (out / LAST_DIR).exists():
        return 0, []
    saved = checkpoint.load(out / LAST_DIR, map_location=map_location)
    model.load_state_dict(saved.state_dict())
    state = torch.load(state_path, weights_only=True, map_location=map_location)
    optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"]), [list(map(float, row)) for row in state["history"].tolist()]


def fit(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    *,
    method: str = "natural",
    hparams: dict | None = None,
    dataset: str | None = None,
    epochs: int = 1,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    out: str | Path | None = None,
    resume: bool = False,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: bool = True,
    meta: dict | None = None,
    max_steps: int | None = None,
) -> dict:
    """Train ``model`` with the loss of ``method`` (Adam, ``lr``) for ``epochs`` epochs.

    ``hparams`` may carry ``grad_clip`` (any method): the global gradient L2 norm is clipped to it
    (``torch.nn.utils.clip_grad_norm_``) before every optimiser step; None / 0 (default) = no clipping.

    Returns a summary dict: method, hparams, epochs, steps, seconds, final train loss, test accuracy
    (when ``test`` is given).  With ``out``, writes a resumable state after every epoch and the final
    checkpoint (certattr format) to ``out`` itself.
    """
    loss_fn = get_loss(method)
    hp = default_hparams(method, dataset)
    hp.update(hparams or {})
    x_train, y_train = train
    hp = validate_hparams(method, hp, in_shape=tuple(x_train.shape[1:]))
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise CertattrError(f"need epochs >= 1, batch_size >= 1, lr > 0 (got {epochs}, {batch_size}, {lr})")
    if x_train.shape[0] != y_train.shape[0]:
        raise CertattrError(f"{x_train.shape[0]} training images but {y_train.shape[0]} labels")
    grad_clip = hp.get("grad_clip")  # max global gradient norm (a loop hyperparameter, every method); None: off
    device = torch.device(device)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    out_path = Path(out) if out is not None else None
    meta = dict(meta or {})
    meta.update(method=method, hyperparameters=hp, seed=seed, dataset=dataset,
                training={"epochs": epochs, "batch_size": batch_size, "lr": lr, "optimizer": "adam"})
    start_epoch, history = 0, []
    if out_path is not None:
        out_path.mkdir(parents=True, exist_ok=True)
        if resume:
            start_epoch, history = _load_state(out_path, model, optimizer, device)
    n = x_train.shape[0]
    steps_per_epoch = (n + batch_size - 1) // batch_size
    t0 = time.perf_counter()
    steps = 0
    clipped = 0  # steps whose gradient norm exceeded grad_clip (this call's steps)
    last_loss = float("nan")
    for epoch in range(start_epoch, epochs):
        model.train()
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=gen)
        torch.manual_seed(seed * 100_003 + epoch)  # inner randomness of the loss (e.g. PGD random start)
        bar = tqdm(range(steps_per_epoch), desc=f"{method} epoch {epoch + 1}/{epochs}", disable=not progress,
                   leave=False, unit="batch")
        running, count = 0.0, 0
        for step in bar:
            idx = order[step * batch_size:(step + 1) * batch_size]
            xb, yb = x_train[idx].to(device), y_train[idx].to(device)
            with training_progress(epoch, step, steps_per_epoch):  # for scheduled losses (cert-*)
                loss = loss_fn(model, xb, yb, hp)
            if not torch.isfinite(loss):
                raise CertattrError(f"training loss became {float(loss)} at epoch {epoch + 1}, step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                total = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                clipped += int(float(total) > grad_clip)
            optimizer.step()
            running += float(loss.detach()) * xb.shape[0]
            count += xb.shape[0]
            steps += 1
            if step % 20 == 0:
                bar.set_postfix(loss=f"{running / count:.4f}")
            if max_steps is not None and steps >= max_steps:
                break
        last_loss = running / max(count, 1)
        test_acc = accuracy(model, *test) if test is not None else float("nan")
        history.append([epoch + 1, last_loss, test_acc])
        if progress:
            tqdm.write(f"epoch {epoch + 1}/{epochs}: train loss {last_loss:.4f}"
                       + (f", test accuracy {test_acc:.4f}" if test is not None else ""))
        if out_path is not None:
            _save_state(out_path, model, optimizer, epoch + 1, history, meta)
        if max_steps is not None and steps >= max_steps:
            break
    model.eval()
    summary = {
        "method": method, "hparams": hp, "epochs": epochs, "steps": steps,
        "seconds": time.perf_counter() - t0, "train_loss": last_loss,
        "test_accuracy": accuracy(model, *test) if test is not None else None,
        "history": history,
    }
    if grad_clip:
        summary["grad_clipped_steps"] = clipped
    if out_path is not None:
        from .. import checkpoint

        metrics = {"test_accuracy": summary["test_accuracy"], "train_loss": last_loss}
        checkpoint.save(model, out_path, **meta, metrics=metrics)
    return summary
