import pytest
import torch
from torch import nn

from bounds import Residual, layer_product_lipschitz_upper
from robust_pretrain import build_encoder, resnet_config, small_cnn_config
from robust_pretrain.spectral import SpectralNormProduct, average_pool_norm


def _dense_norm(layer: nn.Module, input_shape) -> float:
    """Exact operator norm of the layer's linear part, from its dense Jacobian."""
    size = int(torch.tensor(input_shape).prod())

    def linear_part(x):
        return (
            layer(x.view(1, *input_shape)).flatten()
            - layer(torch.zeros(1, *input_shape, dtype=x.dtype)).flatten()
        )

    jacobian = torch.autograd.functional.jacobian(linear_part, torch.zeros(size, dtype=torch.float64))
    return float(torch.linalg.matrix_norm(jacobian, ord=2))


@pytest.mark.parametrize(
    "layer, input_shape",
    [
        (nn.Linear(12, 7), (12,)),
        (nn.Conv2d(2, 3, 3, stride=1, padding=1), (2, 6, 6)),
        (nn.Conv2d(2, 4, 4, stride=2, padding=1), (2, 7, 7)),  # odd size: needs output_padding
        (nn.Conv2d(3, 2, 1, stride=2), (3, 6, 6)),
    ],
)
def test_power_iteration_converges_to_the_exact_operator_norm(layer, input_shape):
    torch.manual_seed(0)
    layer = layer.double()
    model = nn.Sequential(layer)
    product = SpectralNormProduct(model, input_shape, power_iterations=500).double()
    estimate = float(product(model).detach())
    assert estimate == pytest.approx(_dense_norm(layer, input_shape), rel=1e-4)


def test_vectors_persist_so_one_iteration_per_call_converges():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1)).double()
    product = SpectralNormProduct(model, (1, 5, 5), power_iterations=1).double()
    for _ in range(500):
        estimate = float(product(model).detach())
    assert estimate == pytest.approx(_dense_norm(model[0], (1, 5, 5)), rel=1e-4)
    assert any(name.startswith("power_vector__") for name, _ in product.named_buffers())


def test_residual_and_pooling_follow_the_bounds_rules():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 5))
    model = nn.Sequential(Residual(body), nn.ReLU())
    product = SpectralNormProduct(model, (5,), power_iterations=300)
    body_norms = [torch.linalg.matrix_norm(layer.weight.detach(), ord=2) for layer in (body[0], body[2])]
    assert float(product(model).detach()) == pytest.approx(1 + float(body_norms[0] * body_norms[1]), rel=1e-4)
    assert average_pool_norm(nn.AvgPool2d(4)) == pytest.approx(0.25)
    assert average_pool_norm(nn.AvgPool2d(3, stride=1)) == pytest.approx(1.0)


@pytest.mark.parametrize("config", [small_cnn_config(), resnet_config((3, 32, 32))], ids=["cnn", "resnet"])
def test_estimate_is_differentiable_and_below_the_sound_bound(config):
    torch.manual_seed(0)
    model = build_encoder(config)
    product = SpectralNormProduct(model, config.input_shape, power_iterations=50)
    value = product(model)
    value.backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "weight" in n
    )
    assert 0 < value.item() <= layer_product_lipschitz_upper(model, config.input_shape)
