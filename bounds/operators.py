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

Linear layers (Linear, Conv2d, AvgPool2d as a depthwise conv, BatchNorm as a per-channel affine map, Flatten,
PixelUnshuffle) share `AffineOperator`, which derives everything from `linear` / `vjp` and their absolute-weight
versions. The activations (`is_activation`: ReLU, MaxMin) are the only nonlinear layers; both are 1-Lipschitz, and
everything that needs intermediate bounds needs them exactly at the activations' inputs.

MaxMin on a pair (a, b): max(a, b) = b + relu(a - b) and min(a, b) = a - relu(a - b), so with output
coefficients A1 (max half) and A2 (min half), A·y = A2·a + A1·b + (A1 - A2)·relu(u), u = a - b in
[l_a - u_b, u_a - l_b]: CROWN relaxes relu(u) exactly as ReLUOperator does. Every Clarke Jacobian of a pair is
[[t, 1 - t], [1 - t, t]] with t in {1} where a >= b on the set, {0} where a <= b, [0, 1] otherwise.
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
    # a nonlinear layer (ReLU, MaxMin): 1-Lipschitz, and its input needs intermediate bounds for CROWN / Jacobians
    is_activation: bool = False

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

    # a bias-free permutation of coordinates (Flatten, PixelUnshuffle): an isometry that maps a ball onto a ball
    is_permutation: bool = False

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

    is_permutation = True

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


