"""The three certification paths the paper compares, end to end over the service.

| path      | training queries / input | test queries / input | certificate                                    |
|-----------|--------------------------|----------------------|------------------------------------------------|
| reaas-bc  | 1                        | 2                    | CROWN/IBP on h at f(x) -> R_F; F2IPerturb -> R |
| reaas-sc  | 1                        | 2                    | Cohen CERTIFY on h around f(x) -> R_F; F2I -> R |
| seaas-sc  | 25 (noisy copies)        | n0 + n               | Cohen CERTIFY on h(f(.)) around x, streamed    |

Every query goes through the `EncoderClient`, whose ledger gives each `InputRecord` its exact cost.

Text (README, "Text") runs the same paths: the inputs are token ids [N, max_length] (an integer tensor) instead of
images. The REaaS paths send the ids (Feature, F2IPerturb: still 2 queries); SEaaS-SC first asks the service for the
input's embedding matrix (Embed, 1 query) and smooths in embedding space around it, as it smooths around an image.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from bounds import certify_feature_radius
from reaas_client.downstream import (
    DEFAULT_CACHE_DIR,
    FeatureSet,
    TrainConfig,
    accuracy,
    encoder_inputs,
    fetch_features,
    input_ids,
    is_token_ids,
    training_rows,
)
from reaas_client.downstream import train_classifier as _train_head
from reaas_client.head_selection import HeadSearch, HeadSelection, select_head
from reaas_client.metrics import InputRecord, RunSummary, summarize
from reaas_client.progress import bar, reporting, step
from reaas_client.seaas import WIRE_DTYPES, StreamedImageSamples
from reaas_client.smoothing import GaussianFeatureSamples, Smooth, SmoothCertificate, label_classifier

if TYPE_CHECKING:
    from pathlib import Path

    from reaas_client import EncoderClient, QueryLedger

PATHS: tuple[str, ...] = ("reaas-bc", "reaas-sc", "seaas-sc")
SERVICE_NAMES = {"reaas-bc": "REaaS-BC", "reaas-sc": "REaaS-SC", "seaas-sc": "SEaaS-SC"}
SEAAS_TRAIN_COPIES = 25
"""Noise-augmented copies of each training input the SEaaS client sends (the paper's count)."""


@dataclass(frozen=True)
class SmoothingConfig:
    """Cohen et al.'s CERTIFY parameters (the paper's defaults); `seed` makes every certificate replayable.
    `device`: where REaaS-SC draws its feature-space noise ("cuda" draws other, equally valid, noise than "cpu", so a
    certificate replays on the device it was made on); SEaaS-SC's image noise is always drawn on the CPU."""

    sigma: float
    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001
    seed: int = 0
    batch_size: int = 10_000
    device: str = "cpu"


@dataclass(frozen=True)
class TrainedClassifier:
    """h and what training it cost: `queries_per_input` training queries per training input. `selection`:
    the candidates scored on held-out training features when the head was selected (None otherwise)."""

    model: nn.Sequential
    features: FeatureSet = field(repr=False)
    queries_per_input: float
    selection: HeadSelection | None = field(default=None, repr=False)


def train_downstream(
    path: str,
    client: EncoderClient,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    dataset: str,
    sigma: float = 0.0,
    config: TrainConfig | None = None,
    cache_dir: Path | None = DEFAULT_CACHE_DIR,
    search: HeadSearch | None = None,
    augment: int = 0,
) -> TrainedClassifier:
    """Train h for `path`: reaas-bc on clean features; reaas-sc with N(0, sigma^2) added to the features;
    seaas-sc on the features of 25 noisy copies clip(x + e) per training image (noise in image space,
    Gaussian data augmentation through the API; epochs divided by 25, see below; with `config.consistency` > 0,
    consistency regularisation over two of an input's 25 copies per step, as REaaS-SC's "+cr" heads train on two
    noisy views). `augment` K (REaaS paths):
    h also trains on the features of K shifted / elastic copies of each training image (reaas_client.augment),
    1 + K queries per training input, with the same epochs (so each epoch is 1 + K times the steps).

    `search` (reaas-bc only): select the head kind and margin on held-out training features (no extra query,
    no test input; reaas_client.head_selection) instead of training `config` as it is."""
    _check_path(path)
    if search is not None and path != "reaas-bc":
        raise ValueError("head selection scores BC feature radii; it is offered for reaas-bc only")
    config = config or TrainConfig()
    if augment and path == "seaas-sc":
        raise ValueError("augment is for the REaaS paths; seaas-sc already trains on 25 noisy copies per input")
    if path == "seaas-sc":
        fetched = fetch_features(client, images, labels, dataset=dataset, cache_dir=cache_dir,
                                 copies=SEAAS_TRAIN_COPIES, noise_sigma=sigma, seed=config.seed)
        # Each noisy copy is a fresh view of its input: 25 copies per pass is 25 epochs of augmentation, so
        # the pass count is divided by 25 to give h the same number of optimiser steps as on the REaaS paths.
        # With consistency regularisation an epoch walks over the inputs instead (two copies of each per step).
        copies = SEAAS_TRAIN_COPIES
        epochs = config.epochs if config.consistency > 0 else max(1, -(-config.epochs // SEAAS_TRAIN_COPIES))
        config = replace(config, noise_sigma=0.0, epochs=epochs)
    else:
        fetched = fetch_features(client, images, labels, dataset=dataset, cache_dir=cache_dir, augment=augment,
                                 seed=config.seed)
        copies = 1
        noise = sigma if path == "reaas-sc" else 0.0
        config = replace(config, noise_sigma=noise)
    if search is not None:
        step(f"selecting h among {len(search.candidates(config))} head candidates on held-out training features ...")
        selection = select_head(fetched.features, fetched.labels, num_classes, search.candidates(config),
                                validation_fraction=search.validation_fraction, min_accuracy=search.min_accuracy,
                                method=search.method, seed=config.seed, views=fetched.views)
        return TrainedClassifier(selection.model, fetched, fetched.queries_per_input, selection)
    rows, row_labels = training_rows(fetched.features, fetched.labels, fetched.views)
    step(f"training h ({_head_name(config)}, {config.epochs} epochs) on {rows.shape[0]} features ...")
    model = _train_head(rows, row_labels, num_classes, config, copies_per_input=copies)
    return TrainedClassifier(model, fetched, fetched.queries_per_input)


def certify_reaas_bc(client: EncoderClient, h: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                     method: str = "auto", bound: str = "", id_prefix: str = "reaas-bc-test",
                     batch_size: int = 256, progress: bool = False) -> list[InputRecord]:
    """REaaS-BC: Feature -> f(x); R_F of h at f(x) by `method` (bounds.CERTIFY_METHODS); F2IPerturb -> R.

    Exactly 2 queries per test input. Sound: h(f(x + d)) = h(f(x)) for every ||d||_2 < R.
    """
    records: list[InputRecord] = []
    with bar(total=images.shape[0], desc="REaaS-BC", unit="input", enabled=progress) as shown:
        for start in range(0, images.shape[0], batch_size):
            batch, ids, started, before = _begin_batch(client, images, start, batch_size, id_prefix)
            features = torch.from_numpy(client.features(**encoder_inputs(batch), input_ids=ids))
            certificate = certify_feature_radius(h, features, method=method)
            feature_radius = certificate.feature_radius.to(torch.float64)
            reply = client.f2i_perturb(feature_radii=feature_radius.numpy(), **encoder_inputs(batch), input_ids=ids,
                                       bound=bound)
            records += _records(client.ledger, ids, before, labels[start:start + len(ids)],
                                certificate.prediction.tolist(), reply.image_radius.tolist(),
                                feature_radius.tolist(), started)
            shown.update(len(ids))
    return records


def certify_reaas_sc(client: EncoderClient, h: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     smoothing: SmoothingConfig, *, bound: str = "", id_prefix: str = "reaas-sc-test",
                     batch_size: int = 256, progress: bool = False) -> list[InputRecord]:
    """REaaS-SC: Feature -> f(x); Cohen CERTIFY of h with noise added to f(x) locally -> R_F; F2I -> R.

    Exactly 2 queries per test input (the n0 + n samples never leave the client). With probability at
    least 1 - alpha per input, a non-abstained prediction is certified on the image-space ball of radius R.
    """
    records: list[InputRecord] = []
    h = _on_smoothing_device(h, smoothing)  # once, not a copy per input in certify_features
    with bar(total=images.shape[0], desc=f"REaaS-SC sigma={smoothing.sigma:g}", unit="input",
             enabled=progress) as shown:
        for start in range(0, images.shape[0], batch_size):
            batch, ids, started, before = _begin_batch(client, images, start, batch_size, id_prefix)
            features = torch.from_numpy(client.features(**encoder_inputs(batch), input_ids=ids))
            certificates = []
            for offset in range(len(ids)):  # one at a time, so the progress bar moves per input
                certificates += certify_features(h, features[offset:offset + 1], smoothing,
                                                 first_index=start + offset)
                shown.update(1)
            feature_radius = np.array([c.radius for c in certificates], dtype=np.float64)
            reply = client.f2i_perturb(feature_radii=feature_radius, **encoder_inputs(batch), input_ids=ids,
                                       bound=bound)
            records += _records(client.ledger, ids, before, labels[start:start + len(ids)],
                                [c.prediction for c in certificates], reply.image_radius.tolist(),
                                feature_radius.tolist(), started)
    return records


def _on_smoothing_device(h: nn.Module, smoothing: SmoothingConfig) -> nn.Module:
    """h itself where it already lives on the smoothing device, else a copy moved there (the caller's h stays put)."""
    device = torch.device(smoothing.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return h if next(h.parameters()).device == device else copy.deepcopy(h).to(device)


def certify_features(h: nn.Module, features: torch.Tensor, smoothing: SmoothingConfig, *,
                     first_index: int = 0) -> list[SmoothCertificate]:
    """Cohen CERTIFY of h around each feature vector [batch, feature_dim], locally (no query).

    The feature-space half of REaaS-SC; input i uses the generator of test index `first_index + i`, so a
    certificate is the same whether computed here alone or inside `certify_reaas_sc`. h runs where the noise is
    drawn (`smoothing.device`; a copy of h when it lives elsewhere, so the caller's h stays put).
    """
    h = _on_smoothing_device(h, smoothing)
    smooth = Smooth(label_classifier(h), _num_classes(h), smoothing.sigma)
    return [smooth.certify(GaussianFeatureSamples(feature, smoothing.sigma, smoothing.batch_size), smoothing.n0,
                           smoothing.n, smoothing.alpha,
                           _generator(smoothing.seed, first_index + offset, smoothing.device))
            for offset, feature in enumerate(features)]


def certify_seaas_sc(client: EncoderClient, h: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     smoothing: SmoothingConfig, *, id_prefix: str = "seaas-sc-test", stream_batch_size: int = 0,
                     wire_dtype: str = "float32", progress: bool = False) -> list[InputRecord]:
    """SEaaS-SC: Cohen CERTIFY of h(f(q(clip(.)))) around x; the n0 + n noisy images of every test input are
    streamed through StreamFeatures in batches (`stream_batch_size`, 0 = the server's max batch size), each
    rounded by q to `wire_dtype` (reaas_client.seaas.WireRounding; "float32": no rounding).

    Exactly n0 + n queries per test input (text: token ids [N, L] as inputs, plus 1 Embed query for the embedding
    matrix the noise is added to, in embedding units; the service's value range clips it). With probability at least 1 - alpha per input, a non-abstained
    prediction is certified on the image-space ball of radius sigma * Phi^-1(p_A_lower): q is deterministic
    and applied after the noise, so it is part of the base classifier, for which Cohen et al.'s theorem holds.
    """
    info = client.info()
    per_request = stream_batch_size or info.max_batch_size
    smooth = Smooth(label_classifier(h), _num_classes(h), smoothing.sigma)
    records: list[InputRecord] = []
    for index in bar(range(images.shape[0]), desc=f"SEaaS-SC sigma={smoothing.sigma:g}", unit="input",
                     enabled=progress):
        batch, ids, started, before = _begin_batch(client, images, index, 1, id_prefix)
        if is_token_ids(batch):
            batch = client.embed(batch, input_ids=ids)
        source = StreamedImageSamples(client, batch[0], ids[0], smoothing.sigma, per_request,
                                      (info.value_min, info.value_max), wire_dtype)
        certificate = smooth.certify(source, smoothing.n0, smoothing.n, smoothing.alpha,
                                     _generator(smoothing.seed, index))
        records += _records(client.ledger, ids, before, labels[index:index + 1], [certificate.prediction],
                            [certificate.radius], [float("nan")], started)
    return records


def _check_path(path: str) -> None:
    if path not in PATHS:
        raise ValueError(f"unknown certification path {path!r}; choose one of {', '.join(PATHS)}")


def _head_name(train: TrainConfig) -> str:
    return train.head if train.head == "mlp" else f"{train.head} eps={train.margin:g}"


def _num_classes(h: nn.Module) -> int:
    return [m for m in h.modules() if isinstance(m, nn.Linear)][-1].out_features


def _generator(seed: int, index: int, device: str = "cpu") -> torch.Generator:
    """One generator per test input, so a certificate does not depend on batching or on other inputs."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)


_Cost = dict[str, tuple[dict[str, int], int, int]]


def _costs(ledger: QueryLedger, ids: Sequence[str]) -> _Cost:
    """Per id: (queries per RPC, bytes up, bytes down) as the ledger has them now."""
    wanted = set(ids)
    costs: _Cost = {i: ({}, 0, 0) for i in wanted}
    for row in ledger.rows():
        if row.input_id in wanted:
            queries, up, down = costs[row.input_id]
            queries[row.rpc] = row.queries
            costs[row.input_id] = (queries, up + row.request_bytes, down + row.response_bytes)
    return costs


def _begin_batch(client: EncoderClient, images: torch.Tensor, start: int, size: int,
                 id_prefix: str) -> tuple[torch.Tensor, list[str], float, _Cost]:
    batch = images[start:start + size]
    batch = (batch if is_token_ids(batch) else batch.to(torch.float32)).contiguous()
    ids = input_ids(id_prefix, batch.shape[0], start)
    return batch, ids, time.perf_counter(), _costs(client.ledger, ids)


def _records(ledger: QueryLedger, ids: list[str], before: _Cost, labels: torch.Tensor, predictions: list[int],
             image_radii: list[float], feature_radii: list[float], started: float) -> list[InputRecord]:
    """Records for one batch: costs are ledger differences, so repeated runs on one client never mix."""
    wall = (time.perf_counter() - started) / len(ids)
    after = _costs(ledger, ids)
    records = []
    for i, input_id in enumerate(ids):
        (q0, up0, down0), (q1, up1, down1) = before[input_id], after[input_id]
        queries = {rpc: q1[rpc] - q0.get(rpc, 0) for rpc in q1 if q1[rpc] != q0.get(rpc, 0)}
        records.append(InputRecord(input_id, int(labels[i]), int(predictions[i]), float(image_radii[i]),
                                   float(feature_radii[i]), queries, up1 - up0, down1 - down0, wall))
    return records


@dataclass(frozen=True)
class PathConfig:
    """One certification run: which path and its knobs (what the CLI, demo and benchmark configure).

    `sigma`: SC noise level, in feature-space units for reaas-sc and in pixel units for seaas-sc (ignored by
    reaas-bc). `n`: SC samples; for reaas-sc they are drawn locally and cost no query, so 10^6 is fine (they are
    classified `sample_batch_size` at a time, so memory stays bounded). `method`: feature-space bound for
    reaas-bc ("crown" or "ibp"). `bound`: the F2IPerturb bound ("" for the server's default). `train`: the
    head (kind, margin, widths); `search`: select the head on held-out training features instead (reaas-bc).
    `seaas_wire_dtype`: how seaas-sc's noisy test images travel (reaas_client.seaas.WIRE_DTYPES). `augment`: K
    shifted / elastic copies of each training image (REaaS paths; 1 + K training queries per input).
    """

    path: str
    sigma: float = 0.25
    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001
    method: str = "auto"
    bound: str = ""
    seed: int = 0
    batch_size: int = 256
    train: TrainConfig = field(default_factory=TrainConfig)
    search: HeadSearch | None = None
    sample_batch_size: int = 10_000
    seaas_wire_dtype: str = "float32"
    augment: int = 0

    def __post_init__(self) -> None:
        _check_path(self.path)
        if self.augment < 0 or (self.augment and self.path == "seaas-sc"):
            raise ValueError(f"augment must be >= 0 and is for the REaaS paths, got {self.augment} for {self.path}")
        if self.seaas_wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"unknown seaas wire dtype {self.seaas_wire_dtype!r}; choose one of "
                             f"{', '.join(WIRE_DTYPES)}")
        if self.search is not None and self.path != "reaas-bc":
            raise ValueError("head selection scores BC feature radii; it is offered for reaas-bc only")

    @property
    def smoothing(self) -> SmoothingConfig:
        return SmoothingConfig(self.sigma, self.n0, self.n, self.alpha, self.seed, self.sample_batch_size)


@dataclass(frozen=True)
class PathResult:
    """A run's table row, its per-input records, the trained h, and h's accuracy on the features it was
    trained on (the noisy copies' features for seaas-sc), and the head selection when there was one."""

    summary: RunSummary
    records: list[InputRecord]
    train_accuracy: float
    classifier: nn.Sequential = field(repr=False)
    selection: HeadSelection | None = field(default=None, repr=False)


def run_path(config: PathConfig, client: EncoderClient, train_images: torch.Tensor, train_labels: torch.Tensor,
             test_images: torch.Tensor, test_labels: torch.Tensor, num_classes: int, *, dataset: str,
             cache_dir: Path | None = DEFAULT_CACHE_DIR, progress: bool = False, note: str = "") -> PathResult:
    """Train h for `config.path` over the service, certify every test input, summarise."""
    started = time.perf_counter()
    name = SERVICE_NAMES[config.path]
    with reporting() if progress else contextlib.nullcontext():
        step(f"{name}: training h on {train_images.shape[0]} training inputs ...")
        trained = train_downstream(config.path, client, train_images, train_labels, num_classes, dataset=dataset,
                                   sigma=config.sigma, config=replace(config.train, seed=config.seed),
                                   cache_dir=cache_dir, search=config.search, augment=config.augment)
        step(f"{name}: certifying {test_images.shape[0]} test inputs ...")
    train_wall = time.perf_counter() - started
    started = time.perf_counter()
    tag = "" if config.path == "reaas-bc" else f"-s{config.sigma:g}"
    prefix = f"{config.path}{tag}-test"
    if config.path == "reaas-bc":
        records = certify_reaas_bc(client, trained.model, test_images, test_labels, method=config.method,
                                   bound=config.bound, id_prefix=prefix, batch_size=config.batch_size,
                                   progress=progress)
    elif config.path == "reaas-sc":
        records = certify_reaas_sc(client, trained.model, test_images, test_labels, config.smoothing,
                                   bound=config.bound, id_prefix=prefix, batch_size=config.batch_size,
                                   progress=progress)
    else:
        records = certify_seaas_sc(client, trained.model, test_images, test_labels, config.smoothing,
                                   id_prefix=prefix, wire_dtype=config.seaas_wire_dtype, progress=progress)
    summary = summarize(records, service=SERVICE_NAMES[config.path], dataset=dataset,
                        queries_per_train_input=trained.queries_per_input,
                        wall_s=time.perf_counter() - started, train_wall_s=train_wall, note=note,
                        extra={"sigma": "" if config.path == "reaas-bc" else f"{config.sigma:g}",
                               "method": config.method if config.path == "reaas-bc" else "cohen",
                               "n": "" if config.path == "reaas-bc" else str(config.n),
                               "wire": config.seaas_wire_dtype if config.path == "seaas-sc" else "float32",
                               "head": _head_name(trained.selection.chosen if trained.selection else config.train)})
    return PathResult(summary, records, accuracy(trained.model, trained.features.features,
                                                 trained.features.labels), trained.model, trained.selection)
