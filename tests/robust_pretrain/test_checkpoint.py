import json

import pytest
import torch

from robust_pretrain import (
    CheckpointError,
    build_encoder,
    demo_checkpoint_path,
    load_checkpoint,
    load_demo_encoder,
    resnet_config,
    save_checkpoint,
    small_cnn_config,
)
from robust_pretrain import demo as demo_module
from robust_pretrain.demo import DEMO_KINDS


def _saved(tmp_path, config):
    torch.manual_seed(1)
    model = build_encoder(config)
    metadata = save_checkpoint(
        model, config, tmp_path / "enc", model_id="test-enc", description="unit test", training={"epochs": 0}
    )
    return model, metadata


@pytest.mark.parametrize("config", [small_cnn_config(), resnet_config((3, 32, 32))], ids=["cnn", "resnet"])
def test_save_then_load_reproduces_model_and_metadata(tmp_path, config):
    model, metadata = _saved(tmp_path, config)
    for path in (tmp_path / "enc", tmp_path / "enc.safetensors", tmp_path / "enc.json"):
        loaded = load_checkpoint(path)
        assert loaded.metadata == metadata
        assert not loaded.model.training
        images = torch.rand(4, *config.input_shape)
        assert torch.equal(loaded.model(images), model.eval()(images))
    assert metadata.config == config and metadata.feature_dim == config.feature_dim
    assert metadata.input_shape == config.input_shape and metadata.value_range == (0.0, 1.0)
    sidecar = json.loads((tmp_path / "enc.json").read_text())
    assert sidecar["lipschitz_upper"] == metadata.lipschitz_upper and sidecar["training"] == {"epochs": 0}


def test_stored_lipschitz_bound_is_never_beaten_by_input_gradients(tmp_path):
    """Soundness spot check: the l2 norm of J^T u for unit u is at most the global Lipschitz bound."""
    config = small_cnn_config()
    _, metadata = _saved(tmp_path, config)
    model = load_checkpoint(tmp_path / "enc").model
    images = torch.rand(16, *config.input_shape, requires_grad=True)
    worst = 0.0
    for _ in range(20):  # power iteration on J^T J per image gives a lower bound of ||J||_2
        features = model(images)
        direction = torch.randn_like(features)
        for _ in range(10):
            direction = direction / direction.norm(dim=1, keepdim=True)
            (grad,) = torch.autograd.grad(features, images, direction, retain_graph=True)
            jvp = torch.autograd.functional.jvp(model, images.detach(), grad)[1]
            direction = jvp
        worst = max(worst, float(grad.flatten(1).norm(dim=1).max()))
        images = torch.rand(16, *config.input_shape, requires_grad=True)
    assert 0 < worst <= metadata.lipschitz_upper


def test_tampered_weights_are_rejected(tmp_path):
    _saved(tmp_path, small_cnn_config())
    weights = tmp_path / "enc.safetensors"
    payload = bytearray(weights.read_bytes())
    payload[-1] ^= 0xFF
    weights.write_bytes(bytes(payload))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(tmp_path / "enc")


def test_missing_and_corrupt_files_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "absent")
    with pytest.raises(CheckpointError, match=r"is a folder; .* e\.g\. .*/encoder \(reaas-pretrain writes"):
        load_checkpoint(tmp_path)  # a reaas-pretrain --out-dir
    _saved(tmp_path, small_cnn_config())
    (tmp_path / "enc.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt checkpoint sidecar"):
        load_checkpoint(tmp_path / "enc")


def test_demo_fallback_is_labelled_and_deterministic(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_module, "ASSETS_DIR", tmp_path)
    first, second = load_demo_encoder("spectral"), load_demo_encoder("spectral")
    assert "NOT pre-trained" in first.metadata.description
    assert first.metadata.model_id.endswith("-seeded-init")
    assert first.metadata.sha256 == second.metadata.sha256
    assert first.metadata.lipschitz_upper > 0
    with pytest.raises(ValueError, match="unknown demo encoder kind"):
        demo_checkpoint_path("fancy")


def test_demo_loader_prefers_the_asset_file(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_module, "ASSETS_DIR", tmp_path)
    config = demo_module.demo_config("nonrobust")
    save_checkpoint(
        build_encoder(config),
        config,
        tmp_path / "demo_nonrobust",
        model_id="trained",
        description="trained",
        training={},
    )
    assert load_demo_encoder("nonrobust").metadata.model_id == "trained"


def test_shipped_demo_encoders_load_verified_with_their_sound_bounds():
    from bounds import global_lipschitz_upper

    loaded = {kind: load_demo_encoder(kind) for kind in DEMO_KINDS}
    for kind, encoder in loaded.items():
        assert encoder.metadata.model_id == f"demo-{kind}", "asset missing: run `make pretrain-demo`"
        assert "NOT pre-trained" not in encoder.metadata.description
        recomputed = global_lipschitz_upper(encoder.model, encoder.metadata.input_shape)
        assert recomputed == pytest.approx(encoder.metadata.lipschitz_upper, rel=1e-6)
    # what the spectral penalty is for: a much smaller sound bound than the non-robust twin's
    assert loaded["spectral"].metadata.lipschitz_upper * 10 < loaded["nonrobust"].metadata.lipschitz_upper
    # 1-Lipschitz by construction, and the sound bound sees it; the references' true constant is exactly 1
    for kind in ("pca", "identity", "lipschitz"):
        assert loaded[kind].metadata.lipschitz_upper <= 1.0 + 1e-5
    for kind in ("pca", "identity"):
        assert loaded[kind].metadata.lipschitz_upper >= 1.0
