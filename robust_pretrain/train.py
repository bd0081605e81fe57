"""Robust contrastive pre-training: one readable loop (nanoGPT style) around ``moco.MoCo``.

One config, four methods:
* "spectral": MoCo + lambda * prod_j ||T_j||_s (``spectral_weight`` > 0), the paper's robust encoder;
* "nonrobust": the same with lambda = 0;
* "adversarial": RoCL-style PGD on the instance-discrimination loss (``adversarial_epsilon`` > 0);
* "lipschitz": an encoder that is 1-Lipschitz by construction (``lipschitz_mlp`` / ``lipschitz_conv``, AOL layers
  while training, plain layers in the checkpoint), MoCo with InfoNCE on squared distances of raw features.

Data-parallel under ``torchrun`` (gloo on CPU, NCCL on GPU): every process draws the same seeded
permutation, takes its share of each global batch, and DistributedDataParallel averages the gradients, so
``batch_size`` is the global batch whatever the number of processes. Resumable: after every epoch the full
training state goes to ``<out_dir>/resume.pt`` and a rerun with the same config continues from there.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from bounds.lipschitz_layers import materialize
from robust_pretrain.adversarial import instance_adversary
from robust_pretrain.architectures import (
    LIPSCHITZ_ARCHITECTURES,
    EncoderConfig,
    build_encoder,
    small_cnn_config,
)
from robust_pretrain.augment import AugmentConfig, random_view
from robust_pretrain.checkpoint import CheckpointMetadata, load_checkpoint, save_checkpoint
from robust_pretrain.datasets import ImageSet
from robust_pretrain.moco import MoCo, contrastive_loss, spectral_penalty
from robust_pretrain.probe import linear_probe

METHODS: tuple[str, ...] = ("spectral", "nonrobust", "adversarial", "lipschitz")


@dataclass(frozen=True)
class PretrainConfig:
    """Every hyper-parameter of a run; stored in the checkpoint's sidecar. Defaults run the demo setting."""

    encoder: EncoderConfig = field(default_factory=small_cnn_config)
    out_dir: str = "runs/pretrain"
    epochs: int = 30
    batch_size: int = 128  # global, split over the processes
    learning_rate: float = 0.06  # SGD, cosine decay to 0 over all steps
    sgd_momentum: float = 0.9
    weight_decay: float = 1e-4
    queue_size: int = 1024  # K
    moco_momentum: float = 0.99  # m
    temperature: float = 0.2  # T
    spectral_weight: float = 0.0  # lambda; 0 = no penalty
    power_iterations: int = 1  # per step, on persisted vectors
    adversarial_epsilon: float = 0.0  # l2 radius of the RoCL-style attack; 0 = no attack
    adversarial_steps: int = 3
    adversarial_step_size: float = 0.0  # 0 = 2.5 * epsilon / steps
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0
    probe_every: int = 1  # epochs between linear probes (0 = never); needs probe data
    device: str = "auto"  # "auto" = cuda:<local rank> when CUDA is available, else cpu
    model_id: str = ""  # default: pretrain-<method>
    description: str = ""

    @property
    def method(self) -> str:
        if self.encoder.arch in LIPSCHITZ_ARCHITECTURES:
            return "lipschitz"
        if self.adversarial_epsilon > 0:
            return "adversarial"
        return "spectral" if self.spectral_weight > 0 else "nonrobust"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["method"] = self.method
        return data


@dataclass(frozen=True)
class PretrainResult:
    encoder: nn.Module  # this process's trained query encoder (identical in every process), train mode
    metadata: CheckpointMetadata  # of the written encoder checkpoint (sound Lipschitz bound included)
    checkpoint: Path  # <out_dir>/encoder (.safetensors + .json)
    history: tuple[dict, ...]  # one log record per epoch
    train_seconds: float  # wall time of the epochs run by this call (not of resumed ones)


