import argparse

import pytest

from robust_pretrain import load_checkpoint
from robust_pretrain.cli import DEFAULT_SPECTRAL_WEIGHT, build_parser, main

TINY = [
    "--data",
    "mnist-embedded",
    "--max-images",
    "128",
    "--widths",
    "4",
    "8",
    "--hidden-dim",
    "16",
    "--feature-dim",
    "8",
    "--epochs",
    "1",
    "--batch-size",
    "32",
    "--queue-size",
    "64",
    "--no-progress",
]


def test_every_flag_is_explained_in_help():
    parser = build_parser()
    unexplained = [action.dest for action in parser._actions if action.help in (None, "", argparse.SUPPRESS)]
    assert unexplained == []
    assert "--spectral-weight" in parser.format_help()


def test_cli_trains_the_requested_method_into_a_checkpoint(tmp_path):
    assert main([*TINY, "--out-dir", str(tmp_path), "--method", "spectral", "--probe-every", "1"]) == 0
    metadata = load_checkpoint(tmp_path / "encoder").metadata
    training = metadata.training
    assert training["method"] == "spectral"
    assert training["config"]["spectral_weight"] == DEFAULT_SPECTRAL_WEIGHT
    assert training["data"]["images"] == 128 and metadata.feature_dim == 8
    assert 0.0 <= training["final_epoch"]["probe_accuracy"] <= 1.0


@pytest.mark.parametrize(
    "flags",
    [
        ["--method", "nonrobust", "--spectral-weight", "0.5"],
        ["--method", "spectral", "--adversarial-epsilon", "0.5"],
        ["--method", "spectral", "--spectral-weight", "0"],
    ],
)
def test_flags_that_contradict_the_method_are_refused(tmp_path, flags):
    with pytest.raises(SystemExit):
        main([*TINY, "--out-dir", str(tmp_path), *flags])
    assert not (tmp_path / "encoder.json").exists()


def test_cli_trains_a_lipschitz_encoder_whose_checkpoint_is_one_lipschitz(tmp_path):
    flags = ["--data", "mnist-embedded", "--max-images", "64", "--widths", "16", "16", "--feature-dim", "8",
             "--epochs", "1", "--batch-size", "32", "--queue-size", "32", "--probe-every", "0", "--no-progress"]
    assert main([*flags, "--out-dir", str(tmp_path), "--method", "lipschitz"]) == 0
    metadata = load_checkpoint(tmp_path / "encoder").metadata
    assert metadata.training["method"] == "lipschitz" and metadata.config.arch == "lipschitz_mlp"
    assert metadata.lipschitz_upper <= 1.0 + 1e-5


@pytest.mark.parametrize("method", ["pca", "identity"])
def test_cli_fits_reference_encoders_without_training(tmp_path, method):
    flags = ["--data", "mnist-embedded", "--max-images", "100", "--feature-dim", "10", "--no-progress"]
    assert main([*flags, "--out-dir", str(tmp_path), "--method", method]) == 0
    metadata = load_checkpoint(tmp_path / "encoder").metadata
    assert metadata.config.arch == method and metadata.feature_dim == (10 if method == "pca" else 784)
    assert metadata.lipschitz_upper == pytest.approx(1.0, abs=1e-5)


def test_an_architecture_of_another_method_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        main([*TINY, "--out-dir", str(tmp_path), "--method", "lipschitz", "--arch", "small_cnn"])
    with pytest.raises(SystemExit):
        main([*TINY, "--out-dir", str(tmp_path), "--method", "spectral", "--arch", "lipschitz_mlp"])
