"""Adversarial training for *prediction* robustness: PGD-AT (Madry et al., ICLR 2018) and TRADES
(Zhang et al., ICML 2019).  Also the per-dataset attack defaults that every robust method shares.

Defaults (papers' configs): MNIST eps 0.3, 40 PGD steps of 0.01; Fashion-MNIST eps 0.1, 20 steps of
0.01 (Chen et al. 2019's FMNIST setting); any other dataset eps 8/255, 7 steps of 2/255 (Madry's
CIFAR-10 setting).  linf, random start, domain [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .inner import eval_mode, inner_max, kl_rows
from .losses import register_loss

ATTACK_DEFAULTS: dict[str, dict] = {
    "*": {
        "eps": 8 / 255,
        "steps": 7,
        "step_size": 2 / 255,
        "norm": "inf",
        "random_start": True,
        "domain": [0.0, 1.0],
    },
    "mnist": {"eps": 0.3, "steps": 40, "step_size": 0.01},
    "fashion-mnist": {"eps": 0.1, "steps": 20, "step_size": 0.01},
}


def with_attack(extra: dict | None = None, **per_dataset: dict) -> dict[str, dict]:
    """The shared attack defaults + the method's own ``extra`` ("*") and per-dataset values."""
    table = {key: dict(value) for key, value in ATTACK_DEFAULTS.items()}
    table["*"].update(extra or {})
    for dataset, values in per_dataset.items():
        table.setdefault(dataset.replace("_", "-"), {}).update(values)
    return table


def attack_kwargs(hp: dict) -> dict:
    """The inner-maximisation keyword arguments of :func:`inner_max` taken from ``hp``."""
    lo, hi = hp.get("domain", [0.0, 1.0])
    return {
        "eps": hp["eps"],
        "norm": hp.get("norm", "inf"),
        "steps": hp["steps"],
        "step_size": hp["step_size"],
        "random_init": hp.get("random_start", True),
        "domain": (lo, hi),
    }


def pgd_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor, hp: dict) -> torch.Tensor:
    """x* = PGD maximising CE(f(x'), y) over B_p(x, eps) ∩ domain (model in eval mode during the search)."""
    with eval_mode(model):
        return inner_max(
            lambda z: F.cross_entropy(model(z), y, reduction="none"), x, model=model, y=y, **attack_kwargs(hp)
        )


@register_loss("pgd-at", with_attack())
def pgd_at(model: nn.Module, x: torch.Tensor, y: torch.Tensor, hp: dict) -> torch.Tensor:
    """PGD adversarial training (Madry et al. 2018): CE(f(x*), y),
    x* = argmax_{x' in B(x, eps)} CE(f(x'), y)."""
    return F.cross_entropy(model(pgd_ce(model, x, y, hp)), y)


@register_loss("trades", with_attack({"beta": 6.0}), weight="beta")
def trades(model: nn.Module, x: torch.Tensor, y: torch.Tensor, hp: dict) -> torch.Tensor:
    """TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(f(x) || f(x*)),
    x* = argmax_{x' in B(x, eps)} KL(f(x) || f(x')) started at x + 0.001 N(0, I); beta = 6 (= 1/lambda)."""
    kwargs = attack_kwargs(hp)
    kwargs["random_init"] = "trades" if kwargs["random_init"] else False
    with eval_mode(model):
        with torch.no_grad():
            clean = model(x)
        x_adv = inner_max(lambda z: kl_rows(clean, model(z)), x, model=model, y=y, **kwargs)
    logits = model(x)
    return F.cross_entropy(logits, y) + hp["beta"] * kl_rows(logits, model(x_adv)).mean()
