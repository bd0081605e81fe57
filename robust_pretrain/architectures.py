"""Encoder architectures built only from the bounds vocabulary, described by a plain config.

Every encoder is an ``nn.Sequential`` of Conv2d / Linear / ReLU / MaxMin / Flatten / PixelUnshuffle / AvgPool2d /
``bounds.Residual`` (no batch norm), so the served model is exactly the trained one and every layer has a sound
bound in ``bounds/``. A checkpoint stores the ``EncoderConfig`` as JSON and rebuilds its own model from it.
The Lipschitz-by-construction family and the reference encoders live in ``lipschitz_encoders``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from bounds import Residual
from robust_pretrain.lipschitz_encoders import identity_encoder, lipschitz_conv, lipschitz_mlp, pca_encoder
from robust_pretrain.text_encoders import text_bag_features, text_bag_pca, text_cnn, text_lipschitz_conv

ARCHITECTURES: tuple[str, ...] = ("small_cnn", "resnet", "identity", "pca", "lipschitz_mlp", "lipschitz_conv",
                                  "text_bag_pca", "text_lipschitz_conv", "text_cnn", "text_bag_features")
#: Architectures whose Linear / Conv2d layers train as AOL layers (1-Lipschitz by construction).
LIPSCHITZ_ARCHITECTURES: tuple[str, ...] = ("lipschitz_mlp", "lipschitz_conv", "text_lipschitz_conv")
#: Architectures on text embedding matrices [embed_dim, 1, max_length] (robust_pretrain.text_encoders).
TEXT_ARCHITECTURES: tuple[str, ...] = ("text_bag_pca", "text_lipschitz_conv", "text_cnn", "text_bag_features")


@dataclass(frozen=True)
class EncoderConfig:
    """What ``build_encoder`` needs to rebuild an encoder; round-trips through JSON.

    * ``small_cnn``: two stride-2 4x4 convs (``widths[0]``, ``widths[1]`` channels) + ReLU, then
      Linear(-> ``hidden_dim``) + ReLU + Linear(-> ``feature_dim``). Small enough for CROWN on a CPU.
    * ``resnet``: 3x3 stem conv to ``widths[0]``; one stage per width, each ``blocks_per_stage`` residual
      blocks (conv-ReLU-conv + shortcut, then ReLU), stages after the first halve the resolution;
      global average pooling and Linear(-> ``feature_dim``). For 3x32x32 and 3x64x64 inputs.
    * ``identity``: Flatten (``feature_dim`` = C·H·W); ``pca``: Flatten + Linear with orthonormal rows.
    * ``lipschitz_mlp``: Linear -> MaxMin per hidden width in ``widths``, then Linear -> ``feature_dim``.
    * ``lipschitz_conv``: 3x3 conv -> MaxMin per stage width in ``widths``, stages joined by PixelUnshuffle(2),
      then Linear(-> ``hidden_dim``) -> MaxMin -> Linear(-> ``feature_dim``).
    * ``text_bag_pca``, ``text_lipschitz_conv`` (``widths``: its (1, 3) conv widths), ``text_cnn`` (the same
      with ReLU, unconstrained): text bodies on [embed_dim, 1, max_length], see ``text_encoders``.
    * ``text_bag_features``: a per-token (1x1) conv to ``widths[0]`` = ``feature_dim`` channels -> MaxMin ->
      mean pooling (random word features, fitted without training).
    """

    arch: str = "small_cnn"
    input_shape: tuple[int, int, int] = (1, 28, 28)
    feature_dim: int = 32
    widths: tuple[int, ...] = (16, 32)
    hidden_dim: int = 128
    blocks_per_stage: int = 1

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown arch {self.arch!r}; valid: {', '.join(ARCHITECTURES)}")
        # JSON gives lists; the frozen config keeps tuples so it stays hashable and comparable.
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if len(self.input_shape) != 3:
            raise ValueError(f"input_shape must be (C, H, W), got {self.input_shape}")
        if self.arch == "small_cnn" and len(self.widths) != 2:
            raise ValueError(f"small_cnn needs exactly 2 widths, got {self.widths}")
        channels, height, width = self.input_shape
        if self.arch == "identity" and self.feature_dim != channels * height * width:
            raise ValueError(f"identity needs feature_dim = C*H*W = {channels * height * width}")
        if self.arch in TEXT_ARCHITECTURES and height != 1:
            raise ValueError(f"{self.arch} reads embedding matrices (embed_dim, 1, max_length), got {self.input_shape}")
        if self.arch == "text_bag_pca" and not 0 < self.feature_dim <= channels:
            raise ValueError(f"text_bag_pca needs 0 < feature_dim <= embed_dim = {channels}")
        if self.arch == "text_bag_features" and (len(self.widths) != 1 or self.widths[0] % 2
                                                 or self.feature_dim != self.widths[0]):
            raise ValueError("text_bag_features needs one even width equal to feature_dim (MaxMin pairs channels), "
                             f"got widths {self.widths}, feature_dim {self.feature_dim}")
        if self.arch == "pca" and not 0 < self.feature_dim <= channels * height * width:
            raise ValueError(f"pca needs 0 < feature_dim <= C*H*W = {channels * height * width}")
        if self.arch in LIPSCHITZ_ARCHITECTURES:
            even = (*self.widths, self.hidden_dim) if self.arch == "lipschitz_conv" else self.widths
            if any(w <= 0 or w % 2 for w in even):
                raise ValueError(f"{self.arch} needs positive even widths (MaxMin pairs channels), got {even}")
        if self.arch == "lipschitz_conv":
            downsample = 2 ** (len(self.widths) - 1)
            if height % downsample or width % downsample:
                raise ValueError(f"lipschitz_conv with {len(self.widths)} stages needs H, W divisible by {downsample}")
        if self.arch == "resnet":
            downsample = 2 ** (len(self.widths) - 1)
            _, height, width = self.input_shape
            if height % downsample or width % downsample:
                raise ValueError(
                    f"resnet with {len(self.widths)} stages needs H, W divisible by {downsample}"
                )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EncoderConfig:
        return cls(**data)


def build_encoder(config: EncoderConfig, *, trainable: bool = False) -> nn.Module:
    """Fresh encoder for ``config``: images [batch, C, H, W] in [0, 1] -> features [batch, feature_dim].

    ``trainable``: for the Lipschitz architectures, AOL layers (train these, then ``bounds.materialize``);
    otherwise the plain layers a checkpoint loads into. Other architectures ignore it."""
    if config.arch == "small_cnn":
        return _small_cnn(config)
    if config.arch == "resnet":
        return _resnet(config)
    if config.arch == "identity":
        return identity_encoder()
    if config.arch == "pca":
        return pca_encoder(config.input_shape, config.feature_dim)
    if config.arch == "text_bag_pca":
        return text_bag_pca(config.input_shape, config.feature_dim)
    if config.arch == "text_lipschitz_conv":
        return text_lipschitz_conv(config.input_shape, config.widths, config.feature_dim, trainable=trainable)
    if config.arch == "text_bag_features":
        return text_bag_features(config.input_shape, config.widths[0])
    if config.arch == "text_cnn":
        return text_cnn(config.input_shape, config.widths, config.feature_dim)
    if config.arch == "lipschitz_mlp":
        return lipschitz_mlp(config.input_shape, config.widths, config.feature_dim, trainable=trainable)
    return lipschitz_conv(config.input_shape, config.widths, config.hidden_dim, config.feature_dim,
                          trainable=trainable)


def small_cnn_config(feature_dim: int = 32) -> EncoderConfig:
    """The demo encoder for 1x28x28 digits."""
    return EncoderConfig(arch="small_cnn", input_shape=(1, 28, 28), feature_dim=feature_dim)


def resnet_config(input_shape: tuple[int, int, int] = (3, 32, 32), feature_dim: int = 64) -> EncoderConfig:
    """A ResNet-style encoder for 3x32x32 (CIFAR-10, SVHN) or 3x64x64 (Tiny-ImageNet, resized STL-10)."""
    widths = (32, 64, 128) if input_shape[1] <= 32 else (32, 64, 128, 128)
    return EncoderConfig(
        arch="resnet", input_shape=input_shape, feature_dim=feature_dim, widths=widths, blocks_per_stage=1
    )


def _small_cnn(config: EncoderConfig) -> nn.Sequential:
    channels, height, width = config.input_shape
    w0, w1 = config.widths
    # 4x4 kernels with stride 2 and padding 1 halve H and W exactly (floor for odd sizes).
    out_h, out_w = height // 4, width // 4
    return nn.Sequential(
        nn.Conv2d(channels, w0, kernel_size=4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(w0, w1, kernel_size=4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(w1 * out_h * out_w, config.hidden_dim),
        nn.ReLU(),
        nn.Linear(config.hidden_dim, config.feature_dim),
    )


def _residual_block(in_width: int, out_width: int, stride: int) -> Residual:
    body = nn.Sequential(
        nn.Conv2d(in_width, out_width, 3, stride=stride, padding=1),
        nn.ReLU(),
        nn.Conv2d(out_width, out_width, 3, stride=1, padding=1),
    )
    # Without batch norm a deep sum of residuals explodes at init; start each body near zero
    # (Fixup-style) so every block starts close to its shortcut.
    with torch.no_grad():
        body[2].weight.mul_(0.1)
    shortcut = None
    if stride != 1 or in_width != out_width:
        shortcut = nn.Conv2d(in_width, out_width, 1, stride=stride)
    return Residual(body, shortcut)


def _resnet(config: EncoderConfig) -> nn.Sequential:
    channels, height, width = config.input_shape
    layers: list[nn.Module] = [nn.Conv2d(channels, config.widths[0], 3, padding=1), nn.ReLU()]
    in_width = config.widths[0]
    for stage, out_width in enumerate(config.widths):
        for block in range(config.blocks_per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            layers += [_residual_block(in_width, out_width, stride), nn.ReLU()]
            in_width = out_width
    downsample = 2 ** (len(config.widths) - 1)
    pool_h, pool_w = height // downsample, width // downsample
    layers += [
        nn.AvgPool2d(kernel_size=pool_h if pool_h == pool_w else (pool_h, pool_w)),
        nn.Flatten(),
        nn.Linear(in_width, config.feature_dim),
    ]
    return nn.Sequential(*layers)
