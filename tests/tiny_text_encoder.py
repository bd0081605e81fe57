"""A tiny text encoder built by hand for the service's text tests (the real text checkpoints are robust_pretrain's):
a vocabulary from a few sentences, a seeded unit-row embedding table with a zero pad row, and a seeded 1-Lipschitz
MLP over the [embed_dim, 1, max_length] embedding matrix."""

from __future__ import annotations

import dataclasses

import torch

from robust_pretrain import LoadedEncoder
from robust_pretrain.architectures import EncoderConfig, build_encoder
from robust_pretrain.checkpoint import describe_encoder, encoder_weights_bytes, serving_model
from robust_pretrain.text_input import TextInput, Vocabulary

SENTENCES = ("the cat sat on the mat", "the dog sat on a log", "a cat and a dog!", "the mat, the log")
MAX_LENGTH = 6
EMBED_DIM = 4


def tiny_text_encoder(seed: int = 0) -> LoadedEncoder:
    vocabulary = Vocabulary.build(SENTENCES, size=12, max_length=MAX_LENGTH, min_count=1)
    generator = torch.Generator().manual_seed(seed)
    table = torch.randn(vocabulary.size, EMBED_DIM, generator=generator)
    table = table / table.norm(dim=1, keepdim=True)
    table[vocabulary.pad_id] = 0.0
    config = EncoderConfig(arch="lipschitz_mlp", input_shape=(EMBED_DIM, 1, MAX_LENGTH), widths=(16,), feature_dim=8)
    torch.manual_seed(seed)
    model = serving_model(build_encoder(config))
    metadata = describe_encoder(model, config, encoder_weights_bytes(model), model_id="tiny-text",
                                description="seeded random init, NOT pre-trained (tests only)", training={})
    metadata = dataclasses.replace(metadata, value_range=(-1.0, 1.0),
                                   normalization="none: unit-row token embeddings, entries in [-1, 1]")
    return LoadedEncoder(model, metadata, text=TextInput(vocabulary, table))
