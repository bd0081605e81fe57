"""The Lipschitz-by-construction encoders and the reference encoders: L <= 1 whatever the weights, checkpoints
that rebuild the same function, PCA's orthonormal rows, and the distance InfoNCE."""

import pytest
import torch

from bounds import global_lipschitz_upper, materialize, pgd_feature_distance
from robust_pretrain import load_checkpoint, save_checkpoint
from robust_pretrain.architectures import EncoderConfig, build_encoder
from robust_pretrain.lipschitz_encoders import fit_pca, reference_encoder
from robust_pretrain.moco import MoCo

LIPSCHITZ_CONFIGS = [
    EncoderConfig(arch="lipschitz_mlp", input_shape=(1, 12, 12), widths=(32, 16), feature_dim=8),
    EncoderConfig(arch="lipschitz_conv", input_shape=(1, 12, 12), widths=(4, 8), hidden_dim=16, feature_dim=8),
]


def _scrambled(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The trainable encoder with large random parameters: the constraint must hold for any weights."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 3.0)
    return model


@pytest.mark.parametrize("config", LIPSCHITZ_CONFIGS, ids=lambda c: c.arch)
def test_trained_layers_materialize_to_the_same_function_with_a_sound_bound_at_most_one(config, tmp_path):
    trainable = _scrambled(build_encoder(config, trainable=True), seed=1)
    for _ in range(30):  # let the power iteration of the spectrally normalised layers converge
        trainable(torch.rand(4, *config.input_shape))
    trainable.eval()
    served = materialize(trainable)
    images = torch.rand(16, *config.input_shape)
    with torch.no_grad():
        torch.testing.assert_close(served(images), trainable(images), rtol=1e-4, atol=1e-5)
    bound = global_lipschitz_upper(served, config.input_shape)
    assert bound <= 1.0 + 1e-5
    # the sound bound covers what an attack finds (distance ratio at radius 0.5 from random images)
    attacked, _ = pgd_feature_distance(served, images, torch.full((16,), 0.5), steps=50, restarts=2)
    assert bool((attacked <= bound * 0.5 * (1 + 1e-5)).all())
    metadata = save_checkpoint(served, config, tmp_path / "enc", model_id="t", description="t", training={})
    loaded = load_checkpoint(tmp_path / "enc")
    assert loaded.metadata.lipschitz_upper == metadata.lipschitz_upper
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(images), served(images))


def test_pca_rows_are_orthonormal_and_centre_the_data():
    images = torch.rand(200, 1, 6, 6)
    encoder = fit_pca(images, 5)
    weight = encoder[1].weight.double()
    torch.testing.assert_close(weight @ weight.T, torch.eye(5, dtype=torch.float64), atol=1e-6, rtol=0)
    with torch.no_grad():
        assert encoder(images).mean(dim=0).abs().max() < 1e-5
    assert global_lipschitz_upper(encoder, (1, 6, 6)) == pytest.approx(1.0, abs=1e-5)


def test_identity_reference_keeps_every_pixel_and_rejects_unknown_kinds():
    images = torch.rand(3, 1, 4, 4)
    assert torch.equal(reference_encoder("identity", images, 16)(images), images.flatten(1))
    with pytest.raises(ValueError, match="unknown reference encoder"):
        reference_encoder("random", images, 4)


def test_configs_refuse_shapes_the_architecture_cannot_take():
    with pytest.raises(ValueError, match="even"):
        EncoderConfig(arch="lipschitz_mlp", widths=(33,), feature_dim=8)
    with pytest.raises(ValueError, match="divisible"):
        EncoderConfig(arch="lipschitz_conv", input_shape=(1, 10, 10), widths=(4, 8, 8), hidden_dim=16)
    with pytest.raises(ValueError, match="C\\*H\\*W"):
        EncoderConfig(arch="identity", input_shape=(1, 4, 4), feature_dim=8)


def test_distance_infonce_ranks_the_nearest_key_first_and_keeps_raw_keys():
    encoder = torch.nn.Sequential(torch.nn.Flatten())
    moco = MoCo(encoder, (1, 2, 2), 4, queue_size=3, temperature=1.0, similarity="distance")
    with torch.no_grad():
        moco.queue.copy_(torch.tensor([[0.0, 10.0, -3.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    queries = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    logits = moco.logits(queries, torch.tensor([[2.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(logits, torch.tensor([[-1.0, -1.0, -81.0, -16.0]]))
    moco.enqueue(torch.tensor([[5.0, 0.0, 0.0, 0.0]]))
    assert moco.queue[0, 0] == 5.0  # unnormalised: under a fixed Lipschitz constant the scale is the radius
