"""The shipped demo encoders (robust_pretrain/assets/demo_<kind>.safetensors + .json).

Made by ``python -m robust_pretrain.demo_models`` from the embedded MNIST pre-training split (labels unused):

* "pca": the reference floor, an orthonormal projection on the top 64 principal directions (L = 1 exactly);
* "lipschitz": the learned encoder that is 1-Lipschitz by construction (AOL + MaxMin MLP, MoCo on distances);
* "identity": the other reference, Flatten (L = 1, 784 features);
* "spectral" (MoCo + spectral-norm product penalty, the paper's robust encoder), "nonrobust" (the same with
  lambda = 0) and "adversarial" (RoCL-style PGD on the instance-discrimination loss): the paper's small CNN.

Text kinds (``TEXT_DEMO_KINDS``, made by ``python -m robust_pretrain.text_demo_models`` from provider text): their
``LoadedEncoder.text`` holds the vocabulary and embedding table, the model reads [32, 1, 40] embedding matrices.

* "text-pca": the floor, mean-pooled embeddings -> PCA (L = 1/sqrt(40) exactly);
* "text-lipschitz": the learned Lipschitz-by-construction body (text_encoders.text_lipschitz_conv);
* "text-nonrobust": the same shape with plain conv + ReLU, no constraint.

Measured (10 000 training reviews -> linear head, first 500 test reviews, exact BC radius margin / (||w_y - w_j|| L)
in embedding-matrix units, head trained with the Lipschitz-margin loss at eps = 0): text-pca 0.624 / ACR 0.113,
text-lipschitz 0.588 / 0.104, text-nonrobust 0.598 / 0.028 (majority class 0.584). The learned Lipschitz body does
not beat the floor, so the floor is the robust text kind the product serves (``DEFAULT_TEXT_DEMO_KIND``).
``make bench-text-encoders`` (benchmarks/results/text_encoders.md) re-measures every kind per head and margin: with
head weight decay 0 the floor gives 0.652 / 0.079 at eps 0 and 0.626 / 0.106 at eps 0.01; random word features
(text_encoders.text_bag_features) do not move that frontier, and the 1-Lipschitz MLP head moves it only near the
majority class (text-lipschitz 0.604 / 0.158), so the floor stays the served kind.
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
from robust_pretrain.lipschitz_encoders import REFERENCE_KINDS
from robust_pretrain.text_train import EMBED_DIM, MAX_LENGTH

#: The image demo kinds (what image callers iterate); text kinds are separate so those callers stay unchanged.
DEMO_KINDS: tuple[str, ...] = ("pca", "lipschitz", "identity", "spectral", "nonrobust", "adversarial")
TEXT_DEMO_KINDS: tuple[str, ...] = ("text-pca", "text-lipschitz", "text-nonrobust")
#: The robust text kind the product serves: the floor until a learned encoder beats it (text_demo_models).
DEFAULT_TEXT_DEMO_KIND = "text-pca"
#: The paper's method and its two baselines: MoCo on the small CNN.
PAPER_KINDS: tuple[str, ...] = ("spectral", "nonrobust", "adversarial")
#: What the server serves and the demo certifies when no encoder is named.
DEFAULT_DEMO_KIND = "pca"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
SEEDED_INIT_SEED = 0


def demo_config(kind: str = DEFAULT_DEMO_KIND) -> EncoderConfig:
    """Architecture of demo encoder ``kind`` for 1x28x28 digits."""
    _check_kind(kind)
    if kind in TEXT_DEMO_KINDS:
        return text_demo_config(kind)
    if kind == "pca":
        return EncoderConfig(arch="pca", input_shape=(1, 28, 28), feature_dim=64)
    if kind == "identity":
        return EncoderConfig(arch="identity", input_shape=(1, 28, 28), feature_dim=28 * 28)
    if kind == "lipschitz":
        return EncoderConfig(arch="lipschitz_mlp", input_shape=(1, 28, 28), widths=(512, 512), feature_dim=64)
    return small_cnn_config(feature_dim=32)


def text_demo_config(kind: str) -> EncoderConfig:
    """Architecture of text demo encoder ``kind`` on [EMBED_DIM, 1, MAX_LENGTH] embedding matrices."""
    if kind not in TEXT_DEMO_KINDS:
        raise ValueError(f"unknown text demo kind {kind!r}; valid: {', '.join(TEXT_DEMO_KINDS)}")
    shape = (EMBED_DIM, 1, MAX_LENGTH)
    if kind == "text-pca":
        return EncoderConfig(arch="text_bag_pca", input_shape=shape, feature_dim=EMBED_DIM)
    arch = "text_lipschitz_conv" if kind == "text-lipschitz" else "text_cnn"
    return EncoderConfig(arch=arch, input_shape=shape, widths=(64, 64), feature_dim=EMBED_DIM)


def is_reference_kind(kind: str) -> bool:
    """Reference encoders are fitted (identity, PCA), not trained."""
    return kind in REFERENCE_KINDS


def _check_kind(kind: str) -> None:
    if kind not in DEMO_KINDS + TEXT_DEMO_KINDS:
        raise ValueError(f"unknown demo encoder kind {kind!r}; valid: {', '.join(DEMO_KINDS + TEXT_DEMO_KINDS)}")


def demo_checkpoint_path(kind: str = DEFAULT_DEMO_KIND) -> Path:
    """Path (without suffix) of the shipped demo encoder of ``kind``; the files may not exist yet."""
    _check_kind(kind)
    return ASSETS_DIR / f"demo_{kind}"


def load_demo_encoder(kind: str = DEFAULT_DEMO_KIND) -> LoadedEncoder:
    """The trained demo encoder of ``kind``, or, only while its asset file is absent, a labelled stand-in.

    The stand-in is the demo architecture at a deterministic seeded random init; its description says
    "seeded random init, NOT pre-trained" and its model_id ends in "-seeded-init", so nothing mistakes it
    for a trained encoder. Its Lipschitz bound is as sound as a trained one's.
    """
    weights_path, sidecar_path = checkpoint_paths(demo_checkpoint_path(kind))
    if weights_path.is_file() or sidecar_path.is_file():
        return load_checkpoint(demo_checkpoint_path(kind))
    if kind in TEXT_DEMO_KINDS:
        raise FileNotFoundError(f"no asset for text demo kind {kind!r} (a text encoder needs its fitted vocabulary "
                                "and embedding table): run `make pretrain-demo-text`")
    return seeded_init_encoder(kind)


def seeded_init_encoder(kind: str = DEFAULT_DEMO_KIND) -> LoadedEncoder:
    """The demo architecture at seed ``SEEDED_INIT_SEED``: same weights on every machine, NOT pre-trained."""
    config = demo_config(kind)
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
