"""Encoder checkpoints: safetensors weights + a JSON sidecar; the format the server loads.

``<path>.safetensors`` holds the encoder's ``state_dict`` (no pickle). ``<path>.json`` holds the
``CheckpointMetadata``: the architecture config (so the checkpoint rebuilds its own model), input shape,
value range and normalisation, a *sound* global Lipschitz upper bound (``bounds.global_lipschitz_upper``,
never a power-iteration estimate), the sha256 of the weights file, and the training data and
hyper-parameters. ``load_checkpoint`` verifies the hash before it trusts a byte of the weights.

A text checkpoint (``modality == "text"``) also stores the token-embedding table E under the key
``text.embedding`` of the same .safetensors file (so the sha256 covers it) and the vocabulary in the sidecar
(``Vocabulary.to_dict()``); its model reads embedding matrices [batch, embed_dim, 1, max_length] whose entries lie
in [-1, 1] (unit-norm rows). Sidecars written before text existed load as image checkpoints.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from bounds import fold_batchnorm, global_lipschitz_upper
from robust_pretrain.architectures import EncoderConfig, build_encoder
from robust_pretrain.text_input import TextInput, Vocabulary

FORMAT_VERSION = 1
VALUE_RANGE: tuple[float, float] = (0.0, 1.0)
#: Encoders take images as they are; any normalisation would be a layer inside the model.
NORMALIZATION = "none: float32 pixels in [0, 1] fed to the encoder as they are"
MODALITIES: tuple[str, ...] = ("image", "text")
TEXT_VALUE_RANGE: tuple[float, float] = (-1.0, 1.0)
TEXT_NORMALIZATION = (
    "text embedding matrix: token ids -> rows of the unit-norm embedding table (pad row 0), laid out as "
    "[embed_dim, 1, max_length]; perturbations are l2 in that matrix"
)
#: The key prefix of the text front end's tensors inside the .safetensors file.
TEXT_KEY_PREFIX = "text."


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match its sidecar."""


@dataclass(frozen=True)
class CheckpointMetadata:
    """The JSON sidecar. ``sha256`` is of the .safetensors file's bytes; ``lipschitz_upper`` is sound."""

    model_id: str
    sha256: str
    config: EncoderConfig
    input_shape: tuple[int, int, int]
    value_range: tuple[float, float]
    normalization: str
    feature_dim: int
    lipschitz_upper: float
    description: str
    training: dict = field(default_factory=dict)
    modality: str = "image"
    vocabulary: dict | None = None  # Vocabulary.to_dict() of a text checkpoint

    def to_dict(self) -> dict:
        data = asdict(self)
        data["config"] = self.config.to_dict()
        data["format_version"] = FORMAT_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict) -> CheckpointMetadata:
        data = dict(data)
        version = data.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise CheckpointError(f"checkpoint format_version {version!r}, this code reads {FORMAT_VERSION}")
        data["config"] = EncoderConfig.from_dict(data["config"])
        data["input_shape"] = tuple(data["input_shape"])
        data["value_range"] = tuple(data["value_range"])
        if data.get("modality", "image") not in MODALITIES:
            raise CheckpointError(f"unknown modality {data['modality']!r}; valid: {', '.join(MODALITIES)}")
        return cls(**data)


@dataclass(frozen=True)
class LoadedEncoder:
    """``model``: eval mode, batch norm folded, on CPU, gradients off; ``metadata`` from the sidecar.

    ``text``: a text encoder's vocabulary and embedding table (None for an image encoder); ``model`` then reads
    embedding matrices [batch, embed_dim, 1, max_length] (robust_pretrain.text_input)."""

    model: nn.Module
    metadata: CheckpointMetadata
    text: TextInput | None = None


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, sidecar) for ``path`` given with or without the .safetensors / .json suffix."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def serving_model(model: nn.Module) -> nn.Module:
    """The model as it is served and bounded: a CPU copy, eval mode, batch norm folded, no gradients."""
    served = fold_batchnorm(model).cpu()  # fold_batchnorm returns an eval-mode deep copy
    for parameter in served.parameters():
        parameter.requires_grad_(False)
    return served


