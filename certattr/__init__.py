"""certattr: certified and empirical robustness of neural-network attributions.

Layers (each imports only the ones below it): data, models, checkpoint, attributions, metrics ->
attacks, train -> campaign -> report -> cli.  The verification core lives in the separate package
``bounds`` which knows models and tensors only.
"""

__version__ = "0.1.0"
