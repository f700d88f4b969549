"""bounds: worst-case attribution-deviation bounds (the verification core of certattr).

Knows models and tensors only (nothing about data sets, files or the CLI).  Public API::

    from bounds import practical_bound, certified_bound, smoothed_certificate, complete_bound

* ``practical_bound``: first-order (Wang & Kong, CVPR 2023).  *Practical*: NOT sound for finite eps.
* ``certified_bound``: bound propagation through the input-gradient graph (CROWN via auto_LiRPA, or
  interval arithmetic).  Sound for every point of the ball.
* ``smoothed_certificate``: cosine certificate of uniformly smoothed attributions (Wang & Kong 2024),
  holding with probability 1 - alpha over the Monte Carlo draw.
* ``complete_bound``: branch-and-bound on ReLU phases (ReLU MLPs, l_inf, saliency): a deviation
  actually reached (``lower``, with its point) and a sound ``upper``; exact when the gap closes.
  Other networks / norms / attributions: branch-and-bound on input boxes (``complete_input``,
  ``branching="input"``, chosen automatically by ``branching="auto"``).
"""
from __future__ import annotations

import importlib

from .result import BoundResult, tangent_cosine

_LAZY = {
    "practical_bound": "bounds.practical",
    "certified_bound": "bounds.certified",
    "smoothed_certificate": "bounds.smoothed",
    "SmoothedResult": "bounds.smoothed",
    "complete_bound": "bounds.complete",
    "CompleteResult": "bounds.complete",
}

__all__ = [
    "BoundResult",
    "CompleteResult",
    "SmoothedResult",
    "certified_bound",
    "complete_bound",
    "practical_bound",
    "smoothed_certificate",
    "tangent_cosine",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bounds' has no attribute {name!r}")