def pretrain(
    config: PretrainConfig,
    data: ImageSet,
    probe: tuple[ImageSet, ImageSet] | None = None,
    *,
    progress: bool = True,
) -> PretrainResult:
    """Train an encoder on ``data`` (labels unused) and write ``<out_dir>/encoder``; resume if possible.

    ``probe``: (train, test) labelled sets for the per-epoch linear-probe accuracy (rank 0 only).
    """
    rank, world_size, device = _init_distributed(config.device)
    out_dir = Path(config.out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    if config.batch_size % world_size:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by {world_size} processes")
    if tuple(data.input_shape) != config.encoder.input_shape:
        raise ValueError(f"data {data.input_shape} does not fit encoder input {config.encoder.input_shape}")

    lipschitz = config.method == "lipschitz"
    if lipschitz and (config.spectral_weight > 0 or config.adversarial_epsilon > 0):
        raise ValueError("a Lipschitz-by-construction encoder takes neither the spectral penalty nor the attack")
    torch.manual_seed(config.seed)  # the same initial weights in every process
    moco = MoCo(
        build_encoder(config.encoder, trainable=lipschitz),
        config.encoder.input_shape,
        config.encoder.feature_dim,
        queue_size=config.queue_size,
        momentum=config.moco_momentum,
        temperature=config.temperature,
        power_iterations=config.power_iterations,
        similarity="distance" if lipschitz else "cosine",
    ).to(device)
    optimizer = torch.optim.SGD(
        moco.encoder_q.parameters(),
        lr=config.learning_rate,
        momentum=config.sgd_momentum,
        weight_decay=config.weight_decay,
    )
    start_epoch, history = _resume(out_dir / "resume.pt", config, moco, optimizer, device)
    model = (
        moco
        if world_size == 1
        else DistributedDataParallel(moco, device_ids=[device.index] if device.type == "cuda" else None)
    )

    steps_per_epoch = len(data) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(data)} images make no full batch of {config.batch_size}")
    total_steps = steps_per_epoch * config.epochs
    attack_step = config.adversarial_step_size or 2.5 * config.adversarial_epsilon / config.adversarial_steps
    local_batch = config.batch_size // world_size
    started = time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        # every process draws the same order and takes its slice of each global batch
        order = torch.randperm(
            len(data), generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        )
        views = torch.Generator(device=device).manual_seed(config.seed * 1_000_003 + epoch * 1_009 + rank)
        totals = torch.zeros(
            3, device=device
        )  # contrastive loss, penalty, feature spread (summed over steps)
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"{config.method} epoch {epoch + 1}/{config.epochs}",
            disable=None if progress and rank == 0 else True,  # None: a bar on a terminal only; logs get epoch lines
            leave=False,
        )
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = _cosine_learning_rate(
                    config.learning_rate, epoch * steps_per_epoch + step, total_steps
                )
            batch = order[step * config.batch_size : (step + 1) * config.batch_size]
            images = data.images[batch[rank * local_batch : (rank + 1) * local_batch]].to(device)
            view_q = random_view(images, views, config.augment)
            keys = moco.encode_keys(random_view(images, views, config.augment))
            if config.adversarial_epsilon > 0:
                attacked = instance_adversary(
                    moco,
                    view_q,
                    keys,
                    epsilon=config.adversarial_epsilon,
                    step_size=attack_step,
                    steps=config.adversarial_steps,
                    generator=views,
                )
                view_q = torch.cat([view_q, attacked])
            logits, labels, queries, lipschitz_product = model(view_q, keys)
            loss_contrastive = contrastive_loss(logits, labels)
            penalty = spectral_penalty(lipschitz_product, config.spectral_weight)
            optimizer.zero_grad(set_to_none=True)
            (loss_contrastive + penalty).backward()
            optimizer.step()
            moco.enqueue(keys)
            # accumulated on the device: no host sync per step (progress bars read values only when shown)
            totals += torch.stack(
                [loss_contrastive.detach(), penalty.detach(), _feature_spread(queries[:local_batch].detach())]
            )
            if progress and rank == 0:
                bar.set_postfix(loss=f"{loss_contrastive.item():.3f}", lip=f"{lipschitz_product.item():.3g}")

        means = (totals / steps_per_epoch).tolist()
        record = {
            "epoch": epoch + 1,
            "contrastive_loss": means[0],
            "penalty": means[1],
            "feature_spread": means[2],
            "lipschitz_product": lipschitz_product.item(),
            "seconds": time.perf_counter() - started,
        }
        record["relative_lipschitz"] = record["lipschitz_product"] / max(record["feature_spread"], 1e-12)
        if rank == 0 and probe is not None and config.probe_every and (epoch + 1) % config.probe_every == 0:
            record["probe_accuracy"] = linear_probe(moco.encoder_q, *probe).accuracy
        history.append(record)
        if rank == 0:
            _save_resume(out_dir, config, moco, optimizer, epoch + 1, history)
            with open(out_dir / "log.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")
            if progress:
                tqdm.write(
                    json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()})
                )
    train_seconds = time.perf_counter() - started

    metadata = None
    if rank == 0:
        metadata = save_checkpoint(
            materialize(moco.encoder_q) if lipschitz else moco.encoder_q,
            config.encoder,
            out_dir / "encoder",
            model_id=config.model_id or f"pretrain-{config.method}",
            description=config.description or f"MoCo pre-training, method {config.method}, on {data.name}",
            training=_training_record(config, data, history, world_size, device, train_seconds),
        )
    if world_size > 1:
        dist.barrier()
        # The DDP wrapper's reducer holds the process group: free it here, not in a garbage collection during
        # interpreter shutdown, where tearing down gloo's threads can abort the process (seen once in CI beside a
        # CPU-heavy benchmark: "terminate called without an active exception", exit -6 on rank 1).
        del model
        gc.collect()
        dist.destroy_process_group()
    if metadata is None:  # the other processes read what rank 0 wrote
        metadata = load_checkpoint(out_dir / "encoder").metadata
    return PretrainResult(
        encoder=moco.encoder_q,
        metadata=metadata,
        checkpoint=out_dir / "encoder",
        history=tuple(history),
        train_seconds=train_seconds,
    )


