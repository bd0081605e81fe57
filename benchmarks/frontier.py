"""ACR against clean accuracy: each certification path swept over its own knob, on the same test inputs.

Why this table exists: on the text floor (text-pca is linear) REaaS-BC, REaaS-SC and SEaaS-SC certify the same
family of classifiers, linear functions of mean-pooled embeddings, and each path's knob (BC's margin eps, SC's
sigma) slides along one trade-off: more ACR for less clean accuracy. Ranking rows by ACR alone then ranks where each
path's selection happened to land on that curve, not the certification path. This benchmark sweeps every knob and
compares at matched accuracy: for each SEaaS-SC point that beats the majority class, the largest ACR a REaaS path
certifies at a clean accuracy at least as high.

Every point goes through the service as bench-certify's rows do (run_path: Feature, F2IPerturb, the noisy
StreamFeatures of SEaaS-SC; features cached in bench-certify's cache). Both SC paths use the same N (--n), so
neither gets tighter Clopper-Pearson bounds from more samples; bench-certify's rows run at N = 100 000. The knobs are
evaluated on the test inputs themselves: this is a characterisation of each path's reach, not a selection (that is
bench-certify's job, on held-out training features).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.certify import floats, load_data, names  # noqa: E402
from benchmarks.certify_rows import Data, Encoder, Settings, log_progress, parse_encoders  # noqa: E402
from benchmarks.environment import RESULTS, machine_summary, markdown_table, write_results  # noqa: E402
from reaas_client import EncoderClient  # noqa: E402
from reaas_client.background_server import background_server  # noqa: E402
from reaas_client.downstream import TrainConfig, feature_spread, fetch_features  # noqa: E402
from reaas_client.pipelines import PathConfig, PathResult, run_path  # noqa: E402

CACHE_DIR = Settings().cache_dir  # bench-certify's: the noisy SEaaS-SC training features are fetched once
LOG_DIR = Path("runs") / "bench-frontier"


@dataclass(frozen=True)
class FrontierPoint:
    """One (path, encoder, knob) run on the shared test inputs: its clean accuracy (abstain = wrong) and ACR."""

    path: str
    encoder: str
    knob: str
    clean_accuracy: float
    acr: float
    queries_per_test_input: float
    wall_s: float


@dataclass(frozen=True)
class Heads:
    """How h is trained on each path: the margin head of REaaS-BC (its eps is the swept knob), REaaS-SC's head
    (trained on noisy features at the swept sigma) and SEaaS-SC's MLP (the paper's, trained on noisy inputs)."""

    margin: TrainConfig
    reaas_sc: TrainConfig
    seaas_sc: TrainConfig


def _point(path: str, encoder: str, knob: str, result: PathResult) -> FrontierPoint:
    s = result.summary
    return FrontierPoint(path, encoder, knob, s.certified_accuracy[0.0], s.acr, s.queries_per_test_input,
                         s.wall_s + s.train_wall_s)


def _run(config: PathConfig, client: EncoderClient, data: Data) -> PathResult:
    return run_path(config, client, data.train_images, data.train_labels, data.test_images[:data.test_size],
                    data.test_labels[:data.test_size], data.num_classes, dataset=data.name, cache_dir=CACHE_DIR)


def reaas_points(encoder: Encoder, data: Data, heads: Heads, margins: Sequence[float],
                 fractions: Sequence[float], n: int, started: float) -> list[FrontierPoint]:
    """REaaS-BC at every margin and REaaS-SC at every sigma, both in multiples of the training features' spread."""
    points = []
    with background_server("reaas", log_path=LOG_DIR / f"server-reaas-{encoder.name}.log",
                           **encoder.server_args()) as address, EncoderClient(address, timeout_s=7200.0) as client:
        data.check_served(client)
        spread = feature_spread(fetch_features(client, data.train_images, data.train_labels, dataset=data.name,
                                               cache_dir=CACHE_DIR).features)
        for margin in margins:
            result = _run(PathConfig("reaas-bc", train=replace(heads.margin, margin=margin * spread)), client, data)
            points.append(_point("REaaS-BC", encoder.name, f"eps {margin:g} x spread", result))
            log_progress(f"REaaS-BC {encoder.name} eps {margin:g} x spread: {_describe(points[-1])}", started)
        for fraction in fractions:
            result = _run(PathConfig("reaas-sc", sigma=fraction * spread, n=n, train=heads.reaas_sc), client, data)
            points.append(_point("REaaS-SC", encoder.name, f"sigma_F {fraction:g} x spread", result))
            log_progress(f"REaaS-SC {encoder.name} sigma_F {fraction:g} x spread: {_describe(points[-1])}", started)
    return points


