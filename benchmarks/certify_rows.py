"""The rows of bench-certify: one encoder x one certification path, every row on the same test inputs.

Each row is a `reaas_client.pipelines.run_path` run (the client's own pipeline, over a background server) plus
an l2 attack on the row's classifier h(f(.)) on the same inputs (benchmarks.attack_radius). Everything a row
chooses is chosen as a client would, never on test inputs: REaaS-BC's head (kind x margin, and the paper's MLP
for the paper's encoders) and REaaS-SC's sigma on held-out *training* features. SEaaS-SC's sigma is chosen on a
grid at reduced N on the first test inputs: an advantage the baseline gets, said in the report.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from benchmarks.attack_radius import AttackConfig, Clip, attack_radius
from benchmarks.environment import markdown_table
from reaas_client.background_server import background_server
from reaas_client.client import EncoderClient
from reaas_client.downstream import (
    TrainConfig,
    feature_spread,
    fetch_features,
)
from reaas_client.head_selection import HeadSearch
from reaas_client.metrics import RunSummary, summarize
from reaas_client.pipelines import PathConfig, PathResult, run_path
from reaas_client.smoothing_selection import CONSISTENCY_WEIGHT, better_than_majority, smoothing_candidates
from reaas_client.smoothing_selection import select_smoothing as choose_smoothing


@dataclass(frozen=True)
class Data:
    """Training images and the test images in class-balanced order: any prefix is a stratified subset, so the
    shared subset of `test_size` inputs is `test_images[:test_size]` for every row. Text: the "images" are token
    ids [N, max_length] made with `vocabulary`, which every served text encoder must share (checked per row)."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    test_size: int
    vocabulary: object | None = None  # robust_pretrain.text_input.Vocabulary for text

    @property
    def is_text(self) -> bool:
        return self.vocabulary is not None

    def check_served(self, client: EncoderClient) -> None:
        """Refuse an encoder whose modality or vocabulary does not fit the data (its ids would mean other words)."""
        modality = client.info().modality
        if modality != ("text" if self.is_text else "image"):
            raise ValueError(f"{self.name} does not fit an encoder that reads {modality}")
        if self.is_text and client.vocabulary() != self.vocabulary:
            raise ValueError(f"the served text encoder's vocabulary differs from the one {self.name} was tokenized "
                             "with; run text encoders that share one vocabulary")


@dataclass(frozen=True)
class Encoder:
    """An encoder to serve: a shipped demo kind (`reaas-server --demo-kind`) or a checkpoint path."""

    name: str
    kind: str | None = None
    checkpoint: Path | None = None

    def server_args(self) -> dict:
        if self.checkpoint is not None:
            return {"checkpoint": self.checkpoint}
        return {"extra_args": ("--demo-kind", self.kind)}

    def load(self):
        """The served checkpoint, locally (for the white-box attack)."""
        from robust_pretrain import load_checkpoint, load_demo_encoder

        return load_checkpoint(self.checkpoint) if self.checkpoint is not None else load_demo_encoder(self.kind)


