"""Final evaluation of a trained model (Chen et al., NeurIPS 2019, Table 1 protocol):

* NA: natural accuracy;
* AA: accuracy under PGD on the cross-entropy (:func:`certattr.attacks.pgd`, random start);
* IN / CO: mean top-k intersection and Kendall's tau-b between the attribution map of x and of the
  IFIA top-k iterate (:func:`certattr.attacks.ifia`: softplus-surrogate gradients, criterion and label
  check on the real network), over the first ``n_attr`` correctly classified images, with Chen et al.'s
  protocol (:func:`certattr.attacks.evaluate_attribution_robustness`: ``runs`` runs, per image the run
  with the lowest Kendall kept, then averaged).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..attacks import evaluate_attribution_robustness, pgd
from ..errors import CertattrError, check_eps, check_norm
from ..models import model_device
from .inner import eval_mode

# Per-dataset evaluation defaults (the robust-attribution papers' settings, SPEC 4).
EVAL_DEFAULTS: dict[str, dict] = {
    "mnist": {
        "eps": 0.3,
        "pgd_steps": 40,
        "pgd_step_size": 0.01,
        "ifia_steps": 100,
        "ifia_step_size": 0.01,
        "k": 100,
    },
    "fashion-mnist": {
        "eps": 0.1,
        "pgd_steps": 20,
        "pgd_step_size": 0.01,
        "ifia_steps": 100,
        "ifia_step_size": 0.01,
        "k": 100,
    },
    "*": {
        "eps": 8 / 255,
        "pgd_steps": 20,
        "pgd_step_size": 2 / 255,
        "ifia_steps": 100,
        "ifia_step_size": 1 / 255,
        "k": 100,
    },
}


def eval_defaults(dataset: str | None) -> dict:
    """The evaluation settings of ``dataset`` (``"*"`` for any other)."""
    return dict(EVAL_DEFAULTS.get(dataset or "*", EVAL_DEFAULTS["*"]))


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """(N,) bool on the CPU: argmax f(x) == y, in batches on the model's device."""
    device = model_device(model)
    out = []
    with eval_mode(model):
        for s in range(0, x.shape[0], batch_size):
            pred = model(x[s : s + batch_size].to(device)).argmax(1)
            out.append((pred == y[s : s + batch_size].to(device)).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def pgd_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "inf",
    steps: int = 40,
    step_size: float | None = None,
    seed: int = 0,
    batch_size: int = 200,
    domain: tuple[float, float] = (0.0, 1.0),
) -> float:
    """Accuracy under PGD on CE (Madry et al. 2018; :func:`certattr.attacks.pgd`, one random start);
    step default 2.5 eps / steps.  A clean misclassification counts as a failure."""
    norm = check_norm(norm)
    eps = check_eps(eps)
    step_size = 2.5 * eps / max(int(steps), 1) if step_size is None else float(step_size)
    device = model_device(model)
    correct = 0
    with eval_mode(model):
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size].to(device)
            yb = y[start : start + batch_size].to(device)
            if eps > 0 and step_size > 0:
                xb = pgd(
                    model,
                    xb,
                    yb,
                    eps=eps,
                    norm=norm,
                    steps=int(steps),
                    step_size=step_size,
                    random_start=True,
                    seed=int(seed) + start,
                    domain=domain,
                )
            with torch.no_grad():
                correct += int((model(xb).argmax(1) == yb).sum())
    return correct / max(1, x.shape[0])


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float = 0.3,
    norm: str = "inf",
    n_attr: int = 100,
    n_pgd: int | None = 1000,
    pgd_steps: int = 40,
    pgd_step_size: float | None = 0.01,
    ifia_steps: int = 100,
    ifia_step_size: float = 0.01,
    k: int = 100,
    attribution_name: str = "ig",
    ig_steps: int = 50,
    attack_ig_steps: int = 10,
    surrogate_beta: float = 10.0,
    runs: int = 1,
    batch_size: int = 50,
    seed: int = 0,
    domain: tuple[float, float] = (0.0, 1.0),
) -> dict:
    """NA / AA / IN / CO of ``model`` on (x, y) (see the module docstring).  Defaults: MNIST's (eps 0.3,
    PGD 40 x 0.01, IFIA top-k 100 x 0.01, k 100, IG m 50 (attack m 10), surrogate beta 10).
    ``n_pgd``: images for AA (None: all); ``n_attr``: correctly classified images attacked by IFIA
    (0 skips IN / CO).  ``runs`` > 1 only helps if the attack differs between seeds (attacks.ifia starts
    restart 0 at x, so IFIA top-k runs are identical today).  Returns a JSON-able dict of the numbers
    and the settings."""
    norm = check_norm(norm)
    eps = check_eps(eps)
    if int(n_attr) < 0 or int(runs) < 1 or (n_pgd is not None and int(n_pgd) < 0):
        raise CertattrError(f"need n_attr >= 0, n_pgd >= 0 and runs >= 1, got {n_attr}, {n_pgd}, {runs}")
    device = model_device(model)
    correct = _correct(model, x, y)
    xp, yp = (x, y) if n_pgd is None else (x[: int(n_pgd)], y[: int(n_pgd)])
    result = {
        "natural_accuracy": int(correct.sum()) / correct.numel() if correct.numel() else math.nan,
        "pgd_accuracy": pgd_accuracy(
            model,
            xp,
            yp,
            eps=eps,
            norm=norm,
            steps=pgd_steps,
            step_size=pgd_step_size,
            seed=seed,
            domain=domain,
        )
        if xp.shape[0]
        else math.nan,
        "topk_intersection": math.nan,
        "kendall": math.nan,
        "n": int(x.shape[0]),
        "n_pgd": int(xp.shape[0]),
        "n_attr": 0,
        "eps": eps,
        "norm": norm,
        "pgd_steps": int(pgd_steps),
        "ifia_steps": int(ifia_steps),
        "k": int(k),
        "attribution": attribution_name,
        "runs": int(runs),
        "seed": int(seed),
    }
    idx = torch.nonzero(correct).flatten()[: int(n_attr)]
    if idx.numel() == 0:
        return result
    with eval_mode(model):
        res = evaluate_attribution_robustness(
            model,
            x[idx].to(device),
            y[idx].to(device),
            runs=int(runs),
            seed=int(seed),
            batch_size=batch_size,
            eps=eps,
            norm=norm,
            kind="topk",
            attribution=attribution_name,
            k=int(k),
            steps=int(ifia_steps),
            step_size=ifia_step_size,
            surrogate_beta=surrogate_beta,
            ig_steps=int(ig_steps),
            attack_ig_steps=int(attack_ig_steps),
            domain=tuple(domain),
        )
    result.update(
        topk_intersection=res.mean_topk_intersection,
        kendall=res.mean_kendall,
        n_attr=int(res.indices.numel()),
    )
    return result


def format_line(result: dict) -> str:
    """One line: ``final evaluation: natural accuracy .. | PGD accuracy .. | IFIA top-k ..: top-k
    intersection .., Kendall ..``."""
    line = (
        f"final evaluation: natural accuracy {result['natural_accuracy']:.4f} (n={result['n']}) | "
        f"PGD accuracy {result['pgd_accuracy']:.4f} (l{result['norm']} eps {result['eps']:g}, "
        f"{result['pgd_steps']} steps, n={result['n_pgd']})"
    )
    if result.get("n_attr"):
        line += (
            f" | IFIA top-k ({result['attribution']}, k={result['k']}, {result['ifia_steps']} steps, "
            f"n={result['n_attr']}): top-k intersection {result['topk_intersection']:.4f}, "
            f"Kendall {result['kendall']:.4f}"
        )
    return line
