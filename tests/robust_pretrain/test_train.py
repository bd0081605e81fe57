import dataclasses
import json

import pytest
import torch

from bounds import layer_product_lipschitz_upper
from robust_pretrain import EncoderConfig, ImageSet, load_checkpoint
from robust_pretrain import train as train_module
from robust_pretrain.train import PretrainConfig, pretrain

TINY_ENCODER = EncoderConfig(
    arch="small_cnn", input_shape=(1, 12, 12), feature_dim=8, widths=(4, 8), hidden_dim=16
)


def _blobs(count: int = 128, seed: int = 0) -> ImageSet:
    """Two kinds of tiny images (a bright left or right half, plus noise): labels say which."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 2
    images = 0.2 * torch.rand(count, 1, 12, 12, generator=generator)
    images[labels == 0, :, :, :6] += 0.7
    images[labels == 1, :, :, 6:] += 0.7
    return ImageSet(images.clamp(0, 1), labels, "blobs", 2)


def _config(tmp_path, **changes) -> PretrainConfig:
    base = PretrainConfig(
        encoder=TINY_ENCODER,
        out_dir=str(tmp_path / "run"),
        epochs=2,
        batch_size=32,
        queue_size=64,
        probe_every=0,
        learning_rate=0.05,
    )
    return dataclasses.replace(base, **changes)


def test_run_writes_a_loadable_checkpoint_with_its_training_record(tmp_path):
    config = _config(tmp_path, spectral_weight=0.1, probe_every=1)
    result = pretrain(config, _blobs(), (_blobs(64, 1), _blobs(64, 2)), progress=False)
    loaded = load_checkpoint(result.checkpoint)
    assert loaded.metadata == result.metadata
    assert loaded.metadata.training["method"] == "spectral"
    assert loaded.metadata.training["config"]["spectral_weight"] == 0.1
    assert loaded.metadata.training["data"] == {"name": "blobs", "images": 128, "input_shape": [1, 12, 12]}
    assert [record["epoch"] for record in result.history] == [1, 2]
    assert all(0.0 <= record["probe_accuracy"] <= 1.0 for record in result.history)
    # the power-iteration product is a lower estimate of the sound layer product; the stored bound is sound and
    # never above that product (it may be far below: bounds.lipschitz also tries the midpoint expansion)
    product = layer_product_lipschitz_upper(loaded.model, (1, 12, 12))
    assert result.history[-1]["lipschitz_product"] <= product
    assert loaded.metadata.lipschitz_upper <= product * (1 + 1e-9)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in log] == [1, 2]


class _Crash(Exception):
    pass


def test_run_resumed_after_a_crash_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    data = _blobs()
    straight = pretrain(_config(tmp_path / "a", spectral_weight=0.1), data, progress=False)
    save_resume = train_module._save_resume

    def crash_after_saving(*args, **kwargs):
        save_resume(*args, **kwargs)
        raise _Crash

    monkeypatch.setattr(train_module, "_save_resume", crash_after_saving)
    with pytest.raises(_Crash):
        pretrain(_config(tmp_path / "b", spectral_weight=0.1), data, progress=False)
    monkeypatch.setattr(train_module, "_save_resume", save_resume)
    resumed = pretrain(_config(tmp_path / "b", spectral_weight=0.1), data, progress=False)
    assert [record["epoch"] for record in resumed.history] == [1, 2]
    assert resumed.history[0]["contrastive_loss"] == straight.history[0]["contrastive_loss"]
    assert resumed.metadata.sha256 == straight.metadata.sha256


def test_resume_refuses_a_different_config(tmp_path):
    pretrain(_config(tmp_path, epochs=1), _blobs(), progress=False)
    with pytest.raises(ValueError, match="different config"):
        pretrain(_config(tmp_path, epochs=2, spectral_weight=1.0), _blobs(), progress=False)


def test_same_seed_same_weights_and_penalty_lowers_the_sound_bound(tmp_path):
    data = _blobs()
    plain = pretrain(_config(tmp_path / "a", epochs=6), data, progress=False)
    again = pretrain(_config(tmp_path / "b", epochs=6), data, progress=False)
    robust = pretrain(_config(tmp_path / "c", epochs=6, spectral_weight=1.0), data, progress=False)
    assert plain.metadata.sha256 == again.metadata.sha256
    assert robust.metadata.lipschitz_upper < 0.5 * plain.metadata.lipschitz_upper


def test_adversarial_method_trains_on_attacked_views(tmp_path):
    result = pretrain(
        _config(tmp_path, epochs=1, adversarial_epsilon=0.5, adversarial_steps=2), _blobs(), progress=False
    )
    assert result.metadata.training["method"] == "adversarial"
    assert torch.isfinite(torch.tensor(result.history[-1]["contrastive_loss"]))


def test_data_that_does_not_fit_the_encoder_is_refused(tmp_path):
    wrong = ImageSet(torch.rand(64, 1, 28, 28), torch.zeros(64, dtype=torch.long), "wrong", 1)
    with pytest.raises(ValueError, match="does not fit"):
        pretrain(_config(tmp_path), wrong, progress=False)
