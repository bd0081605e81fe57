"""Fold eval-mode batch norm into the preceding Linear / Conv2d, so the served model has no BN layer."""

from __future__ import annotations

import copy

import torch
from torch import nn

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def batchnorm_scale_shift(bn: nn.BatchNorm1d | nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel `(scale, shift)` with `bn(x) = scale * x + shift` under eval-mode (running) statistics."""
    if bn.running_var is None or bn.running_mean is None:
        raise ValueError(f"{type(bn).__name__} without running statistics cannot be folded or bounded")
    scale = 1.0 / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -bn.running_mean.detach().double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift


def _fold_into(layer: nn.Linear | nn.Conv2d, bn: nn.Module) -> None:
    scale, shift = batchnorm_scale_shift(bn)
    weight = layer.weight.detach().double()
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(scale)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    folded_weight = (weight * scale.reshape(shape)).to(layer.weight.dtype)
    folded_bias = (bias * scale + shift).to(layer.weight.dtype)
    layer.weight = nn.Parameter(folded_weight)
    layer.bias = nn.Parameter(folded_bias)


def _fold_sequential(seq: nn.Sequential) -> nn.Sequential:
    children: list[nn.Module] = []
    for child in seq:
        previous = children[-1] if children else None
        if isinstance(child, _BATCHNORMS) and isinstance(previous, nn.Linear | nn.Conv2d):
            _fold_into(previous, child)
            continue
        children.append(_fold_module(child))
    return nn.Sequential(*children)


def _fold_module(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.Sequential):
        return _fold_sequential(module)
    for name, child in list(module.named_children()):
        setattr(module, name, _fold_module(child))
    return module


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A deep copy of `model` (in eval mode) with every BatchNorm that directly follows a Linear/Conv2d inside a
    Sequential folded into that layer; the copy computes the same function as `model.eval()`.

    A BatchNorm with no preceding affine layer is kept; bounds/ treats it as a per-channel affine layer.
    """
    folded = _fold_module(copy.deepcopy(model).eval())
    return folded.eval()
