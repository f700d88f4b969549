"""Training: one loop (:func:`fit`) for every method; losses registered by name; evaluation.

Certified attribution training (``cert-ibp``, ``cert-crown-ibp``) lives in :mod:`certattr.train.certified`;
its eps / lambda schedule reads the loop's progress (:func:`current_progress`)."""
from .evaluate import evaluate
from .loop import accuracy, fit
from .losses import (
    DEFAULTS,
    LOSSES,
    current_progress,
    default_hparams,
    get_loss,
    register_loss,
    training_progress,
    validate_hparams,
    weight_key,
)

__all__ = ["DEFAULTS", "LOSSES", "accuracy", "current_progress", "default_hparams", "evaluate", "fit", "get_loss",
           "register_loss", "training_progress", "validate_hparams", "weight_key"]