def seaas_points(encoder: Encoder, data: Data, heads: Heads, sigmas: Sequence[float], n: int,
                 started: float) -> list[FrontierPoint]:
    """SEaaS-SC through `encoder` served as a standard (Feature-only) service, at every input-space sigma."""
    points = []
    with background_server("seaas", log_path=LOG_DIR / f"server-seaas-{encoder.name}.log",
                           **encoder.server_args()) as address, EncoderClient(address, timeout_s=7200.0) as client:
        data.check_served(client)
        for sigma in sigmas:
            result = _run(PathConfig("seaas-sc", sigma=sigma, n=n, train=heads.seaas_sc), client, data)
            points.append(_point("SEaaS-SC", encoder.name, f"sigma {sigma:g}", result))
            log_progress(f"SEaaS-SC {encoder.name} sigma {sigma:g}: {_describe(points[-1])}", started)
    return points


def _describe(point: FrontierPoint) -> str:
    return f"clean acc {point.clean_accuracy:.3f}, ACR {point.acr:.3f} ({point.wall_s:.0f} s)"


def matched_accuracy(points: Sequence[FrontierPoint], majority: float) -> tuple[str, bool]:
    """For each SEaaS-SC point above the majority class: the largest ACR of each REaaS path among its points at
    least as accurate. Returns the table and whether every such SEaaS-SC point is matched by some REaaS path."""
    baseline = [p for p in points if p.path == "SEaaS-SC" and p.clean_accuracy > majority]
    challengers = sorted({p.path for p in points if p.path != "SEaaS-SC"})
    rows, all_met = [], True
    for base in sorted(baseline, key=lambda p: (p.encoder, -p.clean_accuracy)):
        row: list[object] = [f"{base.encoder}, {base.knob}", f"{base.clean_accuracy:.3f}", f"{base.acr:.3f}"]
        best_of_all = 0.0
        for path in challengers:
            reach = [p for p in points if p.path == path and p.clean_accuracy >= base.clean_accuracy]
            best = max(reach, key=lambda p: p.acr, default=None)
            row.append("none as accurate" if best is None else f"{best.acr:.3f} ({best.knob}, acc "
                                                               f"{best.clean_accuracy:.3f})")
            best_of_all = max(best_of_all, best.acr if best else 0.0)
        met = best_of_all >= base.acr
        all_met &= met
        row.append("yes" if met else "**no**")
        rows.append(row)
    headers = ["SEaaS-SC point", "clean acc", "ACR", *[f"best {p} at >= that acc" for p in challengers],
               "REaaS >= SEaaS-SC?"]
    return markdown_table(headers, rows), all_met and bool(baseline)