def encoder_weights_bytes(model: nn.Module, text: TextInput | None = None) -> bytes:
    """The safetensors serialisation of ``model``'s state_dict (contiguous CPU float tensors), plus a text
    encoder's embedding table under ``text.embedding``."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    if text is not None:
        state[TEXT_KEY_PREFIX + "embedding"] = text.embedding.detach().cpu().to(torch.float32).contiguous()
    return save_safetensors_bytes(state)


def save_checkpoint(
    model: nn.Module,
    config: EncoderConfig,
    path: str | Path,
    *,
    model_id: str,
    description: str,
    training: dict,
    text: TextInput | None = None,
) -> CheckpointMetadata:
    """Write ``<path>.safetensors`` and ``<path>.json``; return the metadata written. ``text``: the front end
    of a text encoder (its table goes into the weights file, its vocabulary into the sidecar).

    The Lipschitz bound is computed here, on the served (folded, eval) model, so it always matches the
    weights in the file.
    """
    weights_path, sidecar_path = checkpoint_paths(path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    payload = encoder_weights_bytes(model, text)
    metadata = describe_encoder(
        model, config, payload, model_id=model_id, description=description, training=training, text=text
    )
    weights_path.write_bytes(payload)
    sidecar_path.write_text(json.dumps(metadata.to_dict(), indent=2, sort_keys=True) + "\n")
    return metadata


def describe_encoder(
    model: nn.Module,
    config: EncoderConfig,
    payload: bytes,
    *,
    model_id: str,
    description: str,
    training: dict,
    text: TextInput | None = None,
) -> CheckpointMetadata:
    """Metadata for ``model`` whose serialised weights are ``payload``; the Lipschitz bound is sound (with respect
    to the l2 norm of the embedding matrix for a text encoder)."""
    if text is not None and text.input_shape != config.input_shape:
        raise ValueError(f"text front end gives {text.input_shape}, the encoder reads {config.input_shape}")
    return CheckpointMetadata(
        model_id=model_id,
        sha256=hashlib.sha256(payload).hexdigest(),
        config=config,
        input_shape=config.input_shape,
        value_range=VALUE_RANGE if text is None else TEXT_VALUE_RANGE,
        normalization=NORMALIZATION if text is None else TEXT_NORMALIZATION,
        feature_dim=config.feature_dim,
        lipschitz_upper=float(global_lipschitz_upper(serving_model(model), config.input_shape)),
        description=description,
        training=dict(training),
        modality="image" if text is None else "text",
        vocabulary=None if text is None else text.vocabulary.to_dict(),
    )


def load_checkpoint(path: str | Path) -> LoadedEncoder:
    """Read a checkpoint written by ``save_checkpoint``; raise ``CheckpointError`` if anything is off.

    Checks: both files exist, the sidecar parses, the weights' sha256 matches the sidecar, and the
    weights fit the architecture the sidecar describes (strict ``load_state_dict``).
    """
    if Path(path).is_dir():  # the --out-dir of reaas-pretrain, a likely slip: name the file it wrote there
        raise CheckpointError(f"{path} is a folder; give a checkpoint's path without its suffix, e.g. "
                              f"{Path(path) / 'encoder'} (reaas-pretrain writes <out-dir>/encoder.safetensors + .json)")
    weights_path, sidecar_path = checkpoint_paths(path)
    for needed in (weights_path, sidecar_path):
        if not needed.is_file():
            raise CheckpointError(f"checkpoint file missing: {needed}")
    try:
        metadata = CheckpointMetadata.from_dict(json.loads(sidecar_path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"corrupt checkpoint sidecar {sidecar_path}: {error}") from error
    payload = weights_path.read_bytes()
    digest = hashlib.sha256(payload).hexdigest()
    if digest != metadata.sha256:
        raise CheckpointError(f"sha256 mismatch for {weights_path}: file {digest}, sidecar {metadata.sha256}")
    try:
        state = load_safetensors_bytes(payload)
    except SafetensorError as error:
        raise CheckpointError(f"corrupt safetensors file {weights_path}: {error}") from error
    text_state = {key: state.pop(key) for key in [k for k in state if k.startswith(TEXT_KEY_PREFIX)]}
    model = build_encoder(metadata.config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"weights in {weights_path} do not fit {metadata.config}: {error}") from error
    return LoadedEncoder(model=serving_model(model), metadata=metadata, text=_text_input(metadata, text_state))


def _text_input(metadata: CheckpointMetadata, text_state: dict) -> TextInput | None:
    """The text front end a text checkpoint carries; None for an image one (which must carry none)."""
    if metadata.modality == "image":
        if text_state:
            raise CheckpointError(f"image checkpoint {metadata.model_id} holds text tensors {sorted(text_state)}")
        return None
    embedding = text_state.get(TEXT_KEY_PREFIX + "embedding")
    if embedding is None or metadata.vocabulary is None:
        raise CheckpointError(f"text checkpoint {metadata.model_id} lacks its embedding table or vocabulary")
    try:
        text = TextInput(Vocabulary.from_dict(metadata.vocabulary), embedding)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"text checkpoint {metadata.model_id}: {error}") from error
    if text.input_shape != metadata.input_shape:
        raise CheckpointError(f"text front end gives {text.input_shape}, the sidecar says {metadata.input_shape}")
    return text
