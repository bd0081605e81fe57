"""Sound spectral-norm (l2 operator norm) upper bounds per layer, and their product: a global Lipschitz bound.

Why each number is an upper bound (never a power-iteration estimate):

* Linear: the exact largest singular value of the weight (float64 eigenvalues of its Gram matrix).
* Conv2d (also AvgPool2d and BatchNorm2d, which bounds/ writes as depthwise convs): when the explicit operator
  matrix of the zero-padded, strided conv on the actual input shape is small (<= `EXPLICIT_LIMIT` entries), its
  exact largest singular value (float64). Otherwise the circular-convolution bound (Sedghi et al., ICLR
  2019): embed the zero-padded input (Hp = H + 2·pad_h, Wp = W + 2·pad_w) in an Hp x Wp torus; every output the
  zero-padded stride-1 conv computes reads only in-range indices, so it equals a coordinate of the circular conv
  of the embedded input, the embedding is an isometry, and striding keeps a subset of those coordinates. Neither a
  restriction nor a subsampling can raise the norm, so ||conv|| <= ||circular conv|| = max over the Hp·Wp
  frequencies of the largest singular value of the kernel's 2-D DFT (an [out, in] complex matrix), computed by
  FFT + batched Hermitian eigenvalues in complex128. The circular bound ignores the stride, so a pooling conv whose
  windows do not overlap (stride >= dilated kernel extent in both directions: global mean pooling over a text's
  positions, AvgPool2d(k) with stride k) also gets the disjoint-patch bound max_g ||W_g|| (W_g the group's kernel as
  an [out/groups, in/groups·kh·kw] matrix), which is never above the circular one (on the torus every window is
  whole, and a whole window's adjoint alone has norm ||W_g||), so it replaces it: each output position of group g is
  W_g applied to its own patch of the zero-padded input, the patches share no input coordinate, so
  ||y||^2 = sum_{g,p} ||W_g x_{g,p}||^2 <= max_g ||W_g||^2 · sum_{g,p} ||x_{g,p}||^2 <= max_g ||W_g||^2 · ||x||^2.
* Flatten, PixelUnshuffle: 1 (permutations of coordinates). ReLU: 1 (1-Lipschitz, elementwise). MaxMin: 1 (on each
  pair (a, b) -> (max, min) is the identity or the swap, and between those regions it is continuous and piecewise
  isometric, so |y - y'| <= |x - x'| along every segment). Residual add: Lip(a + b) <= Lip(a) + Lip(b).

Every float64 result is multiplied by (1 + SPECTRAL_SAFETY): eigenvalues and FFT in float64 are accurate to ~1e-13
relative on these sizes, so 1e-6 covers rounding with room to spare.
"""

from __future__ import annotations

import torch
from torch import nn

from bounds.graph import build_graph
from bounds.operators import AddOperator, AffineOperator, ConvOperator, LinearOperator

SPECTRAL_SAFETY = 1e-6
EXPLICIT_LIMIT = 2_000_000


def matrix_norm_upper(matrix: torch.Tensor) -> torch.Tensor:
    """Sound upper bound [...] of the largest singular value of `matrix` [..., m, n]: the square root of the largest
    eigenvalue of the smaller Gram matrix (float64 / complex128 `eigvalsh`, accurate to ~1e-15 relative for the
    top eigenvalue; LAPACK's SVD is orders of magnitude slower here), inflated by SPECTRAL_SAFETY."""
    if not matrix.is_complex():
        matrix = matrix.to(torch.float64)
    gram = matrix @ matrix.mH if matrix.shape[-2] <= matrix.shape[-1] else matrix.mH @ matrix
    top = torch.linalg.eigvalsh(gram)[..., -1].clamp(min=0)
    return torch.sqrt(top) * (1.0 + SPECTRAL_SAFETY)


def _dense_weight(op: ConvOperator) -> torch.Tensor:
    """The conv's weight with groups expanded into a block-diagonal [out, in, kh, kw] and dilation into zeros."""
    weight = op.weight.to(torch.float64)
    out_channels, in_per_group, kh, kw = weight.shape
    groups = op.groups
    out_per_group = out_channels // groups
    dense = weight.new_zeros(out_channels, in_per_group * groups, kh, kw)
    for g in range(groups):
        dense[g * out_per_group:(g + 1) * out_per_group, g * in_per_group:(g + 1) * in_per_group] = (
            weight[g * out_per_group:(g + 1) * out_per_group]
        )
    dh, dw = op.dilation
    if (dh, dw) != (1, 1):
        dilated = dense.new_zeros(out_channels, in_per_group * groups, dh * (kh - 1) + 1, dw * (kw - 1) + 1)
        dilated[:, :, ::dh, ::dw] = dense
        dense = dilated
    return dense