def plot_frontier(points: Sequence[FrontierPoint], majority: float, path: Path, title: str) -> Path:
    """ACR against clean accuracy, one line per (path, encoder), each point a knob value."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in dict.fromkeys((p.path, p.encoder) for p in points):
        line = sorted((p for p in points if (p.path, p.encoder) == key), key=lambda p: p.clean_accuracy)
        ax.plot([p.clean_accuracy for p in line], [p.acr for p in line], marker="o", label=f"{key[0]} ({key[1]})")
    ax.axvline(majority, color="grey", linestyle=":", label="majority class")
    ax.set_xlabel("clean accuracy (abstain = wrong)")
    ax.set_ylabel("ACR (input-space l2)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.frontier", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--dataset", default="rt-embedded", help="data set (as bench-certify's --dataset)")
    add("--data", type=Path, default=None, help="data set folder (not for the embedded ones)")
    add("--reaas-encoder", default="text-pca", help="the encoder of the REaaS points (shipped kind or checkpoint)")
    add("--seaas-encoders", type=names, default=("text-pca", "text-nonrobust"),
        help="encoders served as a standard service for the SEaaS-SC points")
    add("--train-size", type=int, default=8000, help="class-balanced training inputs (0 = all)")
    add("--test-size", type=int, default=200, help="class-balanced test inputs every point is measured on")
    add("--margins", type=floats, default=(0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06),
        help="REaaS-BC linear-head margins eps, in multiples of the training features' spread")
    add("--feature-sigma-fractions", type=floats, default=(0.1, 0.2, 0.4, 0.8, 1.6),
        help="REaaS-SC sigma_F in multiples of the training features' spread")
    add("--sigmas", type=floats, default=(0.125, 0.25, 0.5, 1.0), help="SEaaS-SC sigma in input units")
    add("--n", type=int, default=10_000, help="SC samples per test input, both SC paths (SEaaS-SC: queries)")
    add("--head-lr", type=float, default=0.05, help="Adam learning rate of the margin heads")
    add("--head-weight-decay", type=float, default=0.0, help="Adam weight decay of the margin heads")
    add("--seed", type=int, default=0, help="seed of the subsets, heads and noise")
    add("--name", default="frontier_text", help="results file stem under benchmarks/results/")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    print(machine_summary(), flush=True)
    data_args = argparse.Namespace(dataset=args.dataset, data=args.data, new_encoder=args.reaas_encoder,
                                   train_size=args.train_size, test_size=args.test_size, seed=args.seed)
    data = load_data(data_args)
    base = TrainConfig(hidden=(512, 512), epochs=100, batch_size=128, seed=args.seed)
    margin = replace(base, head="linear", lr=args.head_lr, weight_decay=args.head_weight_decay)
    heads = Heads(margin=margin, reaas_sc=replace(margin, margin=0.0), seaas_sc=replace(base, head="mlp"))
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    points = reaas_points(parse_encoders([args.reaas_encoder])[0], data, heads, args.margins,
                          args.feature_sigma_fractions, args.n, started)
    for encoder in parse_encoders(args.seaas_encoders):
        points += seaas_points(encoder, data, heads, args.sigmas, args.n, started)
    labels = data.test_labels[:data.test_size]
    majority = float(labels.bincount().max()) / len(labels)
    comparison, met = matched_accuracy(points, majority)
    figure = plot_frontier(points, majority, RESULTS / f"{args.name}.png",
                           f"{args.dataset}: ACR vs clean accuracy, {data.test_size} test inputs, SC N = {args.n}")
    rows = [[p.path, p.encoder, p.knob, f"{p.clean_accuracy:.3f}", f"{p.acr:.3f}", f"{p.queries_per_test_input:g}",
             f"{p.wall_s:.0f}"] for p in points]
    body = "\n\n".join([
        __doc__.split("\n\n", 1)[1].strip(),
        f"{data.test_size} class-balanced test inputs (majority class {majority:.3f}); {len(data.train_labels)} "
        f"training inputs; SC N = {args.n}, alpha 0.001; REaaS-BC and REaaS-SC heads linear (Adam lr "
        f"{args.head_lr:g}, weight decay {args.head_weight_decay:g}), SEaaS-SC the paper's MLP 512-512.",
        f"![ACR vs clean accuracy]({figure.name})",
        "### Matched accuracy\n\n" + comparison,
        f"**REaaS >= SEaaS-SC at matched clean accuracy: {'met' if met else 'NOT met'}** (every SEaaS-SC point "
        "above the majority class against the best REaaS point at least as accurate).",
        "### Every point\n\n" + markdown_table(["path", "encoder", "knob", "clean acc", "ACR", "queries / test input",
                                                "wall s"], rows),
        f"Total wall time {time.perf_counter() - started:.0f} s.",
    ])
    written = write_results(args.name, f"ACR vs clean accuracy on {args.dataset}", body,
                            make_target=None if (sys.argv[1:] if argv is None else argv) else "bench-frontier")
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