@dataclass(frozen=True)
class Settings:
    """Every knob of a bench-certify run (parsed once from the flags)."""

    feature_n: int = 100_000
    seaas_n: int = 100_000
    grid_n: int = 2_000
    grid_test_size: int = 30
    holdout: int = 200
    feature_sigma_fractions: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4)
    image_sigmas: tuple[float, ...] = (0.25, 0.5, 1.0)
    search: HeadSearch = field(default_factory=HeadSearch)
    mlp_head_encoders: tuple[str, ...] = ("spectral", "nonrobust", "adversarial")
    all_test_encoders: tuple[str, ...] = ()
    margin_train: TrainConfig = field(default_factory=TrainConfig)  # temperature in the margins' unit
    margins_in_spread: bool = False  # search.margins are multiples of the training features' spread
    sc_heads: tuple[str, ...] = ("selected", "mlp", "mlp+cr")  # REaaS-SC head candidates ("selected" = REaaS-BC's choice)
    sc_train: TrainConfig = field(default_factory=TrainConfig)  # the paper's MLP (REaaS-SC's "mlp" candidate)
    # SEaaS-SC's head: the paper's MLP on 25 noisy copies per training image, with consistency regularisation over
    # two of them per step (at full strength: through pca, N 2 000, 200 class-balanced digits, ACR 1.004 -> 1.039 at
    # sigma 0.5 px and 1.050 -> 1.139 at 1 px)
    seaas_train: TrainConfig = field(default_factory=lambda: TrainConfig(consistency=CONSISTENCY_WEIGHT))
    attack: AttackConfig = field(default_factory=AttackConfig)
    bound: str = ""
    seed: int = 0
    augment: int = 0  # K augmented copies of each training image for the REaaS heads (1 + K queries each)
    cache_dir: Path = Path("runs") / "bench-certify" / "feature_cache"
    log_dir: Path = Path("runs") / "bench-certify"


@dataclass(frozen=True)
class Row:
    """One table row on the shared test subset: the run (records, h), the attack radius per input, and the
    encoder's description. `attack_on`: which classifier was attacked (what the certificate is about for BC)."""

    encoder: str
    model_id: str
    service: str
    head: str
    summary: RunSummary
    result: PathResult = field(repr=False)
    attack: torch.Tensor = field(repr=False)
    attack_s: float
    attack_on: str
    note: str = ""


@dataclass(frozen=True)
class EncoderReport:
    """What one encoder contributed: its rows, REaaS-BC on all test inputs (when asked), and its selection
    tables (markdown)."""

    rows: list[Row]
    bc_all: RunSummary | None
    tables: list[str]


def log_progress(message: str, started: float) -> None:
    """One progress line, stamped with the seconds since `started` (the long benchmarks print where they are)."""
    print(f"[{time.perf_counter() - started:7.0f} s] {message}", flush=True)


def _run(config: PathConfig, client: EncoderClient, data: Data, count: int, settings: Settings,
         note: str = "") -> PathResult:
    return run_path(config, client, data.train_images, data.train_labels, data.test_images[:count],
                    data.test_labels[:count], data.num_classes, dataset=data.name, cache_dir=settings.cache_dir,
                    progress=True, note=note)


def prefix_summary(result: PathResult, count: int) -> RunSummary:
    """The row of `result` restricted to its first `count` test inputs."""
    records = result.records[:count]
    s = result.summary
    return summarize(records, service=s.service, dataset=s.dataset, queries_per_train_input=s.queries_per_train_input,
                     wall_s=sum(r.wall_s for r in records), train_wall_s=s.train_wall_s, note=s.note, extra=s.extra)


def _attacked_row(encoder: Encoder, model_id: str, result: PathResult, data: Data, settings: Settings, *,
                  clip: tuple[float, float] | None, note: str, started: float) -> Row:
    """The row on the shared subset, with the attack radius of h(f(.)) (h(f(clip(.))) for SEaaS) per input."""
    count = data.test_size
    loaded = encoder.load()
    pipeline: list[nn.Module] = ([Clip(*clip)] if clip else []) + [loaded.model, result.classifier]
    inputs = data.test_images[:count]
    if data.is_text:  # the threat model's input: the embedding matrix of the ids
        inputs = loaded.text.embed(inputs)
    t0 = time.perf_counter()
    radius = attack_radius(nn.Sequential(*pipeline), inputs, data.test_labels[:count], settings.attack)
    summary = prefix_summary(result, count)
    log_progress(f"  {summary.service} {encoder.name}: ACR {summary.acr:.3f}, attack radius {radius.mean():.3f} "
         f"({time.perf_counter() - t0:.0f} s)", started)
    return Row(encoder.name, model_id, summary.service, summary.extra.get("head", ""), summary, result, radius,
               time.perf_counter() - t0, "h(f(clip(x)))" if clip else "h(f(x))", note)


