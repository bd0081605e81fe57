"""The client's side of training: features fetched once through the service, and the downstream classifier h.

h is the paper's fully connected Linear/ReLU network or one of the margin heads of reaas_client.heads (a linear
h, a 1-Lipschitz MaxMin body with a last Linear, a nearest-prototype head); all are plain Sequentials that
`bounds.certify_feature_radius` certifies as they are. For SC, h is trained with Gaussian noise added *in feature
space*, the distribution Cohen's CERTIFY will query it on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from reaas_client.augment import augmented_copies
from reaas_client.heads import (
    HEAD_KINDS,
    PROTOTYPE_SOFTNESS,
    PrototypeHead,
    build_margin_head,
    consistency_penalty,
    finalize_margin_head,
    finalize_prototype_head,
    initial_prototypes,
    lipschitz_margin_loss,
    prototype_margin_loss,
)
from reaas_client.progress import bar, step
from reaas_client.seaas import noisy_copies

if TYPE_CHECKING:
    from reaas_client import EncoderClient

DEFAULT_CACHE_DIR = Path("runs") / "feature_cache"


@dataclass(frozen=True)
class FeatureSet:
    """f(x) of a labelled data set as the service returned it.

    `features` [N, feature_dim] float32, `labels` [N] int64. `queries_per_input` is what obtaining these
    features cost when they were fetched (1 for REaaS training, 1 + K with K augmented copies; also when they now
    come from the cache, in which case `from_cache` is True and this run sent nothing). `views` [N, K,
    feature_dim]: the features of each input's K augmented copies (reaas_client.augment), None without; the rows
    h trains on are `training_rows(features, labels, views)`.
    """

    features: torch.Tensor
    labels: torch.Tensor
    queries_per_input: float
    from_cache: bool
    cache_path: Path | None
    views: torch.Tensor | None = None


def input_ids(prefix: str, count: int, start: int = 0) -> list[str]:
    """Ledger ids "<prefix>-<i>", one per input: how queries are attributed to inputs."""
    return [f"{prefix}-{i}" for i in range(start, start + count)]


def stratified_subset(labels: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """Indices of `count` inputs (all when count <= 0) taken round-robin over the classes in a seeded order,
    so any prefix is class-balanced even when the data set is sorted by class."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(labels.shape[0], generator=generator)
    rank = torch.empty_like(order)
    for label in labels.unique():
        members = order[labels[order] == label]
        rank[members] = torch.arange(members.shape[0])
    interleaved = order[torch.argsort(rank[order] * (int(labels.max()) + 1) + labels[order], stable=True)]
    return interleaved if count <= 0 else interleaved[:count]


def is_token_ids(inputs: torch.Tensor) -> bool:
    """Whether a batch of inputs is token ids [N, length] (integers) for a text encoder rather than images."""
    return not (inputs.is_floating_point() or inputs.is_complex())


