"""Make the shipped demo encoders: ``python -m robust_pretrain.demo_models`` (``make pretrain-demo``).

Each kind is made from scratch (a fresh temporary run folder, so nothing is resumed) from the embedded MNIST
pre-training split (2 000 digits, labels unused). The reference kinds (pca, identity) are fitted in closed form;
the paper's three kinds share the small CNN, seed, schedule and augmentations, only the method differs; the
Lipschitz kind trains its own architecture with milder views (crops and small rotations: colour jitter and noise
would spend the fixed Lipschitz budget on invariances the digits do not need).
The checkpoints go to robust_pretrain/assets/demo_<kind>.safetensors + .json.
Single process, one CPU thread by default, CUDA when present; reproducible bit-for-bit on the same machine
and torch build (the committed assets came from the default command).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time

import torch

from robust_pretrain.augment import AugmentConfig
from robust_pretrain.checkpoint import checkpoint_paths, load_checkpoint, save_checkpoint
from robust_pretrain.cli import (
    DEFAULT_ADVERSARIAL_EPSILON,
    DEFAULT_DISTANCE_TEMPERATURE,
    DEFAULT_SPECTRAL_WEIGHT,
)
from robust_pretrain.datasets import load_embedded_mnist
from robust_pretrain.demo import DEMO_KINDS, demo_checkpoint_path, demo_config, is_reference_kind
from robust_pretrain.lipschitz_encoders import reference_encoder
from robust_pretrain.train import PretrainConfig, PretrainResult, pretrain

DEMO_EPOCHS = 30
#: The Lipschitz kind's views: crops and small rotations only.
LIPSCHITZ_AUGMENT = AugmentConfig(crop_scale=(0.8, 1.0), max_rotation_deg=10.0, brightness=0.0, contrast=0.0)
LIPSCHITZ_LEARNING_RATE = 0.01


def demo_pretrain_config(kind: str, out_dir: str, epochs: int = DEMO_EPOCHS) -> PretrainConfig:
    """The run config of trained demo encoder ``kind``; the paper's three differ only in the method's own
    parameters."""
    base = PretrainConfig(
        encoder=demo_config(kind),
        out_dir=out_dir,
        epochs=epochs,
        probe_every=epochs,
        model_id=f"demo-{kind}",
        seed=0,
    )
    methods = {
        "spectral": {"spectral_weight": DEFAULT_SPECTRAL_WEIGHT},
        "nonrobust": {},
        "adversarial": {"adversarial_epsilon": DEFAULT_ADVERSARIAL_EPSILON},
        "lipschitz": {
            "temperature": DEFAULT_DISTANCE_TEMPERATURE,
            "augment": LIPSCHITZ_AUGMENT,
            "learning_rate": LIPSCHITZ_LEARNING_RATE,
        },
    }
    description = {
        "lipschitz": "demo encoder: 1-Lipschitz by construction (AOL + MaxMin MLP 784-512-512-64), MoCo with InfoNCE "
        f"on squared feature distances (T={DEFAULT_DISTANCE_TEMPERATURE})",
        "spectral": f"demo encoder: MoCo + spectral-norm product penalty (lambda={DEFAULT_SPECTRAL_WEIGHT})",
        "nonrobust": "demo encoder: MoCo without penalty (lambda=0), the non-robust baseline",
        "adversarial": f"demo encoder: MoCo + RoCL-style l2 PGD (epsilon={DEFAULT_ADVERSARIAL_EPSILON}), "
        "the adversarial contrastive baseline",
    }
    return dataclasses.replace(
        base, description=description[kind] + "; embedded MNIST pre-training split", **methods[kind]
    )


def fit_demo_reference(kind: str) -> dict:
    """Fit reference encoder ``kind`` (pca / identity) on the pre-training split into the assets folder."""
    splits = load_embedded_mnist()
    config = demo_config(kind)
    started = time.perf_counter()
    model = reference_encoder(kind, splits.pretrain.images, config.feature_dim)
    metadata = save_checkpoint(
        model,
        config,
        demo_checkpoint_path(kind),
        model_id=f"demo-{kind}",
        description=f"demo reference encoder {kind} ({config.feature_dim} features), fitted on the embedded MNIST "
        "pre-training split (labels unused); Lipschitz constant 1",
        training={"method": kind, "data": {"name": splits.pretrain.name, "images": len(splits.pretrain)}},
    )
    return {"lipschitz_upper": metadata.lipschitz_upper, "train_seconds": round(time.perf_counter() - started, 1)}


def train_demo_encoder(kind: str, epochs: int = DEMO_EPOCHS, progress: bool = True) -> PretrainResult:
    """Train demo encoder ``kind`` from scratch and copy its checkpoint into the assets folder."""
    splits = load_embedded_mnist()
    with tempfile.TemporaryDirectory(prefix=f"demo_{kind}_") as run_dir:
        config = demo_pretrain_config(kind, run_dir, epochs)
        result = pretrain(
            config, splits.pretrain, (splits.downstream_train, splits.downstream_test), progress=progress
        )
        for source, target in zip(
            checkpoint_paths(result.checkpoint), checkpoint_paths(demo_checkpoint_path(kind)), strict=True
        ):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    return dataclasses.replace(result, checkpoint=demo_checkpoint_path(kind))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Make the demo encoders (fit the references, train the others) into robust_pretrain/assets/."
    )
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=DEMO_KINDS,
        default=list(DEMO_KINDS),
        help="which demo encoders to train",
    )
    parser.add_argument("--epochs", type=int, default=DEMO_EPOCHS, help="epochs per trained encoder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch; 1 is fastest for this small CNN, and far faster than 2 on a busy CPU",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    for kind in args.kinds:
        kind_started = time.perf_counter()
        if is_reference_kind(kind):
            record = fit_demo_reference(kind)
        else:
            result = train_demo_encoder(kind, args.epochs, progress=not args.no_progress)
            record = {
                "lipschitz_upper": result.metadata.lipschitz_upper,
                "probe_accuracy": result.history[-1].get("probe_accuracy"),
                "train_seconds": round(result.train_seconds, 1),
            }
        checkpoint = demo_checkpoint_path(kind)
        record = {"kind": kind, "checkpoint": str(checkpoint), "model_id": load_checkpoint(checkpoint).metadata.model_id,
                  **record, "wall_seconds": round(time.perf_counter() - kind_started, 1)}
        print(json.dumps(record))
    print(json.dumps({"total_wall_seconds": round(time.perf_counter() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