class PixelUnshuffleOperator(AffineOperator):
    """nn.PixelUnshuffle(r): [C, H, W] -> [C·r², H/r, W/r], a permutation of coordinates (operator norm exactly 1,
    transpose = inverse = pixel_shuffle, every weight 0 or 1 so the abs / square maps are the map itself)."""

    is_permutation = True

    def __init__(self, factor: int, in_shape: tuple[int, int, int]) -> None:
        channels, height, width = in_shape
        self.factor = factor
        self.in_shapes = (in_shape,)
        self.out_shape = (channels * factor * factor, height // factor, width // factor)

    def linear(self, x):
        return F.pixel_unshuffle(x, self.factor)

    abs_linear = linear
    square_linear = linear

    def vjp(self, a):
        return F.pixel_shuffle(a, self.factor)

    abs_vjp = vjp

    def bias_dot(self, a):
        return 0.0

    def add_bias(self, y):
        return y


class ReLUOperator(Operator):
    """ReLU with CROWN's relaxation: for an unstable neuron (l < 0 < u) the upper line through (l, 0) and (u, u),
    and the adaptive lower line `alpha·z` with alpha = 1 if u >= -l else 0 (the smaller-area choice). A neuron with
    l >= 0 is the identity and one with u <= 0 is zero on the whole input set, exactly."""

    is_activation = True

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.in_shapes = (shape,)
        self.out_shape = shape

    def forward(self, x):
        return torch.relu(x)

    @staticmethod
    def unstable_inputs(box: Box) -> torch.Tensor:
        """[batch, *shape] bool: the inputs whose activation pattern is not fixed on the set the box describes."""
        return box.crosses_zero

    # Midpoint expansion (bounds.midpoint_lipschitz) in the flat per-example layout: D = M + P·E·P with P the
    # projector on the unstable directions (here coordinates) and ||E|| <= expansion_factor.
    expansion_factor = 0.5

    def midpoint(self, box: Box) -> tuple[torch.Tensor, torch.Tensor]:
        """`(slopes, unstable)` [batch, numel]: the midpoint slope (1, 0, 1/2) and the unstable directions."""
        batch = box.lower.shape[0]
        unstable = box.crosses_zero.reshape(batch, -1)
        lower = box.lower.reshape(batch, -1)
        return torch.where(unstable, torch.full_like(lower, 0.5), (lower >= 0).to(lower.dtype)), unstable

    @staticmethod
    def midpoint_norm(slopes: torch.Tensor) -> torch.Tensor:
        return slopes.max(dim=1).values.to(torch.float64)

    @staticmethod
    def midpoint_vjp(a: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
        """`a·M` for rows `a` [batch, rows, numel]."""
        return a * slopes.unsqueeze(1)

    @staticmethod
    def to_directions(a: torch.Tensor) -> torch.Tensor:
        """`a·V` [batch, rows, directions] for `a` [batch, rows, numel] (V: orthonormal direction columns)."""
        return a

    @staticmethod
    def from_directions(c: torch.Tensor) -> torch.Tensor:
        """`c·Vᵀ` [batch, rows, numel] for `c` [batch, rows, directions]."""
        return c

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


class MaxMinOperator(Operator):
    """MaxMin over channel halves (dim 0 of the per-example shape); see the module docstring for the argument."""

    is_activation = True

    def __init__(self, shape: tuple[int, ...]) -> None:
        if shape[0] % 2:
            raise ValueError(f"MaxMin needs an even number of channels, got {shape[0]}")
        self.in_shapes = (shape,)
        self.out_shape = shape
        self.half = shape[0] // 2
        self._relu = ReLUOperator((self.half, *shape[1:]))

    def forward(self, x):
        a, b = x.split(self.half, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)

    def interval(self, box):
        # exact for a box: max and min are monotone in both arguments
        la, lb = box.lower.split(self.half, dim=1)
        ua, ub = box.upper.split(self.half, dim=1)
        return Box(torch.cat([torch.maximum(la, lb), torch.minimum(la, lb)], dim=1),
                   torch.cat([torch.maximum(ua, ub), torch.minimum(ua, ub)], dim=1))

    def difference_box(self, box: Box) -> Box:
        """Sound bounds [batch, C/2, ...] of u = a - b on the box: [l_a - u_b, u_a - l_b]."""
        la, lb = box.lower.split(self.half, dim=1)
        ua, ub = box.upper.split(self.half, dim=1)
        return Box(la - ub, ua - lb)

    def unstable_inputs(self, box: Box) -> torch.Tensor:
        """[batch, *shape] bool: both members of every pair whose order (sign of a - b) is not fixed on the box."""
        crossing = self.difference_box(box).crosses_zero
        return torch.cat([crossing, crossing], dim=1)

    def slope_range(self, box: Box) -> tuple[torch.Tensor, torch.Tensor]:
        """[t_lo, t_hi] [batch, C/2, ...] holding the weight t of a in max(a, b) in every Clarke Jacobian."""
        return ReLUOperator.slope_range(self.difference_box(box))

    # Midpoint expansion in the flat per-example layout (pair p = coordinates p and p + numel/2, since the channel
    # halves are the flat halves): J_pair = 1/2·[[1, 1], [1, 1]] + (2t - 1)·v vᵀ with v = (1, -1)/sqrt(2) and
    # |2t - 1| <= 1, so M = the midpoint (identity if t = 1, swap if t = 0, 1/2·[[1, 1], [1, 1]] if unstable; norm
    # 1) and D - M = P·E·P with P the projector on the v of the unstable pairs and ||E|| <= 1.
    expansion_factor = 1.0

    def midpoint(self, box: Box) -> tuple[torch.Tensor, torch.Tensor]:
        """`(t, unstable)` [batch, numel / 2]: the midpoint weight t (1, 0, 1/2) and the unstable pairs."""
        batch = box.lower.shape[0]
        t_lo, t_hi = (t.reshape(batch, -1) for t in self.slope_range(box))
        return (t_lo + t_hi) / 2, t_lo != t_hi

    @staticmethod
    def midpoint_norm(t: torch.Tensor) -> torch.Tensor:
        return torch.ones(t.shape[0], dtype=torch.float64, device=t.device)

    @staticmethod
    def midpoint_vjp(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        first, second = a.chunk(2, dim=2)
        t = t.unsqueeze(1)
        return torch.cat([t * first + (1 - t) * second, (1 - t) * first + t * second], dim=2)

    @staticmethod
    def to_directions(a: torch.Tensor) -> torch.Tensor:
        first, second = a.chunk(2, dim=2)
        return (first - second) * 0.5 ** 0.5

    @staticmethod
    def from_directions(c: torch.Tensor) -> torch.Tensor:
        return torch.cat([c, -c], dim=2) * 0.5 ** 0.5

    def backward(self, lA, uA, boxes):
        # A·y = A2·a + A1·b + (A1 - A2)·relu(u): relu(u) relaxed by ReLUOperator, then u = a - b pulled back
        def split(coefficients):
            return (None, None) if coefficients is None else coefficients.split(self.half, dim=2)

        (l1, l2), (u1, u2) = split(lA), split(uA)
        [(l_relu, u_relu)], lbias, ubias = self._relu.backward(
            None if lA is None else l1 - l2, None if uA is None else u1 - u2, (self.difference_box(boxes[0]),)
        )

        def join(first, second, on_relu):
            return None if first is None else torch.cat([second + on_relu, first - on_relu], dim=2)

        return [(join(l1, l2, l_relu), join(u1, u2, u_relu))], lbias, ubias

    def jacobian_backward(self, center, radius, boxes):
        t_lo, t_hi = (t.unsqueeze(1) for t in self.slope_range(boxes[0]))
        (low_max, low_min), (high_max, high_min) = ((center - radius).split(self.half, dim=2),
                                                    (center + radius).split(self.half, dim=2))
        # the pullback on a is t·G_max + (1 - t)·G_min, on b (1 - t)·G_max + t·G_min: for t fixed the extremes sit
        # at the matching interval ends (t, 1 - t >= 0), and the result is linear in t, so at t_lo or t_hi

        def mix(first_low, first_high, second_low, second_high):
            low = torch.minimum(t_lo * first_low + (1 - t_lo) * second_low, t_hi * first_low + (1 - t_hi) * second_low)
            high = torch.maximum(t_lo * first_high + (1 - t_lo) * second_high,
                                 t_hi * first_high + (1 - t_hi) * second_high)
            return low, high

        low_a, high_a = mix(low_max, high_max, low_min, high_min)
        low_b, high_b = mix(low_min, high_min, low_max, high_max)
        low, high = torch.cat([low_a, low_b], dim=2), torch.cat([high_a, high_b], dim=2)
        return [((high + low) / 2, (high - low) / 2)]


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
