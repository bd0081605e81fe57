"""Text pre-training end to end on a small slice of the provider text, through the CLI."""

from __future__ import annotations

import pytest
import torch

from robust_pretrain import load_checkpoint
from robust_pretrain.cli import main


@pytest.mark.parametrize("arch", ["text_bag_pca", "text_lipschitz_conv", "text_cnn", "text_bag_features"])
def test_cli_text_writes_a_loadable_text_checkpoint(tmp_path, arch):
    out = tmp_path / arch
    assert main(["text", "--out", str(out), "--arch", arch, "--max-texts", "600", "--vocabulary-size", "300",
                 "--embed-dim", "8", "--max-length", "12", "--widths", "8", "--feature-dim", "8", "--epochs", "1",
                 "--batch-size", "64", "--no-progress"]) == 0
    loaded = load_checkpoint(out)
    assert loaded.text.vocabulary.size == 300 and loaded.metadata.input_shape == (8, 1, 12)
    assert loaded.metadata.training["data"]["texts"] == 600 and "labels" not in str(loaded.metadata.training)
    features = loaded.model(loaded.text.embed(loaded.text.vocabulary.encode(["a good film", "dull"])))
    assert features.shape == (2, 8) and bool(torch.isfinite(features).all())
    if arch != "text_cnn":  # Lipschitz by construction: mean pooling over 12 positions, 1/sqrt(12)
        assert loaded.metadata.lipschitz_upper <= 12 ** -0.5 * (1 + 1e-4)
