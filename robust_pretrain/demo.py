"""The shipped demo encoders (robust_pretrain/assets/demo_<kind>.safetensors + .json).

Three kinds, trained by ``python -m robust_pretrain.demo_models`` on the embedded MNIST pre-training split:
"spectral" (MoCo + spectral-norm product penalty, the paper's robust encoder), "nonrobust" (the same with
lambda = 0) and "adversarial" (RoCL-style PGD on the instance-discrimination loss).
"""

from __future__ import annotations

from pathlib import Path

import torch

from robust_pretrain.architectures import EncoderConfig, build_encoder, small_cnn_config
from robust_pretrain.checkpoint import (
    LoadedEncoder,
    checkpoint_paths,
    describe_encoder,
    encoder_weights_bytes,
    load_checkpoint,
    serving_model,
)

DEMO_KINDS: tuple[str, ...] = ("spectral", "nonrobust", "adversarial")
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
SEEDED_INIT_SEED = 0


def demo_config() -> EncoderConfig:
    """Architecture of every demo encoder: the small CNN for 1x28x28 digits."""
    return small_cnn_config(feature_dim=32)


def demo_checkpoint_path(kind: str = "spectral") -> Path:
    """Path (without suffix) of the shipped demo encoder of ``kind``; the files may not exist yet."""
    if kind not in DEMO_KINDS:
        raise ValueError(f"unknown demo encoder kind {kind!r}; valid: {', '.join(DEMO_KINDS)}")
    return ASSETS_DIR / f"demo_{kind}"


def load_demo_encoder(kind: str = "spectral") -> LoadedEncoder:
    """The trained demo encoder of ``kind``, or, only while its asset file is absent, a labelled stand-in.

    The stand-in is the demo architecture at a deterministic seeded random init; its description says
    "seeded random init, NOT pre-trained" and its model_id ends in "-seeded-init", so nothing mistakes it
    for a trained encoder. Its Lipschitz bound is as sound as a trained one's.
    """
    weights_path, sidecar_path = checkpoint_paths(demo_checkpoint_path(kind))
    if weights_path.is_file() or sidecar_path.is_file():
        return load_checkpoint(demo_checkpoint_path(kind))
    return seeded_init_encoder(kind)


def seeded_init_encoder(kind: str = "spectral") -> LoadedEncoder:
    """The demo architecture at seed ``SEEDED_INIT_SEED``: same weights on every machine, NOT pre-trained."""
    config = demo_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEEDED_INIT_SEED)
        model = build_encoder(config)
    metadata = describe_encoder(
        model,
        config,
        encoder_weights_bytes(model),
        model_id=f"demo-{kind}-seeded-init",
        description=(
            f"seeded random init, NOT pre-trained (no asset file for demo kind {kind!r}; "
            "run `make pretrain-demo`)"
        ),
        training={"seed": SEEDED_INIT_SEED, "pretrained": False},
    )
    return LoadedEncoder(model=serving_model(model), metadata=metadata)
