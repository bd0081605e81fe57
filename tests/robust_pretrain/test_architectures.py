import json

import pytest
import torch
from torch import nn

from bounds import Residual
from robust_pretrain import EncoderConfig, build_encoder, resnet_config, small_cnn_config

BOUND_VOCABULARY = (nn.Sequential, nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten, nn.AvgPool2d, Residual)


@pytest.mark.parametrize(
    "config",
    [small_cnn_config(), resnet_config((3, 32, 32)), resnet_config((3, 64, 64), feature_dim=48)],
    ids=["small_cnn", "resnet32", "resnet64"],
)
def test_encoder_maps_images_to_features_with_only_bound_friendly_layers(config):
    torch.manual_seed(0)
    model = build_encoder(config)
    images = torch.rand(3, *config.input_shape)
    features = model(images)
    assert features.shape == (3, config.feature_dim)
    assert torch.isfinite(features).all()
    unsupported = [type(m).__name__ for m in model.modules() if not isinstance(m, BOUND_VOCABULARY)]
    assert unsupported == []


def test_resnet_uses_residual_blocks():
    model = build_encoder(resnet_config((3, 32, 32)))
    assert sum(isinstance(m, Residual) for m in model.modules()) == 3


def test_config_round_trips_through_json_and_rebuilds_same_architecture():
    config = resnet_config((3, 64, 64), feature_dim=40)
    again = EncoderConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    shapes = [p.shape for p in build_encoder(config).parameters()]
    assert shapes == [p.shape for p in build_encoder(again).parameters()]


def test_invalid_configs_raise():
    with pytest.raises(ValueError, match="unknown arch"):
        EncoderConfig(arch="vit")
    with pytest.raises(ValueError, match="divisible"):
        EncoderConfig(arch="resnet", input_shape=(3, 30, 30), widths=(8, 16, 32))
    with pytest.raises(ValueError, match="2 widths"):
        EncoderConfig(arch="small_cnn", widths=(8, 16, 32))