def select_smoothing(features: torch.Tensor, labels: torch.Tensor, num_classes: int, spread: float,
                     settings: Settings, heads: dict[str, TrainConfig], views: torch.Tensor | None = None
                     ) -> tuple[str, float, str]:
    """REaaS-SC's (head, sigma), chosen as a client would (reaas_client.smoothing_selection, as the demo does) over
    the settings' fractions of the feature spread, and the grid as a markdown table."""
    chosen = choose_smoothing(features, labels, num_classes, heads,
                              [f * spread for f in settings.feature_sigma_fractions], holdout=settings.holdout,
                              n=settings.grid_n, seed=settings.seed, views=views)
    rows = [["**yes**" if (s.head, s.sigma) == (chosen.head, chosen.sigma) else "", s.head, f"{s.sigma / spread:g}",
             f"{s.sigma:.4g}", chosen.holdout, chosen.n, f"{s.acr:.4f}", f"{s.accuracy:.3f}"] for s in chosen.scores]
    table = markdown_table(["chosen", "head", "fraction of spread", "sigma (feature units)",
                            "held-out training inputs", "N", "feature-space ACR (mean R_F)", "smoothed accuracy"],
                           rows)
    return chosen.head, chosen.sigma, table


def _selection_table(result: PathResult) -> str:
    scores = result.selection.scores if result.selection else ()
    rows = [["**yes**" if s.config == result.selection.chosen else "", s.config.head,
             "" if s.config.head == "mlp" else f"{s.config.margin:g}", f"{s.validation_accuracy:.3f}",
             f"{s.validation_acr:.3f}"] for s in scores]
    return markdown_table(["chosen", "head", "margin eps", "val clean acc", "val ACR (feature radius)"], rows)


def reaas_rows(encoder: Encoder, data: Data, settings: Settings, started: float) -> EncoderReport:
    """REaaS-BC (head selected on held-out training features) and REaaS-SC (sigma selected the same way)."""
    log = settings.log_dir / f"server-reaas-{encoder.name}.log"
    with background_server("reaas", log_path=log, **encoder.server_args()) as address, \
            EncoderClient(address, timeout_s=7200.0) as client:
        info = client.info()
        data.check_served(client)
        log_progress(f"{encoder.name}: {info.model_id} ({info.description}); Lipschitz <= {info.lipschitz_upper:.4g}",
             started)
        fetched = fetch_features(client, data.train_images, data.train_labels, dataset=data.name,
                                 cache_dir=settings.cache_dir, augment=settings.augment, seed=settings.seed)
        spread = feature_spread(fetched.features)
        heads = settings.search.heads
        if encoder.name in settings.mlp_head_encoders and "mlp" not in heads:
            heads = ("mlp", *heads)
        unit = spread if settings.margins_in_spread else 1.0
        search = replace(settings.search, heads=heads, margins=tuple(m * unit for m in settings.search.margins))
        margin_train = replace(settings.margin_train, temperature=settings.margin_train.temperature * unit)
        bc_count = len(data.test_images) if encoder.name in settings.all_test_encoders else data.test_size
        common = {"bound": settings.bound, "seed": settings.seed, "augment": settings.augment}
        bc = _run(PathConfig("reaas-bc", search=search, train=margin_train, **common), client, data,
                  bc_count, settings, note="head selected on held-out training features")
        # "selected": BC's head (its kind in the rows table); "mlp": the paper's MLP as SEaaS-SC trains it
        candidates = smoothing_candidates(settings.sc_heads, selected=bc.selection.chosen, mlp=settings.sc_train,
                                          margin=margin_train)
        sc_name, sigma, sigma_table = select_smoothing(fetched.features, fetched.labels, data.num_classes, spread,
                                                       settings, candidates, fetched.views)
        sc_train = candidates[sc_name]
        log_progress(f"  REaaS-SC {encoder.name}: sigma_F {sigma:.4g} ({sigma / spread:g} x spread)", started)
        sc = _run(PathConfig("reaas-sc", sigma=sigma, n=settings.feature_n, train=sc_train, **common),
                  client, data, data.test_size, settings,
                  note=f"sigma_F {sigma:.3g} ({sigma / spread:g} x spread), N {settings.feature_n}")
    rows = [_attacked_row(encoder, info.model_id, result, data, settings, clip=None, note=result.summary.note,
                          started=started) for result in (bc, sc)]
    tables = [f"#### {encoder.name}: REaaS-BC head candidates (validation = held-out training features)\n\n"
              + _selection_table(bc),
              f"#### {encoder.name}: REaaS-SC head x sigma grid (held-out training features, no queries)\n\n"
              + sigma_table]
    bc_all = bc.summary if bc_count > data.test_size else None
    return EncoderReport(rows, bc_all, tables)


