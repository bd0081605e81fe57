"""Layers that are 1-Lipschitz by construction while they train, and become plain vocabulary layers to serve.

AOL (almost-orthogonal layers, Prach & Lampert, ECCV 2022): for a weight W, rescale its columns by
d_j = (sum_k |W^T W|_jk)^(-1/2). Then ||W diag(d)||_2 <= 1: diag(d) W^T W diag(d) has row sums of absolute
values <= 1 (Gershgorin / Schur test), so its largest eigenvalue is <= 1. For a convolution the same holds with
the Gram operator's kernel (the kernel convolved with itself): the rescaled full convolution has norm <= 1, and a
zero-padded or strided convolution is a restriction / subsampling of it, which cannot raise the norm.

Spectral normalisation with the exact norm (`SpectralNormLinear`): W / ||W||_2, the largest singular value
computed by an SVD in every forward pass (cheap for dense layers of a few hundred units). Unlike AOL it keeps a
narrowing layer (e.g. 512 -> 64) at norm exactly 1 and can represent any orthonormal set of rows, PCA included;
AOL's Gershgorin rescaling of such a layer shrinks it by about sqrt(out / in).

`materialize()` returns the rescaled layer as a plain nn.Linear / nn.Conv2d. That is what checkpoints store and
the server runs, and bounds/ recomputes its spectral norm soundly: the AOL argument is a training device, never
the number a certificate uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_EPS = 1e-12


def aol_scale(weight: torch.Tensor) -> torch.Tensor:
    """The AOL column scaling d [in] of a dense weight [out, in]."""
    gram = (weight.T @ weight).abs()
    return gram.sum(dim=1).clamp(min=_EPS).rsqrt()


def aol_conv_scale(kernel: torch.Tensor) -> torch.Tensor:
    """The AOL input-channel scaling d [in] of a conv kernel [out, in, kh, kw] (groups = 1)."""
    kh, kw = kernel.shape[2:]
    transposed = kernel.transpose(0, 1)  # [in, out, kh, kw]: the Gram kernel is this convolved with itself
    gram = F.conv2d(transposed, transposed, padding=(kh - 1, kw - 1))  # [in, in, 2kh - 1, 2kw - 1]
    return gram.abs().sum(dim=(1, 2, 3)).clamp(min=_EPS).rsqrt()


class _RescaledLinear(nn.Module):
    """A dense layer `x -> rescaled(W) x + b`; subclasses define `rescaled_weight`, whose norm is <= 1.

    Starts at an orthogonal W (an isometry onto its image) unless a weight [out, in] is given."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 weight: torch.Tensor | None = None) -> None:
        super().__init__()
        if weight is None:
            weight = torch.empty(out_features, in_features)
            nn.init.orthogonal_(weight)
        self.weight = nn.Parameter(weight.detach().clone().to(torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def rescaled_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.rescaled_weight(), self.bias)

    def materialize(self) -> nn.Linear:
        out_features, in_features = self.weight.shape
        layer = nn.Linear(in_features, out_features, bias=self.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(self.rescaled_weight())
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer


class AOLLinear(_RescaledLinear):
    """A dense layer `x -> W diag(d) x + b` with ||W diag(d)||_2 <= 1 for any W (see the module docstring)."""

    def rescaled_weight(self) -> torch.Tensor:
        return self.weight * aol_scale(self.weight)


class AOLConv2d(nn.Module):
    """A zero-padded convolution with the AOL input-channel rescaling: operator norm <= 1 for any kernel.

    Initialised at a Dirac (identity) kernel on the first min(in, out) channels plus small noise, the usual start
    for gradient-norm-preserving convnets."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, stride: int = 1,
                 bias: bool = True) -> None:
        super().__init__()
        kernel = torch.zeros(out_channels, in_channels, kernel_size, kernel_size)
        nn.init.dirac_(kernel)
        kernel += 0.01 * torch.randn_like(kernel)
        self.weight = nn.Parameter(kernel)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.stride = stride
        self.padding = kernel_size // 2

    def rescaled_weight(self) -> torch.Tensor:
        return self.weight * aol_conv_scale(self.weight).reshape(1, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.rescaled_weight(), self.bias, self.stride, self.padding)

    def materialize(self) -> nn.Conv2d:
        out_channels, in_channels, kh, _ = self.weight.shape
        layer = nn.Conv2d(in_channels, out_channels, kh, stride=self.stride, padding=self.padding,
                          bias=self.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(self.rescaled_weight())
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer


class SpectralNormLinear(_RescaledLinear):
    """A dense layer `x -> (W / s) x + b` with s = ||W||_2, so its operator norm is 1 for any W != 0.

    While training, s is Miyato et al.'s one power-iteration step per forward on persisted vectors (a lower
    estimate of ||W||_2, so the layer's norm may exceed 1 by the estimate's error while it trains); the SVD's
    gradient is unstable where singular values repeat, as they do at an orthogonal init. In eval mode, and so in
    `materialize`, s is the exact float64 norm: the served layer's norm is 1 up to rounding, and bounds/
    recomputes it soundly."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 weight: torch.Tensor | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, weight=weight)
        vector = torch.randn(in_features, generator=torch.Generator().manual_seed(in_features * 7919 + out_features))
        self.register_buffer("right_vector", vector / vector.norm())

    def rescaled_weight(self) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                left = F.normalize(self.weight @ self.right_vector, dim=0)
                self.right_vector.copy_(F.normalize(self.weight.T @ left, dim=0))
            norm = (self.weight @ self.right_vector).norm()
        else:
            norm = torch.linalg.matrix_norm(self.weight.detach().to(torch.float64), ord=2).to(self.weight.dtype)
        return self.weight / norm.clamp(min=_EPS)

    def materialize(self) -> nn.Linear:
        was_training = self.training
        self.eval()  # the exact norm
        try:
            return super().materialize()
        finally:
            self.train(was_training)


_TRAINABLE = (AOLLinear, AOLConv2d, SpectralNormLinear)


def materialize(model: nn.Module) -> nn.Module:
    """A copy of `model` with every Lipschitz training layer replaced by its plain vocabulary layer (eval mode,
    same function)."""
    if isinstance(model, _TRAINABLE):
        return model.materialize().eval()
    if isinstance(model, nn.Sequential):
        return nn.Sequential(*(materialize(child) for child in model)).eval()
    if any(isinstance(m, _TRAINABLE) for m in model.modules()):
        raise TypeError(f"materialize handles AOL layers inside nn.Sequential, not inside {type(model).__name__}")
    return model
