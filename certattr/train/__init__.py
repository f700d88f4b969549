"""Training: one loop (:func:`fit`) for every method; losses registered by name."""
from .loop import accuracy, fit
from .losses import DEFAULTS, LOSSES, default_hparams, get_loss, register_loss

__all__ = ["fit", "accuracy", "LOSSES", "DEFAULTS", "default_hparams", "get_loss", "register_loss"]
