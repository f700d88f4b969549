"""Robust-*attribution* training losses (SPEC 5): IG-NORM and IG-SUM-NORM (Chen et al., NeurIPS 2019),
ART (Singh et al., ECCV 2020), FAR's AAT / AdvAAT (Ivankay et al. 2020), Sarkar et al. (AAAI 2021)
and IGR (Wang & Kong, NeurIPS 2022).

Every inner maximisation is a detached PGD (:func:`certattr.train.inner.inner_max`); the outer loss
differentiates through the attribution at x* with ``create_graph=True``.  Where an inner objective
needs the input-Hessian of a ReLU network (which is zero almost everywhere), the search runs on the
model's softplus branch (``inner_beta``, same weights); the outer loss always uses the real network,
except ART whose triplet term is defined on its softplus-beta-50 branch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .adversarial import attack_kwargs, with_attack
from .inner import (
    attribution,
    cosine,
    eval_mode,
    inner_max,
    kl_rows,
    logit_ig,
    logit_saliency,
    loss_ig,
    most_confusing,
    softplus_branch,
)
from .losses import register_loss

_IG = {"ig_steps": 50, "attack_ig_steps": 10}


def _l1(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).abs().sum(1)


# ------------------------------------------------------------------------------- Chen et al. 2019
@register_loss("ig-norm", with_attack({"lambda": 1.0, **_IG}), weight="lambda")
def ig_norm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, hp: dict) -> torch.Tensor:
    """IG-NORM: CE(f(x), y) + lambda ||IG^CE(x -> x*)||_1,  x* = argmax_{x' in B(x, eps)} ||IG^CE(x -> x')||_1
    (IG with ``attack_ig_steps`` points in the search, ``ig_steps`` in the loss; MNIST lambda 1)."""
    with eval_mode(model):
        x_star = inner_max(
            lambda z: _l1(loss_ig(model, x, z, y, hp["attack_ig_steps"], create_graph=False)),
            x,
            model=model,
            y=y,
            **attack_kwargs(hp),
        )
    reg = _l1(loss_ig(model, x, x_star, y, hp["ig_steps"], create_graph=True)).mean()
    return F.cross_entropy(model(x), y) + hp["lambda"] * reg


@register_loss("ig-sum-norm", with_attack({"beta": 0.1, **_IG}), weight="beta")
def ig_sum_norm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, hp: dict) -> torch.Tensor:
    """IG-SUM-NORM: max_{x' in B(x, eps)} CE(f(x'), y) + beta ||IG^CE(x -> x')||_1, evaluated at the PGD
    maximiser x* of that same objective (MNIST beta 0.1)."""
    x_star = _sum_norm_search(model, x, y, hp)
    reg = _l1(loss_ig(model, x, x_star, y, hp["ig_steps"], create_graph=True)).mean()
    return F.cross_entropy(model(x_star), y) + hp["beta"] * reg


def _sum_norm_search(model, x, y, hp) -> torch.Tensor:
    def objective(z):
        return F.cross_entropy(model(z), y, reduction="none") + hp["beta"] * _l1(
            loss_ig(model, x, z, y, hp["attack_ig_steps"], create_graph=False)
        )

    with eval_mode(model):
        return inner_max(objective, x, model=model, y=y, **attack_kwargs(hp))


# ----------------------------------------------------------------------------- Singh et al. 2020
def art_triplet(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, softplus_beta: float, lo: float
) -> torch.Tensor:
    """ART's soft-margin triplet per sample: log(1 + exp(d(a, p) - d(a, n))), d = 1 - cos, with
    anchor a = x - lo (the image), positive p = |d f_y/dx| (true class), negative n = |d f_c/dx| for
    the most confusing class c = argmax_{c != y} f_c(x); gradients on the softplus-beta branch.
    Minimising it aligns the true-class gradient map with the image (Singh et al. ECCV 2020)."""
    with torch.no_grad():
        neg = most_confusing(model(x), y)
    batch = x.shape[0]
    with softplus_branch(model, softplus_beta):
        grads = logit_saliency(model, torch.cat([x, x]), torch.cat([y, neg]), create_graph=True)
    anchor = x - lo
    d_pos = 1 - cosine(anchor, grads[:batch].abs())
    d_neg = 1 - cosine(anchor, grads[batch:].abs())
    return F.softplus(d_pos - d_neg)


@register_loss("art", with_attack({"lambda": 0.5, "softplus_beta": 50.0}), weight="lambda")
def art(model: nn.Module, x: torch.Tensor, y: torch.Tensor, hp: dict) -> torch.Tensor:
    """ART: CE(f(x_adv), y) + lambda * triplet(x_adv), x_adv = PGD maximiser of that same objective
    (lambda 0.5, softplus beta 50)."""
    lo = hp.get("domain", [0.0, 1.0])[0]

    def objective(z):
        return F.cross_entropy(model(z), y, reduction="none") + hp["lambda"] * art_triplet(
            model, z, y, softplus_beta=hp["softplus_beta"], lo=lo
        )

    with eval_mode(model):
        x_adv = inner_max(objective, x, model=model, y=y, **attack_kwargs(hp))
    triplet = art_triplet(model, x_adv, y, softplus_beta=hp["softplus_beta"], lo=lo).mean()
    return F.cross_entropy(model(x_adv), y) + hp["lambda"] * triplet


# --------------------------------------------------------------------------- Ivankay et al. 2020
_FAR = {"lambda": 1.0, "attribution": "saliency", "inner_beta": 10.0, **_IG}


def _far(model: nn.Module, x: torch.Tensor, y: torch.Tensor, hp: dict, adversarial: bool) -> torch.Tensor:
    name, lam = hp["attribution"], hp["lambda"]
    with eval_mode(model):
        with softplus_branch(model, hp["inner_beta"]):
            g0 = attribution(model, x, y, name, ig_steps=hp["attack_ig_steps"], create_graph=False).detach()

        def objective(z):  # deviation attack on cosine (+ CE for AdvAAT), gradients on the softplus branch
            with softplus_branch(model, hp["inner_beta"]):
                dev = 1 - cosine(
                    g0, attribution(model, z, y, name, ig_steps=hp["attack_ig_steps"], create_graph=True)
                )
            return F.cross_entropy(model(z), y, reduction="none") + lam * dev if adversarial else dev

        x_adv = inner_max(objective, x, model=model, y=y, **attack_kwargs(hp))
    g_clean = attribution(model, x, y, name, ig_steps=hp["ig_steps"], create_graph=True)
    g_adv = attribution(model, x_adv, y, name, ig_steps=hp["ig_steps"], create_graph=True)
    dev = (1 - cosine(g_clean, g_adv)).mean()
    return F.cross_entropy(model(x_adv if adversarial else x), y) + lam * dev


@register_loss("far-aat", with_attack(_FAR), weight="lambda")
def far_aat(model: nn.Module, x: torch.Tensor, y: torch.Tensor, hp: dict) -> torch.Tensor:
    """FAR attributional adversarial training (AAT): CE(f(x), y) + lambda * (1 - cos(g(x), g(x*))),
    x* = argmax_{x' in B(x, eps)} 1 - cos(g(x), g(x')) (deviation attack on cosine); g = ``attribution``."""
    return _far(model, x, y, hp, adversarial=False)


@register_loss("far-advaat", with_attack(_FAR), weight="lambda")
def far_advaat(model: nn.Module, x: torch.Tensor, y: torch.Tensor, hp: dict) -> torch.Tensor:
    """FAR AdvAAT: CE(f(x*), y) + lambda * (1 - cos(g(x), g(x*))), x* maximising that same objective."""
    return _far(model, x, y, hp, adversarial=True)


# ----------------------------------------------------------------------------- Sarkar et al. 2021
def _pixel_log_softmax(g: torch.Tensor, tau: float) -> torch.Tensor:
    """log of the pixel distribution softmax(m / tau), m = channel-summed map scaled to max |m| = 1."""
    m = g.sum(1).flatten(1) if g.dim() == 4 else g.flatten(1)
    m = m / m.abs().amax(1, keepdim=True).clamp_min(1e-12)
    return F.log_softmax(m / tau, dim=1)


def kl_uniform(log_p: torch.Tensor) -> torch.Tensor:
    """KL(U || P) = sum_i (1/n) log((1/n) / P_i) = -log n - mean_i log P_i, per row."""
    return -math.log(log_p.shape[1]) - log_p.mean(1)


@register_loss("sarkar", with_attack({"lambda": 1.0, "beta": 0.1, "tau": 0.1, **_IG}), weight="lambda")
def sarkar(model: nn.Module, x: torch.Tensor, y: torch.Tensor, hp: dict) -> torch.Tensor:
    """Sarkar et al. 2021 on top of IG-SUM-NORM:
    CE(f(x*), y) + beta ||IG^CE(x -> x*)||_1 + lambda [KL(U || NCA) - KL(U || TCA)],
    TCA / NCA = pixel softmax (temperature tau, map scaled to max |m| = 1) of the IG maps at x* of the true
    class and of the strongest wrong class, U uniform: the true-class map is pushed away from uniform and
    the negative-class map towards it.  x* = the IG-SUM-NORM maximiser."""
    x_star = _sum_norm_search(model, x, y, hp)
    logits = model(x_star)
    change = _l1(loss_ig(model, x, x_star, y, hp["ig_steps"], create_graph=True)).mean()
    neg = most_confusing(logits, y)
    maps = logit_ig(
        model, torch.cat([x_star, x_star]), torch.cat([y, neg]), hp["ig_steps"], create_graph=True
    )
    kl = kl_uniform(_pixel_log_softmax(maps, hp["tau"]))
    batch = x.shape[0]
    distribution = (kl[batch:] - kl[:batch]).mean()
    return F.cross_entropy(logits, y) + hp["beta"] * change + hp["lambda"] * distribution


# ----------------------------------------------------------------------------- Wang & Kong 2022
@register_loss("igr", with_attack({"lambda": 1.0, "beta": 6.0, "inner_beta": 10.0, **_IG}), weight="lambda")
def igr(model: nn.Module, x: torch.Tensor, y: torch.Tensor, hp: dict) -> torch.Tensor:
    """IGR (unverified form): TRADES robust loss + lambda (1 - cos(IG(x), IG(x*))):
    CE(f(x), y) + beta KL(f(x) || f(x*)) + lambda (1 - cos(IG_y(x), IG_y(x*))), x* maximising
    KL + lambda (1 - cos) in B(x, eps) (IG gradients of the search on the softplus branch)."""
    m_attack, lam = hp["attack_ig_steps"], hp["lambda"]
    with eval_mode(model):
        with torch.no_grad():
            clean = model(x)
        with softplus_branch(model, hp["inner_beta"]):
            ig0 = logit_ig(model, x, y, m_attack, create_graph=False).detach()

        def objective(z):
            with softplus_branch(model, hp["inner_beta"]):
                dev = 1 - cosine(ig0, logit_ig(model, z, y, m_attack, create_graph=True))
            return kl_rows(clean, model(z)) + lam * dev

        x_adv = inner_max(objective, x, model=model, y=y, **attack_kwargs(hp))
    logits = model(x)
    dev = (
        1
        - cosine(
            logit_ig(model, x, y, hp["ig_steps"], create_graph=True),
            logit_ig(model, x_adv, y, hp["ig_steps"], create_graph=True),
        )
    ).mean()
    return F.cross_entropy(logits, y) + hp["beta"] * kl_rows(logits, model(x_adv)).mean() + lam * dev
