"""Small closed-form models shared by the smoothed-certificate and smoothed-attack tests."""

from __future__ import annotations

import torch
from torch import nn


class Bowl(nn.Module):
    """f_0(x) = -0.5 ||x - c||^2 (label 0 everywhere): the normalised saliency points from x to c."""

    def __init__(self, c):
        super().__init__()
        self.register_buffer("c", torch.as_tensor(c, dtype=torch.float64))

    def forward(self, x):
        f = -0.5 * ((x - self.c) ** 2).sum(1)
        return torch.stack([f, f - 100.0], 1)
