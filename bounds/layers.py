"""The bound-friendly layer vocabulary's one custom module, and the error for everything outside it."""

from __future__ import annotations

import torch
from torch import nn


class UnsupportedLayerError(TypeError):
    """A module outside the vocabulary that bounds/ can propagate bounds through.

    The vocabulary: nn.Sequential, nn.Linear, nn.Conv2d (zero padding, any stride/dilation/groups), nn.ReLU,
    nn.Flatten, nn.AvgPool2d (floor mode), nn.Identity, nn.BatchNorm1d/2d (eval-mode statistics), Residual.
    """


class Residual(nn.Module):
    """`y = body(x) + shortcut(x)`; the shortcut is the identity when None.

    Its Lipschitz constant is at most `Lip(body) + Lip(shortcut)` (1 + ||body|| for the identity shortcut).
    """

    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        self.body = body
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + (x if self.shortcut is None else self.shortcut(x))
