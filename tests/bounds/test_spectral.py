"""Spectral-norm bounds are >= the exact operator norm (explicit matrix SVD) and close to it."""

from __future__ import annotations

import pytest
import torch
from bounds_models import ENCODERS
from torch import nn

import bounds.spectral as spectral
from bounds import (
    Residual,
    build_graph,
    global_lipschitz_upper,
    layer_product_lipschitz_upper,
    operator_norm_upper,
)


def _explicit_norm(layer: nn.Module, input_shape: tuple[int, ...]) -> float:
    n = int(torch.tensor(input_shape).prod())
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *input_shape)
    layer = layer.double()
    with torch.no_grad():
        bias_free = layer(basis) - layer(torch.zeros(1, *input_shape, dtype=torch.float64))
    return float(torch.linalg.matrix_norm(bias_free.reshape(n, -1), ord=2))


CONVS = [
    (nn.Conv2d(3, 5, 3, padding=1), (3, 7, 7)),
    (nn.Conv2d(3, 5, 4, stride=2, padding=1), (3, 8, 8)),
    (nn.Conv2d(2, 4, 3, stride=3, padding=2, dilation=2), (2, 9, 9)),
    (nn.Conv2d(4, 6, 3, padding=1, groups=2), (4, 6, 6)),
    (nn.Conv2d(3, 3, 5, padding=0), (3, 9, 9)),
    (nn.AvgPool2d(2), (3, 6, 6)),
    (nn.AvgPool2d(3, stride=2, padding=1), (2, 7, 7)),
]


@pytest.mark.parametrize("forced_circular", [False, True])
@pytest.mark.parametrize("case", range(len(CONVS)))
def test_conv_bound_is_sound_and_close(case, forced_circular, monkeypatch):
    torch.manual_seed(case)
    layer, shape = CONVS[case]
    if forced_circular:
        monkeypatch.setattr(spectral, "EXPLICIT_LIMIT", 0)
    (op,) = [n.op for n in build_graph(layer, shape, dtype=torch.float64).nodes[1:]]
    exact = _explicit_norm(layer, shape)
    upper = operator_norm_upper(op)
    assert upper >= exact
    assert upper <= (1.0 + 1e-5 if not forced_circular else 2.5) * exact


def test_linear_bound_is_exact_svd():
    torch.manual_seed(0)
    layer = nn.Linear(30, 17)
    (op,) = [n.op for n in build_graph(layer, (30,), dtype=torch.float64).nodes[1:]]
    exact = float(torch.linalg.matrix_norm(layer.weight.detach().double(), ord=2))
    assert exact <= operator_norm_upper(op) <= exact * (1 + 1e-5)


def test_residual_lipschitz_is_one_plus_body():
    torch.manual_seed(1)
    body = nn.Linear(10, 10)
    exact = float(torch.linalg.matrix_norm(body.weight.detach().double(), ord=2))
    bound = layer_product_lipschitz_upper(Residual(body), (10,))
    assert 1 + exact <= bound <= (1 + exact) * (1 + 1e-5)


@pytest.mark.parametrize("encoder_name", sorted(ENCODERS))
def test_global_lipschitz_dominates_gradient_norms(encoder_name):
    build, shape = ENCODERS[encoder_name]
    model = build(0)
    lipschitz = global_lipschitz_upper(model, shape)
    x = torch.rand(8, *shape, requires_grad=True)
    out = model(x)
    for k in range(out.shape[1]):
        # ||J||_2 >= each row's gradient norm; check the row-gradient norms never exceed the bound
        (grad,) = torch.autograd.grad(out[:, k].sum(), x, retain_graph=True)
        assert grad.reshape(8, -1).norm(dim=1).max() <= lipschitz
    x = x.detach()
    y = x + 0.1 * torch.randn_like(x)
    ratio = (model(y) - model(x)).norm(dim=1) / (y - x).reshape(8, -1).norm(dim=1)
    assert float(ratio.max()) <= lipschitz


@pytest.mark.parametrize(("in_shape", "kernel", "stride", "padding", "groups"), [
    ((3, 1, 12), (1, 4), (1, 4), (0, 0), 1),  # disjoint windows, no padding
    ((4, 6, 6), (2, 2), (3, 2), (1, 0), 2),  # grouped, gaps between windows, padding
    ((5, 1, 10), (1, 10), (1, 10), (0, 0), 5),  # global mean pooling as a depthwise conv
])
def test_disjoint_patch_conv_norm_bounds_the_exact_norm(in_shape, kernel, stride, padding, groups):
    """The disjoint-patch bound (non-overlapping windows) is never below the exact operator norm, and is exact
    when every window lies inside the input."""
    from bounds.operators import ConvOperator
    from bounds.spectral import SPECTRAL_SAFETY, _disjoint_patch_conv_norm

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(in_shape[0], 6 if groups < in_shape[0] else in_shape[0], kernel, stride, padding,
                           groups=groups)
    out_shape = tuple(conv(torch.zeros(1, *in_shape)).shape[1:])
    op = ConvOperator(conv.weight.detach().double(), None, stride=stride, padding=padding, dilation=(1, 1),
                      groups=groups, in_shape=in_shape, out_shape=out_shape)
    # the exact norm, not inflated (float64 SVD of the explicit operator matrix), so the bound's safety factor is
    # real headroom rather than a tie between two inflated copies that differ in the last bit across BLAS kernels
    exact = _explicit_norm(conv.double(), in_shape)
    bound = _disjoint_patch_conv_norm(op)
    assert bound is not None and bound >= exact
    if padding == (0, 0):
        assert bound == pytest.approx(exact * (1 + SPECTRAL_SAFETY), rel=1e-9)
    overlapping = ConvOperator(op.weight, None, stride=(1, 1), padding=padding, dilation=(1, 1), groups=groups,
                               in_shape=in_shape, out_shape=out_shape)
    assert _disjoint_patch_conv_norm(overlapping) is None or kernel == (1, 1)
