"""Attacks (SPEC 4): PGD on the prediction, IFIA and deviation attacks on the attribution, and Chen
et al.'s evaluation protocol.

    from certattr.attacks import pgd, ifia, deviation_attack
    adv = pgd(model, x, y, eps=0.3, norm="inf", steps=40, step_size=0.01)
    res = ifia(model, x, eps=0.3, kind="topk", attribution="saliency", k=100)
    res = deviation_attack(model, x, eps=0.1, norm="inf", objective="euclidean")
    res = smoothed_attack(model, x, eps=0.5, norm=2, radius=1.0)   # on the smoothed attribution h

Attacks take (B, C, H, W), (B, H, W) and tabular (B, n) batches; ``k`` defaults to
:func:`certattr.metrics.default_k` of the map size.  ``AttackResult.measured_on`` says which function
the reported deviations were measured on (the real net, a softplus surrogate, or a smoothed h).

All are batched over samples and restarts (restarts are stacked into the batch), work under l_inf and
l_2, keep every iterate in the ball ∩ domain, and are reproducible: the randomness of a sample
depends only on (seed, restart, the sample), not on the rest of the batch.
"""
from .base import AttackResult, max_violation, project
from .deviation import deviation_attack
from .ifia import ifia
from .pgd import pgd
from .protocol import ProtocolResult, evaluate_attribution_robustness
from .smoothed import smoothed_attack, smoothed_key

__all__ = [
           "AttackResult",
           "ProtocolResult",
           "deviation_attack",
           "evaluate_attribution_robustness",
           "ifia",
           "max_violation",
           "pgd",
           "project",
           "smoothed_attack",
           "smoothed_key",
]
