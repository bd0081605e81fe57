"""Tiny seeded models in the bounds vocabulary, shared by the bounds tests."""

from __future__ import annotations

import torch
from torch import nn

from bounds import Residual


def toy_encoder(seed: int) -> nn.Module:
    """DESIGN.md's toy: 1x8x8 -> conv -> 32 -> 16."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 16)
    ).eval()


def mnist_cnn(seed: int) -> nn.Module:
    """A small MNIST-like CNN, 1x28x28 -> 32 features, with stride, padding, pooling and batch norm."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 4, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 4, stride=2, padding=1), nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(16 * 3 * 3, 64), nn.ReLU(), nn.Linear(64, 32),
    )
    with torch.no_grad():
        bn = model[1]
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.1, 0.1)
    return model.eval()


def residual_cnn(seed: int) -> nn.Module:
    """A residual CNN, 3x8x8 -> 16 features: identity and 1x1-conv shortcuts."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        Residual(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))),
        nn.ReLU(),
        Residual(nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(12, 12, 3, padding=1)),
                 shortcut=nn.Conv2d(8, 12, 1, stride=2)),
        nn.ReLU(), nn.Flatten(), nn.Linear(12 * 4 * 4, 16),
    ).eval()


ENCODERS = {"toy": (toy_encoder, (1, 8, 8)), "mnist_cnn": (mnist_cnn, (1, 28, 28)), "residual": (residual_cnn, (3, 8, 8))}
