"""Text encoder bodies on embedding matrices [batch, embed_dim, 1, max_length], built from the bounds vocabulary.

A sequence is a one-row "image" with one channel per embedding coordinate, so a convolution with a (1, k) kernel
slides over positions (a 1-D convolution over tokens) and AvgPool2d((1, max_length)) is mean pooling.

* ``text_bag_pca`` (the floor): mean pooling, then an orthonormal projection on the top principal directions of
  the pooled provider texts. Mean pooling over L positions has l2 norm exactly 1/sqrt(L) (the all-equal direction),
  so the encoder's Lipschitz constant is exactly 1/sqrt(L) when it keeps every direction.
* ``text_lipschitz_conv``: per width in ``widths`` a (1, 3) convolution -> MaxMin, then mean pooling and a dense
  layer to ``feature_dim``. While training the convolutions are AOL (`AOLConvRow`) and the dense layer is
  spectrally normalised, so the body is (1/sqrt(L))-Lipschitz by construction; the checkpoint records the bound
  bounds/ recomputes with sound norms.
* ``text_bag_features``: a bag of nonlinear word features. One per-token (1x1) convolution from embed_dim to
  ``width`` channels with a bias, MaxMin, mean pooling; fitted without training (``fit_text_bag_features``): seeded Gaussian
  kernel divided by the sound operator-norm bound bounds/ computes for it, Gaussian bias. MaxMin on a pair is
  (a + b)/2 ± |a - b|/2, so each feature is a random |<v, e> + c| ridge of a token's embedding e (random features,
  Rahimi & Recht 2007) and the pooled vector is the text's mean of them: the linear head sees a kernel bag of words
  instead of a mean of 32 coordinates. Conv norm 1, MaxMin 1, mean pool 1/sqrt(L): L = 1/sqrt(max_length), the
  floor's constant; the bias moves no constant. Measured (benchmarks/results/text_encoders.md: 1 024 features,
  first 500 test reviews, linear margin head): 0.654 / ACR 0.025 at eps 0, 0.642 / 0.070 at eps 0.005, against the
  floor's 0.652 / 0.079 and 0.652 / 0.090: dominated on the frontier, so it is not a shipped kind. Max pooling over
  positions instead of the mean (1-Lipschitz, so L = 1) lifts the same 1 024 features to 0.702 clean at eps 0 on
  eigen_power-0 embeddings (0.686 at 0.5), but its ACR is 0.006 (0.020 at 0.678): the best accuracy point, not a
  robust one. bounds/ has no max-over-positions operator; building it from Conv2d + MaxMin needs channel pairs
  (c at position 2j, c at 2j + 1) that MaxMin's half-split pairing only gets from dense [2C, C] selection kernels.
* ``text_cnn``: the non-robust baseline, the same shape with plain convolutions and ReLU, no constraint.
"""

from __future__ import annotations

import torch
from torch import nn

from bounds.layers import MaxMin
from bounds.lipschitz_layers import AOLConv2d, SpectralNormLinear
from bounds.spectral import layer_product_lipschitz_upper
from robust_pretrain.lipschitz_encoders import fit_pca

TEXT_KERNEL = 3


class AOLConvRow(AOLConv2d):
    """An AOL convolution with a (1, k) kernel over a one-row input (a 1-D convolution over positions).

    The AOL rescaling (bounds.lipschitz_layers.aol_conv_scale) holds for any kernel shape, so the operator norm
    is <= 1 for any parameters; initialised at a Dirac kernel plus small noise, like AOLConv2d."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = TEXT_KERNEL) -> None:
        super().__init__(in_channels, out_channels, kernel_size)
        kernel = torch.zeros(out_channels, in_channels, 1, kernel_size)
        nn.init.dirac_(kernel)
        self.weight = nn.Parameter(kernel + 0.01 * torch.randn_like(kernel))
        self.padding = (0, kernel_size // 2)

    def materialize(self) -> nn.Conv2d:
        out_channels, in_channels, _, width = self.weight.shape
        layer = _row_conv(in_channels, out_channels, width)
        with torch.no_grad():
            layer.weight.copy_(self.rescaled_weight())
            layer.bias.copy_(self.bias)
        return layer


def _row_conv(in_channels: int, out_channels: int, kernel_size: int = TEXT_KERNEL) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, (1, kernel_size), padding=(0, kernel_size // 2))


def mean_pool(input_shape: tuple[int, int, int]) -> nn.Sequential:
    """[batch, C, 1, L] -> [batch, C]: the mean over positions (padding included)."""
    _, height, length = input_shape
    return nn.Sequential(nn.AvgPool2d((height, length)), nn.Flatten())


def text_bag_pca(input_shape: tuple[int, int, int], feature_dim: int) -> nn.Sequential:
    """The floor's architecture (weights from `fit_text_bag_pca`, or a checkpoint)."""
    return nn.Sequential(*mean_pool(input_shape), nn.Linear(input_shape[0], feature_dim))


