"""Encoders that are 1-Lipschitz by construction, and the reference encoders (identity, PCA) they must beat.

Every encoder here is an nn.Sequential of vocabulary layers (Flatten, Linear, Conv2d, MaxMin, PixelUnshuffle), so
the served model is exactly what bounds/ certifies. While training, the Conv2d layers are AOL convolutions and the
Linear layers are spectrally normalised with their exact norm (bounds.lipschitz_layers): operator norm <= 1
whatever the parameters. Dense layers are not AOL because AOL shrinks a narrowing layer (784 -> 64) by about
sqrt(out / in): measured, a 784-64-64-16 AOL MLP came out with L = 0.25 and features too small for InfoNCE to see.
`materialize` turns them back into plain layers for the checkpoint, which records the Lipschitz bound recomputed
by bounds/ with sound norms.

* `identity`: Flatten. L = 1 exactly; the certificate loses nothing, but the head sees every pixel.
* `pca`: Flatten + Linear whose rows are the top-k principal directions of the pre-training images (orthonormal,
  so L = 1 exactly), bias -P·mean (centring, which does not change L).
* `lipschitz_mlp`: Flatten, then (Linear -> MaxMin) per hidden width, then Linear -> feature_dim.
* `lipschitz_conv`: per stage a 3x3 conv -> MaxMin, stages joined by PixelUnshuffle(2) (an invertible reshuffle of
  pixels into channels: it halves H and W and keeps the norm, unlike pooling or a strided conv), then Flatten,
  Linear -> hidden_dim, MaxMin, Linear -> feature_dim.
"""

from __future__ import annotations

import torch
from torch import nn

from bounds.layers import MaxMin
from bounds.lipschitz_layers import AOLConv2d, SpectralNormLinear


def identity_encoder() -> nn.Sequential:
    return nn.Sequential(nn.Flatten())


def pca_encoder(input_shape: tuple[int, int, int], feature_dim: int) -> nn.Sequential:
    """The PCA architecture (weights from `fit_pca`, or a checkpoint)."""
    channels, height, width = input_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * height * width, feature_dim))


def fit_pca(images: torch.Tensor, feature_dim: int) -> nn.Sequential:
    """The PCA encoder of `images` [N, C, H, W]: rows = top `feature_dim` right singular vectors of the centred
    data (float64 SVD), so the rows are orthonormal and the encoder's Lipschitz constant is 1."""
    flat = images.flatten(1).to(torch.float64)
    mean = flat.mean(dim=0)
    _, _, right = torch.linalg.svd(flat - mean, full_matrices=False)
    components = right[:feature_dim]
    encoder = pca_encoder(tuple(images.shape[1:]), feature_dim)
    with torch.no_grad():
        encoder[1].weight.copy_(components.to(torch.float32))
        encoder[1].bias.copy_((-(components @ mean)).to(torch.float32))
    return encoder


def lipschitz_mlp(input_shape: tuple[int, int, int], widths: tuple[int, ...], feature_dim: int,
                  *, trainable: bool = False) -> nn.Sequential:
    """The dense Lipschitz encoder; `trainable` gives AOL layers (for training), else plain ones (to load)."""
    channels, height, width = input_shape
    sizes = [channels * height * width, *widths, feature_dim]
    layers: list[nn.Module] = [nn.Flatten()]
    for index, (size_in, size_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(SpectralNormLinear(size_in, size_out) if trainable else nn.Linear(size_in, size_out))
        if index < len(widths):
            layers.append(MaxMin())
    return nn.Sequential(*layers)


def lipschitz_conv(input_shape: tuple[int, int, int], widths: tuple[int, ...], hidden_dim: int,
                   feature_dim: int, *, trainable: bool = False) -> nn.Sequential:
    """The convolutional Lipschitz encoder (see the module docstring)."""
    channels, height, width = input_shape
    layers: list[nn.Module] = []
    for stage, stage_width in enumerate(widths):
        if stage > 0:
            layers.append(nn.PixelUnshuffle(2))
            channels, height, width = channels * 4, height // 2, width // 2
        layers += [AOLConv2d(channels, stage_width, 3) if trainable else nn.Conv2d(channels, stage_width, 3, padding=1),
                   MaxMin()]
        channels = stage_width
    flat = channels * height * width
    dense = SpectralNormLinear if trainable else nn.Linear
    layers += [nn.Flatten(), dense(flat, hidden_dim), MaxMin(), dense(hidden_dim, feature_dim)]
    return nn.Sequential(*layers)


REFERENCE_KINDS: tuple[str, ...] = ("identity", "pca")


def reference_encoder(kind: str, images: torch.Tensor, feature_dim: int) -> nn.Sequential:
    """The reference encoder `kind` for pre-training `images` [N, C, H, W] (labels are never used):
    "identity" (Flatten) or "pca" (`fit_pca` with `feature_dim` components)."""
    if kind == "identity":
        return identity_encoder()
    if kind == "pca":
        return fit_pca(images, feature_dim)
    raise ValueError(f"unknown reference encoder {kind!r}; valid: {', '.join(REFERENCE_KINDS)}")