def encoder_inputs(batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """The EncoderClient keyword a batch travels in: ``token_ids`` for integers, else ``images``."""
    return {"token_ids" if is_token_ids(batch) else "images": batch}


def _dataset_digest(images: torch.Tensor) -> str:
    return hashlib.sha256(images.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def fetch_features(
    client: EncoderClient,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    dataset: str,
    id_prefix: str = "train",
    cache_dir: Path | None = DEFAULT_CACHE_DIR,
    copies: int = 1,
    noise_sigma: float = 0.0,
    seed: int = 0,
    augment: int = 0,
) -> FeatureSet:
    """f(x) for every image [N, C, H, W] through StreamFeatures, `copies` queries per image, cached on disk.

    REaaS training: `copies=1, noise_sigma=0` (1 query per training input); `augment=K` also sends K augmented
    copies of each image (reaas_client.augment.augmented_copies, seeded by `seed`, in the service's value range),
    1 + K queries per input, all counted against that input: their features come back as `views` [N, K, dim]
    beside the clean `features` [N, dim]. SEaaS training: `copies=25`
    noisy copies clip(x + e) of each image (seeded by `seed`), features [N * copies, feature_dim] with
    labels repeated. Text: `images` are token ids [N, length]; the clean features come from the ids, and noisy
    copies are of each input's embedding matrix, fetched first through Embed (1 more query per input). The cache key is the served model's sha256 plus the data set's name, content hash and
    the noise settings, so a different encoder or different images never reuse stale features.
    `cache_dir=None` disables the cache.
    """
    if augment < 0:
        raise ValueError(f"augment must be >= 0, got {augment}")
    if augment and (copies > 1 or noise_sigma > 0 or is_token_ids(images)):
        raise ValueError("augment makes shifted / elastic copies of clean training images; it does not combine "
                         "with noisy copies or token ids")
    info = client.info()
    noise = "clean" if noise_sigma == 0 and copies == 1 else f"x{copies}-s{noise_sigma:g}-seed{seed}"
    noise += f"-aug{augment}-seed{seed}" if augment else ""
    key = f"{info.model_sha256[:16]}-{dataset}-{id_prefix}-{_dataset_digest(images)}-{noise}"
    path = None if cache_dir is None else Path(cache_dir) / f"{key}.npz"
    labels = labels.repeat_interleave(copies)
    if path is not None and path.exists():
        cached = np.load(path)
        meta = json.loads(str(cached["meta"]))
        step(f"{images.shape[0] * copies * (1 + augment)} {id_prefix} features from the cache ({path.name})")
        return _feature_set(torch.from_numpy(cached["features"]), labels, meta["queries_per_input"], True, path,
                            augment)
    ids = input_ids(id_prefix, images.shape[0])
    before = sum(client.ledger.queries(i) for i in ids)
    generator = torch.Generator().manual_seed(seed)
    sent = copies * (1 + augment)  # images sent per input
    per_request = max(1, info.max_batch_size // sent)

    noisy = noise_sigma > 0 or copies > 1
    sends_ids = is_token_ids(images) and not noisy

    def batches():
        for start in range(0, images.shape[0], per_request):
            chunk = images[start:start + per_request]
            if is_token_ids(chunk) and noisy:
                chunk = client.embed(chunk, input_ids=ids[start:start + per_request])
            chunk = chunk.repeat_interleave(copies, dim=0)
            if noise_sigma > 0:
                chunk = noisy_copies(chunk, noise_sigma, generator, (info.value_min, info.value_max))
            if augment:  # each input, then its K copies: [n, 1 + K, ...] flattened input-major
                moved = augmented_copies(chunk.to(torch.float32), augment, generator,
                                         value_range=(info.value_min, info.value_max))
                chunk = torch.cat([chunk.to(torch.float32).unsqueeze(1),
                                   moved.view(chunk.shape[0], augment, *chunk.shape[1:])], dim=1).flatten(0, 1)
            yield chunk.contiguous(), [i for i in ids[start:start + per_request] for _ in range(sent)]

    streamed = client.stream_features(batches(), inputs="token_ids" if sends_ids else "images")
    step(f"fetching {images.shape[0] * sent} {id_prefix} features ({sent} per input) ...")
    parts = []
    with bar(desc=f"{id_prefix} features", total=images.shape[0] * sent, unit="input") as fetched:
        for part in streamed:
            parts.append(part)
            fetched.update(part.shape[0])
    features = np.concatenate(parts)
    spent = (sum(client.ledger.queries(i) for i in ids) - before) / images.shape[0]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"model_sha256": info.model_sha256, "dataset": dataset, "queries_per_input": spent}
        np.savez(path, features=features, meta=json.dumps(meta))
    return _feature_set(torch.from_numpy(features), labels, spent, False, path, augment)


def _feature_set(rows: torch.Tensor, labels: torch.Tensor, spent: float, from_cache: bool, path: Path | None,
                 augment: int) -> FeatureSet:
    """A FeatureSet from the rows in the order they were sent (with `augment` copies: each input, then its
    copies)."""
    if not augment:
        return FeatureSet(rows, labels, spent, from_cache, path)
    grouped = rows.view(labels.shape[0], 1 + augment, -1)
    return FeatureSet(grouped[:, 0].contiguous(), labels, spent, from_cache, path, grouped[:, 1:].contiguous())


def training_rows(features: torch.Tensor, labels: torch.Tensor, views: torch.Tensor | None = None,
                  indices: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) h trains on: the clean features [N, dim] of `indices` (all when None), then the features
    of those inputs' augmented copies, `views` [N, K, dim] (FeatureSet.views), labels repeated. A copy follows the
    input it was made from, so when `indices` is a fit part, no held-out input's copy leaks into it."""
    if indices is not None:
        features, labels = features[indices], labels[indices]
        views = None if views is None else views[indices]
    if views is None:
        return features, labels
    return (torch.cat([features, views.flatten(0, 1)]),
            torch.cat([labels, labels.repeat_interleave(views.shape[1])]))


def feature_spread(features: torch.Tensor) -> float:
    """RMS l2 distance of features [N, feature_dim] to their mean: the scale feature-space noise is set in,
    so a sigma given as a fraction of it means the same for encoders whose features differ in scale."""
    centred = features.to(torch.float64) - features.to(torch.float64).mean(dim=0)
    return float(centred.pow(2).sum(dim=1).mean().sqrt())


def build_mlp(feature_dim: int, num_classes: int, hidden: tuple[int, ...] = (256, 256)) -> nn.Sequential:
    """The downstream classifier h: Linear/ReLU layers only (what feature-space bounds support)."""
    layers: list[nn.Module] = []
    width = feature_dim
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class TrainConfig:
    """How h is trained. `noise_sigma` > 0 adds N(0, sigma^2 I) to each feature vector at every step (any head).

    `head`: "mlp" (the paper's ReLU MLP, cross-entropy), "linear", "lipschitz" or "orthogonal" (reaas_client.heads:
    trained with the distance-unit Lipschitz-margin loss at `margin` eps and `temperature`, both in feature-space
    units). `hidden`: the MLP's or the 1-Lipschitz body's widths (even there; ignored by linear). `margin_warmup`: share of the training steps
    over which the margin ramps linearly from 0 up to `margin` (0: the full margin from the first step).
    `consistency` > 0 and noise_sigma > 0 (it is a no-op without noise, so one config serves BC and SC): each step sees `consistency_copies` noisy views of every input and adds
    reaas_client.heads.consistency_penalty at that weight (Jeong & Shin 2020's lambda), for SC heads.
    "prototype": `prototypes` per class (reaas_client.heads), trained in features centred and scaled by their
    spread / sqrt(d) like the mlp's, with margin and temperature scaled alike, so they stay in feature units.
    `lr`: Adam's; None takes the kind's measured default (`learning_rate`).
    Defaults measured on PCA-64 digit features (lipschitz 512-512; benchmarks/results/heads.md): temperature 0.25
    (t = 4 per feature unit, issue 21), and the ramp keeps large eps from trading accuracy away early.
    """

    hidden: tuple[int, ...] = (256, 256)
    epochs: int = 60
    batch_size: int = 256
    lr: float | None = None
    weight_decay: float = 1e-4
    noise_sigma: float = 0.0
    seed: int = 0
    head: str = "mlp"
    margin: float = 1.0
    temperature: float = 0.25
    margin_warmup: float = 0.5
    consistency: float = 0.0
    consistency_copies: int = 2
    prototypes: int = 20

    @property
    def learning_rate(self) -> float:
        """`lr`, or the kind's default: 5e-2 for prototypes (a point moves a feature unit in ~20 steps; 1e-2 lost
        0.02 ACR and 3e-3 0.09 on PCA-64 digits at 100 epochs), 1e-3 for networks."""
        if self.lr is not None:
            return self.lr
        return 5e-2 if self.head == "prototype" else 1e-3

    def __post_init__(self) -> None:
        if self.head not in HEAD_KINDS:
            raise ValueError(f"unknown head {self.head!r}; valid: {', '.join(HEAD_KINDS)}")
        if self.margin < 0 or self.temperature <= 0:
            raise ValueError(f"need margin >= 0 and temperature > 0, got {self.margin}, {self.temperature}")
        if self.consistency < 0 or self.consistency_copies < 2:
            raise ValueError(f"need consistency >= 0 and >= 2 copies, got {self.consistency}, "
                             f"{self.consistency_copies}")
        if self.prototypes < 1 or (self.lr is not None and self.lr <= 0):
            raise ValueError(f"need >= 1 prototype per class and lr > 0, got {self.prototypes}, {self.lr}")
        if not 0 <= self.margin_warmup <= 1:
            raise ValueError(f"margin_warmup must be in [0, 1], got {self.margin_warmup}")


def copy_views(inputs: torch.Tensor, copies_per_input: int, views: int, generator: torch.Generator) -> torch.Tensor:
    """Row indices [views * len(inputs)], copy-major (what consistency_penalty expects), of `views` distinct copies
    of each input, drawn at random: input i's copies are rows i * copies_per_input ... + copies_per_input - 1."""
    picks = torch.rand((inputs.shape[0], copies_per_input), generator=generator).argsort(dim=1)[:, :views]
    return (inputs[:, None] * copies_per_input + picks).T.flatten()


def train_classifier(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     config: TrainConfig = TrainConfig(), *, copies_per_input: int = 1) -> nn.Sequential:
    """Train h of kind `config.head` on `features` [N, feature_dim] (Adam, cosine schedule).

    `copies_per_input` > 1: the rows are noisy copies made before h saw them (SEaaS-SC's 25 images clip(x + e) per
    training input, their features consecutive, input-major). With `config.consistency` > 0 an epoch then walks
    over the inputs and each step takes `consistency_copies` distinct copies of each input as its noisy views (the
    noise is already in them, so none is added); without consistency every row is a sample of its own.

    "mlp": cross-entropy on features centred and scaled by their spread (encoders' feature scales differ by
    orders of magnitude); the affine map is then folded into h's first Linear. "linear" / "lipschitz": the
    Lipschitz-margin loss on centred, unscaled features (a scale would change the Lipschitz constant in feature
    units); the centring is folded into the first bias and AOL layers are materialised. "prototype": the
    prototype loss on features centred and scaled like the mlp's, the prototypes mapped back to raw units at the
    end. Either way the returned h takes raw features and is a Sequential of Linear / ReLU / MaxMin (or Linear ->
    ClassMax) that bounds/ certifies. Runs on CUDA when available; returns h on the CPU in eval mode.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    features = features.to(torch.float32)
    mean = features.mean(dim=0)
    if config.head in ("mlp", "prototype"):
        scale = max(feature_spread(features), 1e-12) / features.shape[1] ** 0.5  # unit variance per coordinate
        model = (build_mlp(features.shape[1], num_classes, config.hidden) if config.head == "mlp" else
                 PrototypeHead(initial_prototypes((features - mean) / scale, labels, num_classes, config.prototypes,
                                                  generator), config.prototypes))
    else:
        scale = 1.0
        model = build_margin_head(config.head, features.shape[1], num_classes, config.hidden)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    grouped = copies_per_input > 1 and config.consistency > 0
    if grouped and (features.shape[0] % copies_per_input or copies_per_input < config.consistency_copies):
        raise ValueError(f"{features.shape[0]} rows are not groups of {copies_per_input} copies, or fewer copies "
                         f"than the {config.consistency_copies} consistency views")
    views = config.consistency_copies if config.consistency > 0 and (config.noise_sigma > 0 or grouped) else 1
    samples = features.shape[0] // copies_per_input if grouped else features.shape[0]
    steps_per_epoch = max(1, -(-samples // config.batch_size))
    total_steps = config.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps)
    warmup_steps = config.margin_warmup * total_steps
    step = 0
    model.train()
    for _ in bar(range(config.epochs), desc=f"training h ({config.head})", unit="epoch", leave=False):
        order = torch.randperm(samples, generator=generator)
        for start in range(0, samples, config.batch_size):
            batch = order[start:start + config.batch_size]
            if grouped:
                rows = copy_views(batch, copies_per_input, views, generator)
                inputs, targets = features[rows], labels[rows]
            else:
                inputs, targets = features[batch].repeat(views, 1), labels[batch].repeat(views)
            if config.noise_sigma > 0:
                inputs = inputs + config.noise_sigma * torch.randn(inputs.shape, generator=generator)
            inputs = ((inputs - mean) / scale).to(device)
            targets = targets.to(device)
            margin = config.margin * min(1.0, step / warmup_steps) if warmup_steps > 0 else config.margin
            if config.head == "mlp":
                logits = model(inputs)
                loss = nn.functional.cross_entropy(logits, targets)
            elif config.head == "prototype":  # distances in scaled units: margin and temperature scale alike
                temperature = config.temperature / scale
                logits = model(inputs) if views > 1 else None  # only the consistency term reads them
                distance = model.certified_distance(inputs, targets, PROTOTYPE_SOFTNESS * temperature)
                loss = prototype_margin_loss(distance, margin=margin / scale, temperature=temperature)
            else:  # the AOL or orthogonal body is 1-Lipschitz by construction, so L_body = 1 while training
                logits = model(inputs)
                loss = lipschitz_margin_loss(logits, targets, model[-1].weight, margin=margin,
                                             temperature=config.temperature)
            if views > 1:
                loss = loss + consistency_penalty(logits, views, config.consistency)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
    if config.head == "prototype":
        return finalize_prototype_head(model, mean, scale)
    if config.head != "mlp":
        return finalize_margin_head(model, mean)
    model = model.cpu().eval()
    first = model[0]
    with torch.no_grad():  # h(z) = g((z - mean) / scale): fold into the first layer, W' = W / s, b' = b - W' mean
        first.weight.div_(scale)
        first.bias.sub_(first.weight @ mean)
    return model


def accuracy(model: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Clean accuracy of h on features [N, feature_dim]."""
    with torch.no_grad():
        return float((model(features.to(torch.float32)).argmax(1) == labels).float().mean())
