"""The differentiable spectral-norm product prod_j ||T_j||_s of an encoder, for the *training* loss.

Each Conv2d / Linear keeps a persisted power-iteration vector (a buffer, so it is checkpointed and one
iteration per step suffices, as in Miyato et al.'s spectral normalisation). Convolutions are treated as the
linear operator they are on their actual input size: the iteration alternates ``conv2d`` and
``conv_transpose2d``, so the estimate is of the true operator norm, not of the reshaped kernel. The
estimate is a *lower* bound of each norm and is only used to steer training; any number a certificate
relies on comes from ``bounds.global_lipschitz_upper``.

Structure follows the bounds package: a Sequential multiplies, a ``Residual`` contributes
``||shortcut|| + prod(body)`` (``1 + prod(body)`` for the identity), ReLU and Flatten are 1-Lipschitz, and
average pooling contributes its exact constant.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bounds import Residual


class SpectralNormProduct(nn.Module):
    """Holds the power-iteration vectors for ``encoder``; ``forward(encoder)`` returns the product.

    ``input_shape`` (C, H, W) fixes each conv's input size. The encoder is passed at call time, not
    stored, so its parameters are not registered twice (MoCo's query encoder is the one to pass).
    """

    def __init__(
        self,
        encoder: nn.Module,
        input_shape: tuple[int, int, int],
        power_iterations: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.power_iterations = power_iterations
        self._conv_input_hw: dict[str, tuple[int, int]] = {}
        shapes = _layer_input_shapes(encoder, input_shape)
        for name, module in encoder.named_modules():
            if isinstance(module, nn.Linear):
                vector = torch.randn(module.in_features, generator=generator)
            elif isinstance(module, nn.Conv2d):
                self._conv_input_hw[name] = shapes[name][-2:]
                vector = torch.randn(1, *shapes[name], generator=generator)
            else:
                continue
            self.register_buffer(_buffer_name(name), vector / vector.norm())

    def forward(self, encoder: nn.Module) -> torch.Tensor:
        """Scalar tensor prod_j ||T_j||_s (power-iteration estimates), differentiable in the weights."""
        return torch.as_tensor(self._product(encoder, ""))

    def _product(self, module: nn.Module, name: str) -> torch.Tensor | float:
        if isinstance(module, nn.Sequential):
            product: torch.Tensor | float = 1.0
            for child_name, child in module.named_children():
                product = product * self._product(child, _join(name, child_name))
            return product
        if isinstance(module, Residual):
            body = self._product(module.body, _join(name, "body"))
            if module.shortcut is None:
                return 1.0 + body
            return self._product(module.shortcut, _join(name, "shortcut")) + body
        if isinstance(module, nn.Linear | nn.Conv2d):
            return self._layer_norm(module, name)
        if isinstance(module, nn.ReLU | nn.Flatten):
            return 1.0
        if isinstance(module, nn.AvgPool2d):
            return average_pool_norm(module)
        raise TypeError(f"no spectral norm for layer {name or 'encoder'} of type {type(module).__name__}")

    def _layer_norm(self, layer: nn.Linear | nn.Conv2d, name: str) -> torch.Tensor:
        vector = getattr(self, _buffer_name(name))
        if isinstance(layer, nn.Linear):
            forward, adjoint = (lambda x: x @ layer.weight.T), (lambda y: y @ layer.weight)
        else:
            forward, adjoint = _conv_operator(layer, self._conv_input_hw[name])
        with torch.no_grad():
            for _ in range(self.power_iterations):
                image = forward(vector)
                vector = adjoint(image / image.norm())
                vector = vector / vector.norm()
            getattr(self, _buffer_name(name)).copy_(vector)
        # ||T v|| for the converged unit v estimates ||T||_s and carries the gradient to the weights.
        return forward(vector).norm()


def average_pool_norm(pool: nn.AvgPool2d) -> float:
    """Upper bound of ||AvgPool||_2 from sqrt(||A||_1 ||A||_inf); exact when kernel == stride."""
    kernel = _pair(pool.kernel_size)
    stride = _pair(pool.stride if pool.stride is not None else pool.kernel_size)
    overlap = math.ceil(kernel[0] / stride[0]) * math.ceil(kernel[1] / stride[1])
    return math.sqrt(overlap / (kernel[0] * kernel[1]))


def _conv_operator(conv: nn.Conv2d, input_hw: tuple[int, int]):
    """(x -> conv x without bias, y -> conv^T y) on inputs [1, C_in, H, W]."""
    stride, padding, dilation = _pair(conv.stride), _pair(conv.padding), _pair(conv.dilation)
    kernel = conv.weight.shape[-2:]

    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, conv.weight, None, stride, padding, dilation, conv.groups)

    def adjoint(y: torch.Tensor) -> torch.Tensor:
        # output_padding recovers the input size that the strided conv rounded away.
        output_padding = tuple(
            input_hw[i]
            - ((y.shape[-2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel[i] - 1) + 1)
            for i in range(2)
        )
        return F.conv_transpose2d(
            y, conv.weight, None, stride, padding, output_padding, conv.groups, dilation
        )

    return forward, adjoint


def _layer_input_shapes(encoder: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            shapes[name] = tuple(args[0].shape[1:])

        return hook

    hooks = [
        module.register_forward_pre_hook(record(name))
        for name, module in encoder.named_modules()
        if isinstance(module, nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            parameter = next(encoder.parameters())
            encoder(torch.zeros(1, *input_shape, device=parameter.device, dtype=parameter.dtype))
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _buffer_name(module_name: str) -> str:
    return "power_vector__" + module_name.replace(".", "__")
