"""Training: one loop (:func:`fit`) for every method; losses registered by name; evaluation."""
from .evaluate import evaluate
from .loop import accuracy, fit
from .losses import DEFAULTS, LOSSES, default_hparams, get_loss, register_loss, validate_hparams, weight_key

__all__ = ["DEFAULTS", "LOSSES", "accuracy", "default_hparams", "evaluate", "fit", "get_loss", "register_loss",
           "validate_hparams", "weight_key"]
