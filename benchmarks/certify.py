"""Certification benchmark: REaaS vs SEaaS (ACR, queries, bytes, time) and the pre-training comparison.

`make bench-certify` (= `python -m benchmarks.certify`) on the embedded MNIST digits with the shipped demo
encoders; `--dataset cifar10|svhn|stl10 --data PATH --checkpoint CKPT` on a real data set with an encoder
pre-trained for its input shape. Both SC paths are run at each sigma of a small grid and reported at their
best; SEaaS-SC selects its sigma with a reduced N (`--grid-n`), then runs the full N = 100 000 at that sigma
on a test subset (`--full-n-test-size`), next to the REaaS paths on the same subset.

Writes benchmarks/results/certify.md (+ certify.png) with the command and the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from benchmarks.environment import RESULTS, machine_summary, markdown_table, write_results
from reaas_client.background_server import background_server
from reaas_client.client import EncoderClient
from reaas_client.downstream import TrainConfig, feature_spread, fetch_features, stratified_subset
from reaas_client.metrics import RunSummary, summarize, summary_table_markdown
from reaas_client.pipelines import PathConfig, PathResult, run_path
from reaas_client.plotting import plot_certified_accuracy

CACHE_DIR = Path("runs") / "bench-certify" / "feature_cache"


@dataclass(frozen=True)
class Data:
    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int


def load_data(args: argparse.Namespace) -> Data:
    from robust_pretrain import load_dataset

    train = load_dataset(args.dataset, args.data, "train")
    test = load_dataset(args.dataset, args.data, "test")
    train_idx = stratified_subset(train.labels, args.train_size, args.seed)
    test_idx = stratified_subset(test.labels, args.test_size, args.seed)
    return Data(args.dataset, train.images[train_idx], train.labels[train_idx], test.images[test_idx],
                test.labels[test_idx], train.num_classes)


def run(config: PathConfig, client: EncoderClient, data: Data, count: int, note: str = "") -> PathResult:
    """One path on the first `count` test inputs (a class-balanced prefix)."""
    print(f"  {config.path} sigma={config.sigma:g} n={config.n} on {count} test inputs", flush=True)
    return run_path(config, client, data.train_images, data.train_labels, data.test_images[:count],
                    data.test_labels[:count], data.num_classes, dataset=data.name, cache_dir=CACHE_DIR,
                    progress=True, note=note)


def prefix_summary(result: PathResult, count: int, note: str) -> RunSummary:
    """The row of `result` restricted to its first `count` test inputs (same inputs as another row)."""
    records = result.records[:count]
    s = result.summary
    return summarize(records, service=s.service, dataset=s.dataset,
                     queries_per_train_input=s.queries_per_train_input,
                     wall_s=sum(r.wall_s for r in records), train_wall_s=s.train_wall_s, note=note)


def best(results: Sequence[PathResult]) -> PathResult:
    return max(results, key=lambda r: r.summary.acr)


def grid_table(results: Sequence[PathResult], unit: str) -> str:
    rows = [[f"{float(r.summary.extra['sigma']):.4g}", unit, r.summary.num_test, r.summary.extra["n"],
             f"{r.summary.acr:.3f}", f"{r.summary.certified_accuracy[0.0]:.3f}", f"{r.train_accuracy:.3f}"]
            for r in results]
    return markdown_table(["sigma", "unit", "test inputs", "N", "ACR", "CA@0", "h train acc"], rows)


def reaas_vs_seaas(args: argparse.Namespace, data: Data, train: TrainConfig) -> tuple[str, dict[str, list]]:
    sections: list[str] = []
    with contextlib.ExitStack() as stack:
        address = {mode: stack.enter_context(background_server(mode, checkpoint=args.checkpoint,
                                                               log_path=args.log_dir / f"server-{mode}.log"))
                   for mode in ("reaas", "seaas")}
        reaas = stack.enter_context(EncoderClient(address["reaas"], timeout_s=7200.0))
        seaas = stack.enter_context(EncoderClient(address["seaas"], timeout_s=7200.0))
        info = reaas.info()
        spread = feature_spread(fetch_features(reaas, data.train_images, data.train_labels, dataset=data.name,
                                               cache_dir=CACHE_DIR).features)
        print(f"encoder {info.model_id}: feature spread {spread:.4g}, Lipschitz <= {info.lipschitz_upper:.4g}")
        n_test = data.test_images.shape[0]
        common = {"bound": args.bound, "seed": args.seed, "train": train}
        bc = run(PathConfig("reaas-bc", method="crown", **common), reaas, data, n_test)
        sc_grid = [run(PathConfig("reaas-sc", sigma=f * spread, n=args.full_n, **common), reaas, data, n_test)
                   for f in args.feature_sigma_fractions]
        se_grid = [run(PathConfig("seaas-sc", sigma=s, n=args.grid_n, **common), seaas, data,
                       args.grid_test_size) for s in args.image_sigmas]
        se_best = best(se_grid)
        sigma = float(se_best.summary.extra["sigma"])
        full = run(PathConfig("seaas-sc", sigma=sigma, n=args.full_n, **common), seaas, data,
                   args.full_n_test_size, note=f"full N, best grid sigma {sigma:g}")
    sc_best = best(sc_grid)
    k = args.full_n_test_size
    rows = [
        bc.summary, sc_best.summary,
        replace(se_best.summary, note=f"N={args.grid_n} (grid), {args.grid_test_size} inputs"),
        prefix_summary(bc, k, f"same {k} inputs as the full-N SEaaS row"),
        prefix_summary(sc_best, k, f"same {k} inputs as the full-N SEaaS row"),
        full.summary,
    ]
    sections.append(f"Encoder `{info.model_id}` ({info.description}); feature_dim {info.feature_dim}; global "
                    f"Lipschitz upper bound {info.lipschitz_upper:.4g}; training features' spread (RMS distance "
                    f"to their mean) {spread:.4g}. F2IPerturb bound: `{args.bound or info.default_bound}`. "
                    f"REaaS-SC sigma in feature units = fraction x spread; SEaaS-SC sigma in pixel units.")
    sections.append("### REaaS vs SEaaS (each SC path at its best sigma)\n\n" + summary_table_markdown(rows))
    sections.append("### sigma grid, REaaS-SC (noise in feature space)\n\n" + grid_table(sc_grid, "feature"))
    sections.append(f"### sigma grid, SEaaS-SC (noise in image space, N = {args.grid_n})\n\n"
                    + grid_table(se_grid, "pixel"))
    sc_k, se_k = rows[4].acr, rows[5].acr
    verdict = "holds" if sc_k >= se_k else "DIFFERS from the paper"
    sections.append(f"**Ordering** on the same {k} inputs at full N: REaaS-SC ACR {sc_k:.3f} vs SEaaS-SC "
                    f"{se_k:.3f} -> the paper's REaaS-SC >= SEaaS-SC {verdict}. REaaS-BC {rows[3].acr:.3f}.")
    curves = {"REaaS-BC": bc.records, f"REaaS-SC (sigma {sc_best.summary.extra['sigma']})": sc_best.records,
              f"SEaaS-SC full N (sigma {sigma:g}, {k} inputs)": full.records}
    return "\n\n".join(sections), curves


def pretraining_comparison(args: argparse.Namespace, data: Data, train: TrainConfig) -> str:
    from robust_pretrain import DEMO_KINDS, demo_checkpoint_path, load_checkpoint

    rows = []
    acr: dict[str, tuple[float, float]] = {}
    for kind in DEMO_KINDS:
        path = demo_checkpoint_path(kind)
        if not path.with_suffix(".safetensors").is_file():
            rows.append([kind, "asset missing (run `make pretrain-demo`)", "", "", "", "", ""])
            continue
        meta = load_checkpoint(path).metadata
        print(f"pre-training comparison: {kind}", flush=True)
        with background_server("reaas", checkpoint=path, log_path=args.log_dir / f"server-{kind}.log") as address, \
                EncoderClient(address, timeout_s=7200.0) as client:
            spread = feature_spread(fetch_features(client, data.train_images, data.train_labels,
                                                   dataset=data.name, cache_dir=CACHE_DIR).features)
            common = {"bound": args.bound, "seed": args.seed, "train": train}
            count = args.pretrain_test_size
            bc = run(PathConfig("reaas-bc", **common), client, data, count)
            sc = best([run(PathConfig("reaas-sc", sigma=f * spread, n=args.pretrain_n, **common), client, data,
                           count) for f in args.feature_sigma_fractions])
        acr[kind] = (bc.summary.acr, sc.summary.acr)
        rows.append([kind, meta.description, f"{meta.lipschitz_upper:.4g}", f"{bc.summary.certified_accuracy[0.0]:.3f}",
                     f"{bc.summary.acr:.4f}", f"{sc.summary.acr:.4f}",
                     f"{float(sc.summary.extra['sigma']) / spread:.3g} x spread"])
    table = markdown_table(["encoder", "description", "Lipschitz upper", "BC clean acc", "BC ACR", "SC ACR",
                            "SC best sigma"], rows)
    text = (f"### Pre-training comparison ({args.pretrain_test_size} test inputs, REaaS-SC N = {args.pretrain_n})"
            f"\n\n{table}")
    if "spectral" in acr and "nonrobust" in acr:
        (bc_s, sc_s), (bc_n, sc_n) = acr["spectral"], acr["nonrobust"]
        holds = bc_s > bc_n and sc_s > sc_n
        text += (f"\n\n**Ordering**: spectral vs non-robust, BC {bc_s:.4f} vs {bc_n:.4f}, SC {sc_s:.4f} vs "
                 f"{sc_n:.4f} -> the paper's spectral >> non-robust {'holds' if holds else 'DIFFERS'}.")
    return text


def floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.certify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist-embedded", help="data set name (robust_pretrain.DATASETS)")
    parser.add_argument("--data", type=Path, default=None, help="data set folder (not for mnist-embedded)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="encoder checkpoint to serve (default: the shipped spectral demo encoder)")
    parser.add_argument("--train-size", type=int, default=0, help="training inputs (0 = all)")
    parser.add_argument("--test-size", type=int, default=100, help="test inputs of the REaaS paths")
    parser.add_argument("--grid-test-size", type=int, default=30, help="test inputs of the SEaaS sigma grid")
    parser.add_argument("--grid-n", type=int, default=1_000, help="SEaaS-SC N while selecting sigma")
    parser.add_argument("--full-n", type=int, default=100_000, help="N of REaaS-SC and of the full SEaaS run")
    parser.add_argument("--full-n-test-size", type=int, default=10, help="test inputs of the full-N SEaaS run")
    parser.add_argument("--feature-sigma-fractions", type=floats, default=(0.05, 0.1, 0.2),
                        help="REaaS-SC sigma grid as fractions of the training features' spread")
    parser.add_argument("--image-sigmas", type=floats, default=(0.12, 0.25, 0.5),
                        help="SEaaS-SC sigma grid in pixel units")
    parser.add_argument("--bound", default="", help="F2IPerturb bound ('' = server default)")
    parser.add_argument("--epochs", type=int, default=40, help="downstream MLP epochs")
    parser.add_argument("--pretrain-test-size", type=int, default=100,
                        help="test inputs of the pre-training comparison")
    parser.add_argument("--pretrain-n", type=int, default=10_000, help="REaaS-SC N in the pre-training comparison")
    parser.add_argument("--skip-pretrain", action="store_true", help="skip the pre-training comparison")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="certify", help="results file stem under benchmarks/results/")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.log_dir = Path("runs") / "bench-certify"
    args.log_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # the client's work is small; the server subprocess gets the other core
    print(machine_summary(), flush=True)
    started = time.perf_counter()
    data = load_data(args)
    train = TrainConfig(epochs=args.epochs)
    body, curves = reaas_vs_seaas(args, data, train)
    plot = plot_certified_accuracy(curves, RESULTS / f"{args.name}.png", title=f"{data.name}")
    body += f"\n\n![certified accuracy vs radius]({plot.name})"
    if args.dataset == "mnist-embedded" and args.checkpoint is None and not args.skip_pretrain:
        body += "\n\n" + pretraining_comparison(args, data, train)
    body += (f"\n\nTotal wall time {time.perf_counter() - started:.0f} s. Per-input costs come from the client's "
             "QueryLedger (bytes are serialized request/response bytes); CA@r = certified accuracy at image-space "
             "l2 radius r, wrong or abstained inputs count 0.")
    path = write_results(args.name, f"Certification: REaaS vs SEaaS on {data.name}", body,
                         make_target="bench-certify" if len(sys.argv) == 1 else None)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
