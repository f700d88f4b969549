"""The evaluation protocol of Chen, Wu, Rastogi, Liang & Jha (NeurIPS 2019, "Robust Attribution
Regularization"), used across the attributional-robustness literature:

attack only the correctly classified test points; run the attack ``runs`` times (different seeds);
per image keep the run whose adversarial attribution has the LOWEST Kendall tau with the clean one;
report the mean top-k intersection and mean Kendall tau of those runs (and the per-image values).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CertattrError
from .base import AttackResult, check_positive_int
from .ifia import ifia

AttackFn = Callable[..., AttackResult]


@dataclass
class ProtocolResult:
    """Per attacked image (the correctly classified ones, ``indices`` into x) and their means."""

    indices: torch.Tensor
    topk_intersection: torch.Tensor
    kendall: torch.Tensor
    best_run: torch.Tensor
    label_kept: torch.Tensor
    x_adv: torch.Tensor
    accuracy: float
    runs: int
    time: float

    @property
    def mean_topk_intersection(self) -> float:
        return float(self.topk_intersection.mean()) if self.indices.numel() else float("nan")

    @property
    def mean_kendall(self) -> float:
        return float(self.kendall.nanmean()) if self.indices.numel() else float("nan")


def evaluate_attribution_robustness(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: AttackFn | None = None,
    *,
    runs: int = 3,
    seed: int = 0,
    batch_size: int = 64,
    **attack_kwargs,
) -> ProtocolResult:
    """Chen et al.'s protocol on (x, y) (true labels y).

    ``attack(model, x, seed=..., target=..., **attack_kwargs) -> AttackResult``; default
    :func:`certattr.attacks.ifia` (``attack_kwargs``: eps, norm, kind, k, steps, ...; kind "topk"
    unless given).  Run r uses seed ``seed + r``; IFIA runs after the first start at random points of
    the ball (the first starts at x).  Attribution and label are those of the true label
    (= the prediction, since only correct points are attacked).  Kendall ties (nan, constant maps)
    count as worse than any number when choosing the run, and are skipped by the mean.
    """
    if not isinstance(y, torch.Tensor) or y.shape[:1] != x.shape[:1]:
        raise CertattrError("y must be a tensor of labels with one entry per image of x")
    runs = check_positive_int(runs, "runs")
    batch_size = check_positive_int(batch_size, "batch_size")
    if attack is None:
        attack = ifia
        attack_kwargs.setdefault("kind", "topk")
    if "eps" not in attack_kwargs and attack is ifia:
        raise CertattrError("evaluate_attribution_robustness needs eps= for the attack")
    y = y.to(x.device).long()
    started = time.perf_counter()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + batch_size]).argmax(dim=1) for i in range(0, x.shape[0], batch_size)])
    correct = pred == y
    indices = correct.nonzero().flatten()
    best_tau = torch.full((indices.numel(),), float("inf"), dtype=torch.float64, device=x.device)
    best_topk = torch.full_like(best_tau, float("nan"))
    best_run = torch.full((indices.numel(),), -1, dtype=torch.long, device=x.device)
    kept = torch.zeros(indices.numel(), dtype=torch.bool, device=x.device)
    x_adv = x[indices].clone()
    for r in range(runs):
        run_kwargs = dict(attack_kwargs)
        if attack is ifia and r > 0:
            # IFIA's first restart starts at x (deterministic); later runs start at random points of the
            # ball, otherwise every run would repeat the first one.
            run_kwargs.setdefault("random_start", True)
        for start in range(0, indices.numel(), batch_size):
            sel = indices[start:start + batch_size]
            res = attack(model, x[sel], seed=int(seed) + r, target=y[sel], **run_kwargs)
            tau = torch.nan_to_num(res.kendall.to(torch.float64), nan=float("inf"))
            part = slice(start, start + sel.numel())
            better = (tau < best_tau[part]) | (best_run[part] < 0)
            best_tau[part] = torch.where(better, tau, best_tau[part])
            best_topk[part] = torch.where(better, res.topk_intersection.to(torch.float64), best_topk[part])
            best_run[part] = torch.where(better, torch.full_like(best_run[part], r), best_run[part])
            kept[part] = torch.where(better, res.label_kept, kept[part])
            x_adv[part] = torch.where(better.view((-1,) + (1,) * (x.dim() - 1)), res.x_adv, x_adv[part])
    tau = torch.where(torch.isinf(best_tau), torch.full_like(best_tau, float("nan")), best_tau)
    return ProtocolResult(indices=indices, topk_intersection=best_topk, kendall=tau, best_run=best_run,
                          label_kept=kept, x_adv=x_adv, accuracy=float(correct.float().mean()), runs=runs,
                          time=time.perf_counter() - started)
