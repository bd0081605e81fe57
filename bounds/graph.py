"""Trace a model built from the bounds vocabulary into a small DAG of operators (topologically ordered)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bounds.batchnorm import batchnorm_scale_shift
from bounds.layers import MaxMin, Residual, UnsupportedLayerError, require_ieee_float32
from bounds.operators import (
    AddOperator,
    AffineOperator,
    ConvOperator,
    FlattenOperator,
    LinearOperator,
    MaxMinOperator,
    Operator,
    PixelUnshuffleOperator,
    ReLUOperator,
)


@dataclass(frozen=True)
class Node:
    """`op` applied to the outputs of the nodes `inputs` (node 0 is the model input, with `op` None)."""

    op: Operator | None
    inputs: tuple[int, ...]
    shape: tuple[int, ...]


class BoundGraph:
    """The model as a list of nodes in topological order; the last node is the output.

    Weights are detached copies in `dtype` on `device`, so bounding never touches autograd or the model.
    """

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.nodes[0].shape

    @property
    def output_index(self) -> int:
        return len(self.nodes) - 1

    def consumers(self) -> dict[int, list[int]]:
        users: dict[int, list[int]] = {i: [] for i in range(len(self.nodes))}
        for i, node in enumerate(self.nodes):
            for j in node.inputs:
                users[j].append(i)
        return users

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every node's value for `x` [batch, *input_shape]."""
        values = [x]
        for node in self.nodes[1:]:
            values.append(node.op.forward(*(values[j] for j in node.inputs)))
        return values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)[-1]

    def max_numel(self) -> int:
        return max(int(torch.tensor(n.shape).prod()) for n in self.nodes)


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding_mode != "zeros":
        raise UnsupportedLayerError(f"Conv2d with padding_mode={conv.padding_mode!r} (only 'zeros' is supported)")
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        reach = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        if any(r % 2 for r in reach):
            raise UnsupportedLayerError("Conv2d with asymmetric 'same' padding")
        return (reach[0] // 2, reach[1] // 2)
    return _pair(conv.padding)


class _Tracer:
    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        self.nodes: list[Node] = []

    def tensor(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().to(device=self.device, dtype=self.dtype)

    def add(self, op: Operator, inputs: tuple[int, ...]) -> int:
        self.nodes.append(Node(op, inputs, op.out_shape))
        return len(self.nodes) - 1

    def conv(self, weight, bias, src, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1) -> int:
        in_shape = self.nodes[src].shape
        if len(in_shape) != 3:
            raise UnsupportedLayerError(f"a 2-D convolution / pooling on an input of shape {in_shape}")
        probe = torch.nn.functional.conv2d(
            torch.zeros(1, *in_shape, dtype=self.dtype, device=self.device), weight, None, stride, padding,
            dilation, groups,
        )
        op = ConvOperator(
            weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups, in_shape=in_shape,
            out_shape=tuple(probe.shape[1:]),
        )
        return self.add(op, (src,))

    def trace(self, module: nn.Module, src: int) -> int:
        shape = self.nodes[src].shape
        if isinstance(module, nn.Sequential):
            for child in module:
                src = self.trace(child, src)
            return src
        if isinstance(module, nn.Identity):
            return src
        if isinstance(module, Residual):
            body = self.trace(module.body, src)
            shortcut = src if module.shortcut is None else self.trace(module.shortcut, src)
            if self.nodes[body].shape != self.nodes[shortcut].shape:
                raise UnsupportedLayerError(
                    f"Residual whose body {self.nodes[body].shape} and shortcut {self.nodes[shortcut].shape} differ"
                )
            return self.add(AddOperator(self.nodes[body].shape), (body, shortcut))
        if isinstance(module, nn.ReLU):
            return self.add(ReLUOperator(shape), (src,))
        if isinstance(module, MaxMin):
            if shape[0] % 2:
                raise UnsupportedLayerError(f"MaxMin on an odd number of channels ({shape})")
            return self.add(MaxMinOperator(shape), (src,))
        if isinstance(module, nn.PixelUnshuffle):
            factor = int(module.downscale_factor)
            if len(shape) != 3 or shape[1] % factor or shape[2] % factor:
                raise UnsupportedLayerError(f"PixelUnshuffle({factor}) on a per-example input of shape {shape}")
            return self.add(PixelUnshuffleOperator(factor, shape), (src,))
        if isinstance(module, nn.Flatten):
            if module.start_dim != 1 or module.end_dim != -1:
                raise UnsupportedLayerError("Flatten other than Flatten(start_dim=1, end_dim=-1)")
            return self.add(FlattenOperator(shape), (src,))
        if isinstance(module, nn.Linear):
            if shape != (module.in_features,):
                raise UnsupportedLayerError(f"Linear({module.in_features}) on a per-example input of shape {shape}")
            return self.add(LinearOperator(self.tensor(module.weight), self.tensor(module.bias)), (src,))
        if isinstance(module, nn.Conv2d):
            return self.conv(
                self.tensor(module.weight), self.tensor(module.bias), src, stride=_pair(module.stride),
                padding=_conv_padding(module), dilation=_pair(module.dilation), groups=module.groups,
            )
        if isinstance(module, nn.AvgPool2d):
            if module.ceil_mode or module.divisor_override is not None:
                raise UnsupportedLayerError("AvgPool2d with ceil_mode=True or divisor_override")
            padding = _pair(module.padding)
            if padding != (0, 0) and not module.count_include_pad:
                raise UnsupportedLayerError("AvgPool2d with padding and count_include_pad=False")
            kernel = _pair(module.kernel_size)
            stride = _pair(module.stride if module.stride is not None else module.kernel_size)
            channels = shape[0]
            weight = torch.full((channels, 1, *kernel), 1.0 / (kernel[0] * kernel[1]), dtype=self.dtype,
                                device=self.device)
            return self.conv(weight, None, src, stride=stride, padding=padding, groups=channels)
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            scale, shift = batchnorm_scale_shift(module)
            scale, shift = self.tensor(scale), self.tensor(shift)
            if len(shape) == 1:
                return self.add(LinearOperator(torch.diag(scale), shift), (src,))
            return self.conv(scale.reshape(-1, 1, 1, 1), shift, src, groups=shape[0])
        raise UnsupportedLayerError(
            f"{type(module).__name__} is outside the bounds vocabulary (Sequential, Linear, Conv2d, ReLU, MaxMin, "
            "Flatten, AvgPool2d, PixelUnshuffle, Identity, BatchNorm1d/2d, Residual)"
        )


def build_graph(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> BoundGraph:
    """Trace `model` (per-example input shape `input_shape`) into a BoundGraph; raises UnsupportedLayerError.
    A graph on CUDA turns TensorFloat-32 off (bounds.layers.require_ieee_float32): its bounds need IEEE float32."""
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    require_ieee_float32(device)
    tracer = _Tracer(dtype, torch.device(device))
    tracer.nodes.append(Node(None, (), tuple(int(s) for s in input_shape)))
    tracer.trace(model, 0)
    return BoundGraph(tracer.nodes)


def affine_operators(graph: BoundGraph) -> list[AffineOperator]:
    return [n.op for n in graph.nodes if isinstance(n.op, AffineOperator)]
