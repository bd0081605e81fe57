"""Tiny seeded models in the bounds vocabulary, shared by the bounds tests."""

from __future__ import annotations

import torch
from torch import nn

from bounds import AOLConv2d, AOLLinear, MaxMin, Residual, materialize


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


def aol_dense_maxmin(seed: int) -> nn.Module:
    """A 1-Lipschitz dense net, 1x8x8 -> Flatten -> 64 -> MaxMin -> 32 -> MaxMin -> 16 (AOL layers, materialized).

    Random (not orthogonal) AOL weights and biases, so pairs flip inside small balls."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Flatten(), AOLLinear(64, 64, weight=torch.randn(64, 64)), MaxMin(),
        AOLLinear(64, 32, weight=torch.randn(32, 64)), MaxMin(), AOLLinear(32, 16, weight=torch.randn(16, 32)),
    )
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, AOLLinear):
                layer.bias.uniform_(-0.1, 0.1)
    return materialize(model)


def aol_conv_maxmin(seed: int) -> nn.Module:
    """A 1-Lipschitz convnet, 1x8x8 -> AOLConv2d(1, 4) -> MaxMin -> PixelUnshuffle(2) -> AOLConv2d(16, 8) -> MaxMin
    -> Flatten -> AOLLinear(128, 16) (materialized)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        AOLConv2d(1, 4, 3), MaxMin(), nn.PixelUnshuffle(2), AOLConv2d(16, 8, 3), MaxMin(), nn.Flatten(),
        AOLLinear(128, 16, weight=torch.randn(16, 128)),
    )
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, AOLConv2d):
                layer.weight.add_(0.3 * torch.randn_like(layer.weight))
                layer.bias.uniform_(-0.1, 0.1)
    return materialize(model)


def random_maxmin(seed: int) -> nn.Module:
    """A MaxMin convnet with plain random layers scaled up (Lipschitz well above 1, bounds not trivially tight),
    1x8x8 -> conv(1, 4) -> MaxMin -> PixelUnshuffle(2) -> Flatten -> 32 -> MaxMin -> 16."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), MaxMin(), nn.PixelUnshuffle(2), nn.Flatten(), nn.Linear(256, 32), MaxMin(),
        nn.Linear(32, 16),
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(2.0)
    return model.eval()


MAXMIN_ENCODERS = {
    "aol_dense": (aol_dense_maxmin, (1, 8, 8)),
    "aol_conv": (aol_conv_maxmin, (1, 8, 8)),
    "random_maxmin": (random_maxmin, (1, 8, 8)),
}