def seaas_row(encoder: Encoder, data: Data, settings: Settings, started: float) -> EncoderReport:
    """SEaaS-SC through `encoder` served as a standard (Feature-only) service: sigma on a grid at N = grid_n on
    the first grid_test_size test inputs (by ACR, among the sigmas whose smoothed classifier beats the majority
    class), then N = seaas_n at that sigma on the shared subset."""
    log = settings.log_dir / f"server-seaas-{encoder.name}.log"
    with background_server("seaas", log_path=log, **encoder.server_args()) as address, \
            EncoderClient(address, timeout_s=7200.0) as client:
        info = client.info()
        data.check_served(client)
        unit = "(embedding units)" if data.is_text else "px"
        common = {"seed": settings.seed, "train": settings.seaas_train}
        grid = []
        for sigma in settings.image_sigmas:
            log_progress(f"SEaaS-SC {encoder.name}: grid sigma {sigma:g}, N {settings.grid_n}", started)
            grid.append(_run(PathConfig("seaas-sc", sigma=sigma, n=settings.grid_n, **common), client, data,
                             settings.grid_test_size, settings))
        best = max(better_than_majority(grid, lambda r: r.summary.certified_accuracy[0.0],
                                         data.test_labels[: settings.grid_test_size]), key=lambda r: r.summary.acr)
        sigma = float(best.summary.extra["sigma"])
        log_progress(f"SEaaS-SC {encoder.name}: sigma {sigma:g}, N {settings.seaas_n} on {data.test_size} inputs", started)
        full = _run(PathConfig("seaas-sc", sigma=sigma, n=settings.seaas_n, **common), client, data,
                    data.test_size, settings, note=f"sigma {sigma:g} {unit} (grid at N {settings.grid_n}), "
                                                   f"N {settings.seaas_n}")
    row = _attacked_row(encoder, info.model_id, full, data, settings, clip=(info.value_min, info.value_max),
                        note=full.summary.note, started=started)
    table = markdown_table(
        [f"sigma ({'embedding units' if data.is_text else 'pixels'})", "test inputs", "N", "ACR", "smoothed clean acc", "h train acc"],
        [[r.summary.extra["sigma"], r.summary.num_test, r.summary.extra["n"], f"{r.summary.acr:.3f}",
          f"{r.summary.certified_accuracy[0.0]:.3f}", f"{r.train_accuracy:.3f}"] for r in grid])
    return EncoderReport([row], None, [f"#### {encoder.name}: SEaaS-SC sigma grid (first {settings.grid_test_size} "
                                       f"test inputs, N = {settings.grid_n})\n\n" + table])


def parse_encoders(specs: Sequence[str]) -> list[Encoder]:
    """"pca" -> the shipped demo kind; anything with a "/" or ending in .safetensors -> a checkpoint path."""
    from robust_pretrain import DEMO_KINDS
    from robust_pretrain.demo import TEXT_DEMO_KINDS

    encoders = []
    for spec in specs:
        if spec in DEMO_KINDS + TEXT_DEMO_KINDS:
            encoders.append(Encoder(spec, kind=spec))
        else:
            path = Path(spec.removesuffix(".safetensors"))
            encoders.append(Encoder(path.name, checkpoint=path))
    return encoders