def _explicit_conv_norm(op: ConvOperator) -> float:
    in_shape = op.in_shapes[0]
    n_in = int(torch.tensor(in_shape).prod())
    basis = torch.eye(n_in, dtype=torch.float64, device=op.weight.device).reshape(n_in, *in_shape)
    weight = op.weight.to(torch.float64)
    columns = torch.nn.functional.conv2d(basis, weight, None, op.stride, op.padding, op.dilation, op.groups)
    return float(matrix_norm_upper(columns.reshape(n_in, -1)))


def _circular_conv_norm(op: ConvOperator) -> float:
    _, height, width = op.in_shapes[0]
    dense = _dense_weight(op)
    torus = (height + 2 * op.padding[0], width + 2 * op.padding[1])
    torus = (max(torus[0], dense.shape[2]), max(torus[1], dense.shape[3]))
    spectrum = torch.fft.fft2(dense.to(torch.complex128), s=torus)  # [out, in, Hp, Wp]
    per_frequency = spectrum.permute(2, 3, 0, 1).reshape(-1, dense.shape[0], dense.shape[1])
    return float(matrix_norm_upper(per_frequency).max())


def _disjoint_patch_conv_norm(op: ConvOperator) -> float | None:
    """max_g ||W_g||_2 when no two output positions read a common input coordinate (module docstring), else None."""
    out_channels, in_per_group, kh, kw = op.weight.shape
    extent = (op.dilation[0] * (kh - 1) + 1, op.dilation[1] * (kw - 1) + 1)
    if op.stride[0] < extent[0] or op.stride[1] < extent[1]:
        return None
    per_group = op.weight.to(torch.float64).reshape(op.groups, out_channels // op.groups, in_per_group * kh * kw)
    return float(matrix_norm_upper(per_group).max())


def operator_norm_upper(op: AffineOperator) -> float:
    """Sound upper bound of the l2 operator norm of an affine layer's linear part on its actual input shape."""
    if op.is_permutation:
        return 1.0
    if isinstance(op, LinearOperator):
        return float(matrix_norm_upper(op.weight))
    if isinstance(op, ConvOperator):
        n_in = int(torch.tensor(op.in_shapes[0]).prod())
        n_out = int(torch.tensor(op.out_shape).prod())
        if n_in * n_out <= EXPLICIT_LIMIT:
            return _explicit_conv_norm(op)
        disjoint = _disjoint_patch_conv_norm(op)
        return _circular_conv_norm(op) if disjoint is None else disjoint
    raise TypeError(f"no spectral bound for {type(op).__name__}")


def layer_product_lipschitz_upper(model: nn.Module, input_shape: tuple[int, ...]) -> float:
    """A sound upper bound of the model's global l2 Lipschitz constant on inputs of shape `input_shape` (the
    layer-norm product; bounds.lipschitz.global_lipschitz_upper takes the smaller of it and a tighter bound).

    Propagated over the layer graph: Lip(node) = ||W||·Lip(input) for affine layers, Lip(input) for the
    activations (ReLU, MaxMin: 1-Lipschitz),
    Lip(a) + Lip(b) for a residual add (so a Residual with identity shortcut gets 1 + ||body||).
    """
    graph = build_graph(model, input_shape, dtype=torch.float64, device="cpu")
    lipschitz = [1.0]
    for node in graph.nodes[1:]:
        op = node.op
        if isinstance(op, AffineOperator):
            lipschitz.append(operator_norm_upper(op) * lipschitz[node.inputs[0]])
        elif op.is_activation:
            lipschitz.append(lipschitz[node.inputs[0]])
        elif isinstance(op, AddOperator):
            lipschitz.append(sum(lipschitz[j] for j in node.inputs))
        else:
            raise TypeError(f"no Lipschitz rule for {type(op).__name__}")
    return float(lipschitz[-1])
