"""robust_pretrain: encoder architectures, data sets, robust contrastive pre-training, checkpoints.

Public face (what the server and the client import):

* ``EncoderConfig``, ``build_encoder`` — bound-friendly encoders described by a JSON-able config;
* ``CheckpointMetadata``, ``LoadedEncoder``, ``save_checkpoint``, ``load_checkpoint`` — safetensors + JSON;
* ``demo_checkpoint_path``, ``load_demo_encoder`` — the shipped demo encoders;
* ``ImageSet``, ``EmbeddedMnistSplits``, ``load_embedded_mnist``, ``load_dataset`` — data sets;
  nothing is downloaded.
* Text: ``TextSet``, ``load_text_dataset``, ``load_provider_corpus``, ``load_rotten_tomatoes``, ``split_text_set``
  (data); ``Vocabulary``, ``TextInput`` (the front end a text ``LoadedEncoder.text`` carries); ``TEXT_DEMO_KINDS``
  (shipped text encoders, loaded by ``load_demo_encoder``).
"""

from robust_pretrain.architectures import EncoderConfig, build_encoder, resnet_config, small_cnn_config
from robust_pretrain.checkpoint import (
    CheckpointError,
    CheckpointMetadata,
    LoadedEncoder,
    load_checkpoint,
    save_checkpoint,
)
from robust_pretrain.datasets import (
    DATASETS,
    EmbeddedMnistSplits,
    ImageSet,
    load_dataset,
    load_embedded_mnist,
)
from robust_pretrain.demo import DEMO_KINDS, TEXT_DEMO_KINDS, demo_checkpoint_path, load_demo_encoder
from robust_pretrain.text_data import (
    TEXT_DATASETS,
    TextSet,
    load_provider_corpus,
    load_rotten_tomatoes,
    load_text_dataset,
    split_text_set,
)
from robust_pretrain.text_input import TextInput, Vocabulary

__all__ = [
    "DATASETS",
    "DEMO_KINDS",
    "CheckpointError",
    "CheckpointMetadata",
    "EmbeddedMnistSplits",
    "EncoderConfig",
    "ImageSet",
    "LoadedEncoder",
    "build_encoder",
    "demo_checkpoint_path",
    "load_checkpoint",
    "load_dataset",
    "load_demo_encoder",
    "load_embedded_mnist",
    "resnet_config",
    "save_checkpoint",
    "small_cnn_config",
    "TEXT_DATASETS",
    "TEXT_DEMO_KINDS",
    "TextInput",
    "TextSet",
    "Vocabulary",
    "load_provider_corpus",
    "load_rotten_tomatoes",
    "load_text_dataset",
    "split_text_set",
]