def _cosine_learning_rate(peak: float, step: int, total_steps: int) -> float:
    """MoCo v2's schedule: cosine decay from ``peak`` to 0 over the run, set every step."""
    return peak * 0.5 * (1 + math.cos(math.pi * step / total_steps))


def _feature_spread(features: torch.Tensor) -> torch.Tensor:
    """Mean l2 distance of the features [batch, dim] from their batch mean: the scale the product acts on."""
    return (features - features.mean(dim=0, keepdim=True)).norm(dim=1).mean()


def _init_distributed(requested: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the torchrun process group when WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if requested == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(requested)
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, device


def _resume(
    path: Path, config: PretrainConfig, moco: MoCo, optimizer: torch.optim.Optimizer, device: torch.device
) -> tuple[int, list[dict]]:
    """(first epoch to run, history so far). Refuses a state written by a different config."""
    if not path.is_file():
        return 0, []
    # weights_only: the state holds only tensors and plain containers, so nothing in it can run code.
    state = torch.load(path, map_location=device, weights_only=True)
    # The learning-rate schedule depends on ``epochs``, so only the device may differ.
    saved = {k: v for k, v in state["config"].items() if k != "device"}
    wanted = {k: v for k, v in _plain(config.to_dict()).items() if k != "device"}
    if saved != wanted:
        raise ValueError(f"{path} was written by a different config; use another out_dir or delete it")
    moco.load_state_dict(state["moco"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"]), list(state["history"])


def _save_resume(
    out_dir: Path,
    config: PretrainConfig,
    moco: MoCo,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    history: list[dict],
) -> None:
    state = {
        "config": _plain(config.to_dict()),
        "moco": moco.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "history": history,
    }
    temporary = out_dir / "resume.pt.tmp"
    torch.save(state, temporary)
    temporary.replace(out_dir / "resume.pt")  # atomic: a crash never leaves half a state


def _plain(data: dict) -> dict:
    """JSON-shaped copy (tuples -> lists), so saved and current configs compare equal."""
    return json.loads(json.dumps(data))


def _training_record(
    config: PretrainConfig,
    data: ImageSet,
    history: list[dict],
    world_size: int,
    device: torch.device,
    train_seconds: float,
) -> dict:
    return {
        "method": config.method,
        "config": _plain(config.to_dict()),
        "data": {"name": data.name, "images": len(data), "input_shape": list(data.input_shape)},
        "final_epoch": history[-1] if history else {},
        "world_size": world_size,
        "device": str(device),
        "train_seconds_last_call": round(train_seconds, 2),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
