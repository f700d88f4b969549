"""Result objects returned by the bound functions (one tensor entry per sample of the batch)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class BoundResult:
    """Per-sample worst-case attribution-deviation bounds over B_p(x, eps).

    euclidean:       upper bound on ||g(x') - g(x)||_2 over the ball, shape (B,)
    cosine:          lower bound on cos(g(x), g(x')), shape (B,) (-1 when nothing can be said)
    label_certified: bool (B,): argmax f constant on the ball (practical kind: linearised, not sound)
    kind:            "practical" (first-order, NOT sound) | "certified" (sound) | "smoothed"
    network:         which network the numbers come from ("real", or "softplus-surrogate(beta=..)")
    time:            wall time of the whole call in seconds
    details:         method-specific extras (residuals, sub-bounds, solver status...)
    """

    kind: str
    norm: str
    eps: float
    attribution: str
    euclidean: torch.Tensor
    cosine: torch.Tensor
    label_certified: torch.Tensor
    target: torch.Tensor
    time: float
    method: str = ""
    network: str = "real"
    details: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.euclidean.shape[0])

    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per sample (for TSV / store writers)."""
        out = []
        per_sample_time = self.time / max(len(self), 1)
        for i in range(len(self)):
            out.append({
                "kind": self.kind, "method": self.method, "norm": self.norm, "eps": self.eps,
                "attribution": self.attribution, "target": int(self.target[i]),
                "euclidean": float(self.euclidean[i]), "cosine": float(self.cosine[i]),
                "label_certified": bool(self.label_certified[i]), "time": per_sample_time,
            })
        return out


def tangent_cosine(radius: torch.Tensor, norm_g: torch.Tensor) -> torch.Tensor:
    """Lower bound on cos(g, g') given ||g' - g|| <= r: sqrt(1 - r^2/||g||^2) if r < ||g||, else -1.

    (The worst g' lies on the tangent cone from the origin to the ball B(g, r).)"""
    ratio = radius / norm_g.clamp_min(torch.finfo(norm_g.dtype).tiny)
    inside = (radius < norm_g) & (norm_g > 0)
    cos = torch.sqrt((1 - ratio.clamp(max=1) ** 2).clamp_min(0))
    return torch.where(inside, cos, torch.full_like(cos, -1.0))
