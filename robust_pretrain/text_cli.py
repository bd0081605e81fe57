"""``reaas-pretrain text``: pre-train a text encoder on the embedded provider text and write a text checkpoint.

Flags are parsed once, in ``main``, into a frozen ``TextPretrainConfig``; the front end (vocabulary, PPMI + SVD
embedding table) is fitted on the same provider text, which has no labels.
"""

from __future__ import annotations

import argparse
import json

import torch

from reaas_client.command_line import CommandLineParser, add_standard_flags, reported_errors
from robust_pretrain.architectures import TEXT_ARCHITECTURES, EncoderConfig
from robust_pretrain.text_train import (
    EMBED_DIM,
    MAX_LENGTH,
    VOCABULARY_SIZE,
    TextPretrainConfig,
    pretrain_text,
)


def build_parser() -> argparse.ArgumentParser:
    defaults = TextPretrainConfig()
    parser = CommandLineParser(prog="reaas-pretrain text", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="checkpoint path (writes <out>.safetensors and <out>.json)")
    parser.add_argument("--arch", choices=TEXT_ARCHITECTURES, default=defaults.encoder.arch,
                        help="text_bag_pca (the floor, fitted), text_lipschitz_conv (robust), text_cnn (non-robust), "
                        "text_bag_features (random word features, fitted; --widths W --feature-dim W)")
    parser.add_argument("--vocabulary-size", type=int, default=VOCABULARY_SIZE, help="tokens incl. <pad>, <unk>")
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH, help="positions per text")
    parser.add_argument("--embed-dim", type=int, default=EMBED_DIM, help="token embedding dimension")
    parser.add_argument("--widths", type=int, nargs="+", default=list(defaults.encoder.widths),
                        help="conv widths (even for text_lipschitz_conv)")
    parser.add_argument("--feature-dim", type=int, default=defaults.encoder.feature_dim, help="feature dimension")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over the provider text")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="texts per step")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="Adam learning rate")
    parser.add_argument("--temperature", type=float, default=defaults.temperature,
                        help="InfoNCE temperature (0: 0.2 cosine, 0.02 on squared distances)")
    parser.add_argument("--token-dropout", type=float, default=defaults.token_dropout, help="view token dropout")
    parser.add_argument("--min-crop", type=float, default=defaults.min_crop, help="view: least share of tokens kept")
    parser.add_argument("--max-texts", type=int, default=0, help="use only the first N provider texts (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of views, init and the SVD start")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_standard_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        encoder = EncoderConfig(arch=args.arch, input_shape=(args.embed_dim, 1, args.max_length),
                                widths=args.widths, feature_dim=args.feature_dim)
        config = TextPretrainConfig(encoder=encoder, vocabulary_size=args.vocabulary_size, epochs=args.epochs,
                                    batch_size=args.batch_size, learning_rate=args.learning_rate,
                                    temperature=args.temperature, token_dropout=args.token_dropout,
                                    min_crop=args.min_crop, max_texts=args.max_texts, seed=args.seed)
    except ValueError as error:
        parser.error(str(error))
    with reported_errors(parser.prog, debug=args.debug):
        result = pretrain_text(config, args.out, progress=not args.no_progress)
    print(json.dumps({"checkpoint": args.out, "lipschitz_upper": result.metadata.lipschitz_upper,
                      "history": result.history, "train_seconds": round(result.train_seconds, 1)}))
    return 0
