"""bounds: worst-case attribution-deviation bounds (the verification core of certattr).

Knows models and tensors only.  Public API:
``practical_bound`` (first-order, *practical*, not sound), ``certified_bound`` (bound propagation,
sound for the whole ball), ``smoothed_certificate`` (uniformly smoothed attributions).
"""
