"""Text checkpoints: the embedding table rides in the weights file (covered by the sha256), the vocabulary in the
sidecar; old image sidecars, written before text existed, still load."""

from __future__ import annotations

import json

import pytest
import torch

from robust_pretrain import CheckpointError, build_encoder, load_checkpoint, save_checkpoint, small_cnn_config
from robust_pretrain.architectures import EncoderConfig
from robust_pretrain.checkpoint import TEXT_NORMALIZATION
from robust_pretrain.demo import TEXT_DEMO_KINDS, demo_checkpoint_path, load_demo_encoder
from robust_pretrain.text_input import TextInput, Vocabulary

TOKENS = ("<pad>", "<unk>", "good", "bad", "film", "plot")


def _text_input(max_length: int = 5, dim: int = 4) -> TextInput:
    embedding = torch.nn.functional.normalize(torch.randn(len(TOKENS), dim, generator=torch.Generator().manual_seed(0)),
                                              dim=1)
    embedding[0] = 0
    return TextInput(Vocabulary(TOKENS, max_length), embedding)


def _saved(tmp_path):
    text = _text_input()
    config = EncoderConfig(arch="text_lipschitz_conv", input_shape=text.input_shape, widths=(6,), feature_dim=3)
    torch.manual_seed(0)
    model = build_encoder(config)
    metadata = save_checkpoint(model, config, tmp_path / "text", model_id="t", description="unit test",
                               training={}, text=text)
    return model, text, metadata


def test_text_checkpoint_round_trip(tmp_path):
    model, text, metadata = _saved(tmp_path)
    loaded = load_checkpoint(tmp_path / "text")
    assert loaded.metadata == metadata and metadata.modality == "text"
    assert metadata.value_range == (-1.0, 1.0) and metadata.normalization == TEXT_NORMALIZATION
    assert loaded.text.vocabulary == text.vocabulary and torch.equal(loaded.text.embedding, text.embedding)
    matrices = loaded.text.embed(loaded.text.vocabulary.encode(["good film", "bad plot, bad film"]))
    assert torch.equal(loaded.model(matrices), model.eval()(matrices))


def test_a_changed_embedding_table_breaks_the_hash(tmp_path):
    _saved(tmp_path)
    weights = tmp_path / "text.safetensors"
    payload = bytearray(weights.read_bytes())
    payload[-3] ^= 0x01  # the table is stored last ("text." sorts after the model's numbered keys)
    weights.write_bytes(bytes(payload))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(tmp_path / "text")


def test_a_text_sidecar_without_its_table_is_refused(tmp_path):
    model, _, _ = _saved(tmp_path)
    sidecar = json.loads((tmp_path / "text.json").read_text())
    config = EncoderConfig.from_dict(sidecar["config"])
    plain = save_checkpoint(model, config, tmp_path / "plain", model_id="p", description="", training={})
    sidecar.update(sha256=plain.sha256)
    (tmp_path / "plain.json").write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError, match="lacks"):
        load_checkpoint(tmp_path / "plain")


def test_old_image_sidecars_without_text_fields_still_load(tmp_path):
    config = small_cnn_config()
    save_checkpoint(build_encoder(config), config, tmp_path / "img", model_id="i", description="", training={})
    sidecar = json.loads((tmp_path / "img.json").read_text())
    del sidecar["modality"], sidecar["vocabulary"]
    (tmp_path / "img.json").write_text(json.dumps(sidecar))
    loaded = load_checkpoint(tmp_path / "img")
    assert loaded.text is None and loaded.metadata.modality == "image"


@pytest.mark.parametrize("kind", TEXT_DEMO_KINDS)
def test_shipped_text_demo_encoders_load_small_with_their_front_end(kind):
    encoder = load_demo_encoder(kind)
    assert encoder.text is not None and encoder.metadata.modality == "text"
    assert encoder.text.input_shape == encoder.metadata.input_shape
    assert torch.allclose(encoder.text.embedding[1:].norm(dim=1), torch.ones(encoder.text.vocabulary.size - 1),
                          atol=1e-5)
    for path in (demo_checkpoint_path(kind).with_suffix(".safetensors"), demo_checkpoint_path(kind).with_suffix(".json")):
        assert path.stat().st_size < 2_100_000
    features = encoder.model(encoder.text.embed(encoder.text.vocabulary.encode(["a fine film"])))
    assert features.shape == (1, encoder.metadata.feature_dim)