def fit_text_bag_pca(matrices: torch.Tensor, feature_dim: int) -> nn.Sequential:
    """The floor fitted on embedding matrices [N, d, 1, L] of provider text: `fit_pca` of the mean-pooled
    embeddings behind the pooling, so the projection's rows are orthonormal and L = 1/sqrt(max_length)."""
    pool = mean_pool(tuple(matrices.shape[1:]))
    with torch.no_grad():
        pooled = pool(matrices)
    pca = fit_pca(pooled.reshape(len(pooled), -1, 1, 1), feature_dim)
    return nn.Sequential(*pool, pca[1])


def text_lipschitz_conv(input_shape: tuple[int, int, int], widths: tuple[int, ...], feature_dim: int,
                        *, trainable: bool = False) -> nn.Sequential:
    """The Lipschitz text body (module docstring); `trainable` gives AOL / spectral-norm layers, else plain."""
    layers: list[nn.Module] = []
    channels = input_shape[0]
    for width in widths:
        layers += [AOLConvRow(channels, width) if trainable else _row_conv(channels, width), MaxMin()]
        channels = width
    dense = SpectralNormLinear if trainable else nn.Linear
    return nn.Sequential(*layers, *mean_pool(input_shape), dense(channels, feature_dim))


def text_bag_features(input_shape: tuple[int, int, int], width: int) -> nn.Sequential:
    """[batch, d, 1, L] -> [batch, width]: per-token conv with bias -> MaxMin -> mean pooling (module docstring);
    weights from `fit_text_bag_features` or a checkpoint."""
    return nn.Sequential(_row_conv(input_shape[0], width, 1), MaxMin(), *mean_pool(input_shape))


def fit_text_bag_features(input_shape: tuple[int, int, int], width: int, *, bias_scale: float = 1.0, seed: int = 0) -> nn.Sequential:
    """`text_bag_features` at a seeded random point, no data read: kernel N(0, 1) divided by the sound l2 operator
    norm bound of the conv on this input shape (bounds.spectral.layer_product_lipschitz_upper, so the conv's recorded norm is
    <= 1 up to rounding), bias N(0, (bias_scale · mean output-row norm)^2) so the ridges cut through the cloud of
    unit-norm embeddings rather than all pass through 0. Guarantee: Lipschitz <= 1/sqrt(max_length), any seed."""
    model = text_bag_features(input_shape, width)
    conv = model[0]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
        conv.weight.div_(layer_product_lipschitz_upper(nn.Sequential(conv), input_shape))
        row_norm = float(conv.weight.flatten(1).norm(dim=1).mean())
        conv.bias.copy_(bias_scale * row_norm * torch.randn(width, generator=generator))
    return model.eval()


def text_cnn(input_shape: tuple[int, int, int], widths: tuple[int, ...], feature_dim: int) -> nn.Sequential:
    """The non-robust baseline: plain (1, 3) convolutions + ReLU, mean pooling, a dense layer; no constraint."""
    layers: list[nn.Module] = []
    channels = input_shape[0]
    for width in widths:
        layers += [_row_conv(channels, width), nn.ReLU()]
        channels = width
    return nn.Sequential(*layers, *mean_pool(input_shape), nn.Linear(channels, feature_dim))
