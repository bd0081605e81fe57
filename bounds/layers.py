"""The bound-friendly layer vocabulary's custom modules, and the error for everything outside it."""

from __future__ import annotations

import torch
from torch import nn


class UnsupportedLayerError(TypeError):
    """A module outside the vocabulary that bounds/ can propagate bounds through.

    The vocabulary: nn.Sequential, nn.Linear, nn.Conv2d (zero padding, any stride/dilation/groups), nn.ReLU,
    nn.Flatten, nn.AvgPool2d (floor mode), nn.PixelUnshuffle, nn.Identity, nn.BatchNorm1d/2d (eval-mode
    statistics), Residual, MaxMin.
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


class MaxMin(nn.Module):
    """MaxMin (GroupSort of group size 2, Anil et al. 2019): the channels split into halves a, b (dim 1) and
    `y = cat(max(a, b), min(a, b))`.

    Why it is the activation of our Lipschitz encoders: on each pair it is a permutation of its inputs, so it is
    1-Lipschitz in l2 *and* keeps the norm of every gradient (a ReLU halves it on average), and every Clarke
    Jacobian is block-diagonal with 2x2 blocks [[t, 1 - t], [1 - t, t]], t in [0, 1]. Works on [batch, C] and
    [batch, C, H, W]; C must be even.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] % 2:
            raise ValueError(f"MaxMin needs an even number of channels, got {x.shape[1]}")
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


def module_device(module: nn.Module, default: torch.device | str = "cpu") -> torch.device:
    """The device of `module`'s first parameter or buffer, `default` for a module with neither (e.g. the
    identity encoder, a bare Flatten)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device(default)


def require_ieee_float32(device: torch.device | str) -> None:
    """Turn TensorFloat-32 off, process-wide, when `device` is a CUDA device (a no-op elsewhere).

    Every rounding allowance in bounds/ (bounds.f2i.SAFETY_MARGIN = 1e-4 on the final radius) covers IEEE float32
    (~1e-6 relative); TF32 keeps 10 mantissa bits (~1e-3), and cuDNN uses it for float32 convolutions by default,
    so a bound computed with it could undercut the true distance by more than the margin. Set through the legacy
    flags, which keep cuDNN's convolution and RNN settings consistent (mixing them with the per-operator
    `fp32_precision` API makes later reads of the legacy flags raise)."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


class ClassMax(nn.Module):
    """Per-class maximum of piece scores: [batch, classes * pieces] -> [batch, classes], class k the max of columns
    k * pieces ... (k + 1) * pieces - 1.

    After an nn.Linear it makes a max-affine classifier h_k(z) = max_p (w_kp · z + b_kp), whose decision regions
    are polyhedra: bounds.max_affine certifies it exactly (a nearest-prototype classifier is one). Bound
    propagation does not take it (bounds.build_graph raises UnsupportedLayerError); nothing needs it to.
    """

    def __init__(self, pieces: int) -> None:
        super().__init__()
        if pieces < 1:
            raise ValueError(f"ClassMax needs >= 1 piece per class, got {pieces}")
        self.pieces = pieces

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] % self.pieces:
            raise ValueError(f"ClassMax({self.pieces}) needs [batch, classes * {self.pieces}], got {tuple(x.shape)}")
        return x.view(x.shape[0], -1, self.pieces).amax(dim=2)

    def extra_repr(self) -> str:
        return f"pieces={self.pieces}"
