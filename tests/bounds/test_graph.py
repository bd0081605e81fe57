"""The traced graph computes the model; BN folding preserves the function; the vocabulary is enforced."""

from __future__ import annotations

import pytest
import torch
from bounds_models import ENCODERS
from torch import nn

from bounds import UnsupportedLayerError, build_graph, fold_batchnorm


@pytest.mark.parametrize("encoder_name", sorted(ENCODERS))
def test_graph_forward_matches_model(encoder_name):
    build, shape = ENCODERS[encoder_name]
    model = build(3)
    x = torch.rand(4, *shape)
    graph = build_graph(model, shape)
    torch.testing.assert_close(graph.forward(x), model(x), rtol=1e-5, atol=1e-5)


def test_fold_batchnorm_preserves_function_and_removes_bn():
    build, shape = ENCODERS["mnist_cnn"]
    model = build(2)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    x = torch.rand(5, *shape)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", [nn.MaxPool2d(2), nn.Tanh(), nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular")])
def test_unsupported_layers_raise_with_their_name(layer):
    with pytest.raises(UnsupportedLayerError, match=type(layer).__name__ if not isinstance(layer, nn.Conv2d)
                       else "padding_mode"):
        build_graph(nn.Sequential(layer, nn.Flatten()), (1, 4, 4))
