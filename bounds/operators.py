"""One class per layer kind behind one protocol (auto_LiRPA's operator design, for a fixed layer set).

Every operator maps per-example tensors `[batch, *in_shape] -> [batch, *out_shape]` and offers:

* `forward(*inputs)`: the exact computation;
* `interval(*boxes)`: interval bound propagation (IBP), `Box` in, sound `Box` out;
* `backward(lA, uA, boxes)`: one CROWN step. Given linear coefficients on the output (`[batch, spec, *out]`, for
  a lower bound `lA` and an upper bound `uA`, either may be None) and the input boxes, return coefficients on each
  input and the constant picked up, such that `lA·y >= lA_in·x + lbias` and `uA·y <= uA_in·x + ubias` whenever the
  inputs lie in their boxes;
* `jacobian_backward(center, radius, boxes)`: push an interval matrix `[center ± radius]` (`[batch, spec, *out]`)
  containing every Clarke Jacobian of the layers above back through this layer (interval arithmetic).

Linear layers (Linear, Conv2d, AvgPool2d as a depthwise conv, BatchNorm as a per-channel affine map, Flatten)
share `AffineOperator`, which derives everything from `linear` / `vjp` and their absolute-weight versions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Box:
    """Elementwise bounds `lower <= value <= upper`, both `[batch, *shape]`."""

    lower: torch.Tensor
    upper: torch.Tensor

    @property
    def center(self) -> torch.Tensor:
        return (self.upper + self.lower) / 2

    @property
    def radius(self) -> torch.Tensor:
        return (self.upper - self.lower) / 2

    @property
    def crosses_zero(self) -> torch.Tensor:
        """Where lower < 0 < upper: the ReLU inputs that are unstable on the set the box describes."""
        return (self.lower < 0) & (self.upper > 0)


Coefficients = tuple[torch.Tensor | None, torch.Tensor | None]


def _flat(a: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """[batch, spec, *shape] -> [batch * spec, *shape]."""
    return a.reshape(-1, *shape)


class Operator:
    """Base class; see the module docstring for the contract."""

    in_shapes: tuple[tuple[int, ...], ...]
    out_shape: tuple[int, ...]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def interval(self, *boxes: Box) -> Box:
        raise NotImplementedError

    def backward(
        self, lA: torch.Tensor | None, uA: torch.Tensor | None, boxes: tuple[Box, ...]
    ) -> tuple[list[Coefficients], torch.Tensor | float, torch.Tensor | float]:
        raise NotImplementedError

    def jacobian_backward(
        self, center: torch.Tensor, radius: torch.Tensor, boxes: tuple[Box, ...]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError


class AffineOperator(Operator):
    """`y = linear(x) + bias` for a linear map given by subclasses (`linear`, `vjp` and `abs_*` versions)."""

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def abs_linear(self, x: torch.Tensor) -> torch.Tensor:
        """The map with every weight replaced by its absolute value."""
        raise NotImplementedError

    def square_linear(self, x: torch.Tensor) -> torch.Tensor:
        """The map with every weight squared: applied to ones it gives each output's squared row norm."""
        raise NotImplementedError

    def vjp(self, a: torch.Tensor) -> torch.Tensor:
        """`a @ W` for `a` [n, *out_shape] -> [n, *in_shape] (the transpose of `linear`)."""
        raise NotImplementedError

    def abs_vjp(self, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def bias_dot(self, a: torch.Tensor) -> torch.Tensor | float:
        """`a · bias` for `a` [batch, spec, *out_shape] -> [batch, spec] (0.0 when there is no bias)."""
        raise NotImplementedError

    def add_bias(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_bias(self.linear(x))

    def interval(self, box: Box) -> Box:
        center = self.forward(box.center)
        radius = self.abs_linear(box.radius)
        return Box(center - radius, center + radius)

    def ball_interval(self, center: torch.Tensor, radius: torch.Tensor, norm: str) -> Box:
        """Exact elementwise bounds of this layer's output over a norm ball `||x - center|| <= radius[b]`."""
        out = self.forward(center)
        ones = torch.ones_like(center[:1])
        # the dual norm of each row: l2 for an l2 ball, l1 for an linf ball
        row_norm = torch.sqrt(self.square_linear(ones)) if norm == "l2" else self.abs_linear(ones)
        spread = row_norm * radius.reshape((-1,) + (1,) * (out.dim() - 1))
        return Box(out - spread, out + spread)

    def _pull(self, a: torch.Tensor | None) -> torch.Tensor | None:
        if a is None:
            return None
        batch, spec = a.shape[:2]
        return self.vjp(_flat(a, self.out_shape)).reshape(batch, spec, *self.in_shapes[0])

    def backward(self, lA, uA, boxes):
        lbias = self.bias_dot(lA) if lA is not None else 0.0
        ubias = self.bias_dot(uA) if uA is not None else 0.0
        return [(self._pull(lA), self._pull(uA))], lbias, ubias

    def jacobian_backward(self, center, radius, boxes):
        batch, spec = center.shape[:2]
        new_center = self.vjp(_flat(center, self.out_shape)).reshape(batch, spec, *self.in_shapes[0])
        new_radius = self.abs_vjp(_flat(radius, self.out_shape)).reshape(batch, spec, *self.in_shapes[0])
        return [(new_center, new_radius)]


class LinearOperator(AffineOperator):
    """nn.Linear on per-example vectors: `weight` [out, in], `bias` [out] or None."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight = weight
        self.bias = bias
        self.in_shapes = ((weight.shape[1],),)
        self.out_shape = (weight.shape[0],)
        self._abs = weight.abs()
        self._square = weight * weight

    def linear(self, x):
        return x @ self.weight.T

    def abs_linear(self, x):
        return x @ self._abs.T

    def square_linear(self, x):
        return x @ self._square.T

    def vjp(self, a):
        return a @ self.weight

    def abs_vjp(self, a):
        return a @ self._abs

    def bias_dot(self, a):
        return 0.0 if self.bias is None else a @ self.bias

    def add_bias(self, y):
        return y if self.bias is None else y + self.bias


class ConvOperator(AffineOperator):
    """Zero-padded nn.Conv2d (also AvgPool2d and BatchNorm2d, written as convs): `weight` [out, in/groups, kh, kw]."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
        in_shape: tuple[int, int, int],
        out_shape: tuple[int, int, int],
    ) -> None:
        self.weight = weight
        self.bias = bias
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.in_shapes = (in_shape,)
        self.out_shape = out_shape
        self._abs = weight.abs()
        self._square = weight * weight
        kernel = weight.shape[2:]
        # conv_transpose2d needs the rows/cols that the forward stride dropped to come back as zeros.
        self.output_padding = tuple(
            in_shape[1 + i]
            - ((out_shape[1 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel[i] - 1) + 1)
            for i in range(2)
        )

    def _conv(self, x, weight):
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def _conv_t(self, a, weight):
        return F.conv_transpose2d(
            a, weight, None, self.stride, self.padding, self.output_padding, self.groups, self.dilation
        )

    def linear(self, x):
        return self._conv(x, self.weight)

    def abs_linear(self, x):
        return self._conv(x, self._abs)

    def square_linear(self, x):
        return self._conv(x, self._square)

    def vjp(self, a):
        return self._conv_t(a, self.weight)

    def abs_vjp(self, a):
        return self._conv_t(a, self._abs)

    def bias_dot(self, a):
        return 0.0 if self.bias is None else a.sum(dim=(-1, -2)) @ self.bias

    def add_bias(self, y):
        return y if self.bias is None else y + self.bias.reshape(-1, 1, 1)


class FlattenOperator(AffineOperator):
    """nn.Flatten(start_dim=1): a reshape, so an isometry."""

    def __init__(self, in_shape: tuple[int, ...]) -> None:
        self.in_shapes = (in_shape,)
        self.out_shape = (int(torch.tensor(in_shape).prod()),)

    def linear(self, x):
        return x.reshape(x.shape[0], -1)

    abs_linear = linear
    square_linear = linear

    def vjp(self, a):
        return a.reshape(a.shape[0], *self.in_shapes[0])

    abs_vjp = vjp

    def bias_dot(self, a):
        return 0.0

    def add_bias(self, y):
        return y


class ReLUOperator(Operator):
    """ReLU with CROWN's relaxation: for an unstable neuron (l < 0 < u) the upper line through (l, 0) and (u, u),
    and the adaptive lower line `alpha·z` with alpha = 1 if u >= -l else 0 (the smaller-area choice). A neuron with
    l >= 0 is the identity and one with u <= 0 is zero on the whole input set, exactly."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.in_shapes = (shape,)
        self.out_shape = shape

    def forward(self, x):
        return torch.relu(x)

    def interval(self, box):
        return Box(torch.relu(box.lower), torch.relu(box.upper))

    @staticmethod
    def relaxation(box: Box) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(lower_slope, upper_slope, upper_intercept)`, each [batch, *shape]:
        lower_slope·z <= relu(z) <= upper_slope·z + upper_intercept for l <= z <= u."""
        lower, upper = box.lower, box.upper
        active = lower >= 0
        unstable = box.crosses_zero
        width = torch.where(unstable, upper - lower, torch.ones_like(upper))
        upper_slope = torch.where(unstable, upper / width, active.to(upper.dtype))
        upper_intercept = torch.where(unstable, -upper_slope * lower, torch.zeros_like(upper))
        lower_slope = torch.where(unstable, (upper >= -lower).to(upper.dtype), active.to(upper.dtype))
        return lower_slope, upper_slope, upper_intercept

    def backward(self, lA, uA, boxes):
        lower_slope, upper_slope, upper_intercept = (t.unsqueeze(1) for t in self.relaxation(boxes[0]))
        lbias: torch.Tensor | float = 0.0
        ubias: torch.Tensor | float = 0.0
        lA_in = uA_in = None
        dims = tuple(range(2, 2 + len(self.out_shape)))
        if lA is not None:
            pos, neg = lA.clamp(min=0), lA.clamp(max=0)
            lA_in = pos * lower_slope + neg * upper_slope
            lbias = (neg * upper_intercept).sum(dim=dims)
        if uA is not None:
            pos, neg = uA.clamp(min=0), uA.clamp(max=0)
            uA_in = pos * upper_slope + neg * lower_slope
            ubias = (pos * upper_intercept).sum(dim=dims)
        return [(lA_in, uA_in)], lbias, ubias

    @staticmethod
    def slope_range(box: Box) -> tuple[torch.Tensor, torch.Tensor]:
        """The interval [lo, hi] holding every Clarke derivative of relu on [l, u]."""
        lower, upper = box.lower, box.upper
        hi = (upper > 0).to(upper.dtype)
        lo = (lower >= 0).to(upper.dtype)
        return lo, hi

    def jacobian_backward(self, center, radius, boxes):
        lo, hi = (t.unsqueeze(1) for t in self.slope_range(boxes[0]))
        low, high = center - radius, center + radius
        # a slope d in [lo, hi] scales each entry in [low, high]; the extremes sit at the corners.
        new_low = torch.minimum(low * lo, low * hi)
        new_high = torch.maximum(high * lo, high * hi)
        return [((new_high + new_low) / 2, (new_high - new_low) / 2)]


class AddOperator(Operator):
    """`y = a + b` (the join of a Residual)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.in_shapes = (shape, shape)
        self.out_shape = shape

    def forward(self, a, b):
        return a + b

    def interval(self, a, b):
        return Box(a.lower + b.lower, a.upper + b.upper)

    def backward(self, lA, uA, boxes):
        return [(lA, uA), (lA, uA)], 0.0, 0.0

    def jacobian_backward(self, center, radius, boxes):
        return [(center, radius), (center, radius)]
