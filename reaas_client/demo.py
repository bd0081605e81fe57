"""`make demo` / `make demo-text`: the paper's comparison in miniature, on a fresh clone, with no data to download.

Starts two background servers on free loopback ports (a REaaS deployment and a standard SEaaS one, both
serving the shipped demo encoder `--encoder`, by default robust_pretrain's DEFAULT_DEMO_KIND), runs REaaS-BC,
REaaS-SC and SEaaS-SC on the embedded MNIST digits, prints a table in the shape of the paper's (with the encoder
and each row's head), and writes per-input CSVs, the query ledgers and the certified-accuracy plot under runs/demo/.
The servers are stopped on success, error and Ctrl-C alike.

Every choice is made as bench-certify makes it, on held-out *training* features (no query, no test input), and
printed: REaaS-BC's head (linear or 1-Lipschitz MaxMin, x margin; reaas_client.head_selection) and REaaS-SC's
(head, sigma_F) pair, BC's head or the paper's MLP trained on noisy features at each fraction of the feature spread
(reaas_client.smoothing_selection). SEaaS-SC keeps the paper's MLP, trained on noisy images with consistency
regularisation (its strongest version here), at the image sigma bench-certify selects.

To stay under a few minutes on 2 CPU cores it certifies a test subset and, for SEaaS-SC only, a reduced N
and fewer inputs; the table says so. `make bench-certify` runs SEaaS-SC with the full N = 100 000.

`--dataset rt-embedded` (`make demo-text`) runs the same comparison on text: the shipped text encoder, Rotten
Tomatoes reviews tokenized with the provider's vocabulary, radii in embedding space (README, "Text"). Each data set
brings its own defaults (`DEMO_DEFAULTS`); a flag given on the command line wins.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import textwrap
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from reaas_client import progress
from reaas_client.background_server import ServerStartError, background_server
from reaas_client.client import EncoderClient
from reaas_client.command_line import (
    CommandLineParser,
    add_standard_flags,
    checkpoint_argument,
    reported_errors,
)
from reaas_client.downstream import TrainConfig, feature_spread, fetch_features, stratified_subset
from reaas_client.downstream_data import load_downstream
from reaas_client.head_selection import HeadSearch
from reaas_client.metrics import summary_table_markdown, summary_table_text, write_records_csv
from reaas_client.pipelines import PathConfig, PathResult, run_path
from reaas_client.plotting import plot_certified_accuracy
from reaas_client.smoothing_selection import CONSISTENCY_WEIGHT, select_smoothing, smoothing_candidates


@dataclass(frozen=True)
class DemoDefaults:
    """What a data set's demo runs when its flags are not given (see build_parser for each one's meaning)."""

    encoder: str
    train_size: int
    image_sigma: float
    feature_sigma_fractions: str
    margins: str
    min_val_accuracy: float
    margin_unit: str
    lr: float | None = None  # None: each head kind's own (TrainConfig.learning_rate)
    weight_decay: float = 1e-4
    temperature: float = TrainConfig.temperature
    test_size: int = 20
    seaas_test_size: int = 20


DEMO_DEFAULTS = {
    # REaaS-SC's sigma grid and SEaaS-SC's 0.5 px: bench-certify's (its grid selects 0.5 px on the digits)
    "mnist-embedded": DemoDefaults(encoder="pca", train_size=0, image_sigma=0.5,
                                   feature_sigma_fractions="0.05,0.1,0.2,0.4",
                                   margins="2,3,4,5",
                                   min_val_accuracy=0.92, margin_unit="feature"),
    # text: SEaaS noise in embedding units (rows of E have norm 1); margins as multiples of the feature spread,
    # since a text encoder's features are small (mean pooling divides by max_length)
    # lr 0.05 and no weight decay: measured best for margin heads on the text floor (bench-text-encoders)
    # REaaS-SC's grid is bench-certify-text's; 0.5: what it selects for SEaaS-SC through text-pca (from 0.25 to 2)
    "rt-embedded": DemoDefaults(encoder="text-pca", train_size=8_000, image_sigma=0.5,
                                feature_sigma_fractions="0.2,0.4,0.8,1.6",
                                margins="0,0.005,0.01,0.02",
                                min_val_accuracy=0.6, margin_unit="spread", lr=0.05, weight_decay=0.0,
                                temperature=0.002,
                                test_size=100, seaas_test_size=50),
}


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except a None default: those flags name their per-data-set defaults themselves."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from robust_pretrain.demo import DEMO_KINDS, TEXT_DEMO_KINDS

    parser = CommandLineParser(
        prog="python -m reaas_client.demo",
        description="REaaS-BC vs REaaS-SC vs SEaaS-SC on the embedded MNIST digits (or, with --dataset "
                    "rt-embedded, Rotten Tomatoes reviews) with a shipped demo encoder, against two background "
                    "servers it starts and stops itself.",
        formatter_class=_DefaultsHelp,
    )
    parser.add_argument("--dataset", choices=tuple(DEMO_DEFAULTS), default="mnist-embedded",
                        help="the downstream task: digits (image encoder) or movie reviews (text encoder)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: runs/demo[-text])")
    parser.add_argument("--encoder", choices=DEMO_KINDS + TEXT_DEMO_KINDS, default=None,
                        help="shipped demo encoder both servers serve (default: the data set's, "
                             + ", ".join(f"{name}: {d.encoder}" for name, d in DEMO_DEFAULTS.items())
                             + "; a kind whose asset is absent is served as its labelled seeded-init stand-in)")
    parser.add_argument("--train-size", type=int, default=None,
                        help="training inputs (class-balanced seeded subset; 0 = all; default: the data set's, "
                             + ", ".join(f"{name}: {d.train_size}" for name, d in DEMO_DEFAULTS.items()) + ")")
    parser.add_argument("--checkpoint", type=checkpoint_argument, default=None,
                        help="encoder checkpoint both servers serve instead of --encoder")
    parser.add_argument("--test-size", type=int, default=None,
                        help="test inputs certified by the REaaS paths (on images each F2IPerturb can cost the "
                             "server seconds of CPU with the tight default bound; default: the data set's, "
                             + ", ".join(f"{name}: {d.test_size}" for name, d in DEMO_DEFAULTS.items()) + ")")
    parser.add_argument("--seaas-test-size", type=int, default=None,
                        help="test inputs certified by SEaaS-SC (each costs n0 + n queries); the first ones of "
                             "the REaaS test subset (default: the data set's, "
                             + ", ".join(f"{name}: {d.seaas_test_size}" for name, d in DEMO_DEFAULTS.items()) + ")")
    parser.add_argument("--seaas-n", type=int, default=2_000,
                        help="SEaaS-SC N (paper: 100 000; reduced here for time, which lowers its radii)")
    parser.add_argument("--n", type=int, default=100_000, help="REaaS-SC N (local, costs no queries)")
    parser.add_argument("--feature-sigma-fractions", default=None,
                        help="REaaS-SC noise grid in feature space, as fractions of the training features' spread "
                             "(RMS distance to their mean), selected with the head on held-out training features "
                             "(default: the data set's, "
                             + "; ".join(f"{name}: {d.feature_sigma_fractions}" for name, d in DEMO_DEFAULTS.items())
                             + ")")
    parser.add_argument("--sc-heads", default="selected,mlp,mlp+cr",
                        help="REaaS-SC head candidates ('selected': REaaS-BC's chosen head; 'mlp': the paper's MLP; "
                             "'+cr': trained with consistency regularisation)")
    parser.add_argument("--holdout", type=int, default=200,
                        help="held-out training inputs on which REaaS-SC's head and sigma are selected")
    parser.add_argument("--grid-n", type=int, default=2_000, help="REaaS-SC N while selecting its sigma")
    parser.add_argument("--image-sigma", type=float, default=None,
                        help="SEaaS-SC noise in the encoder's input units: pixels, or embedding units for text "
                             "(default: the data set's, "
                             + ", ".join(f"{name}: {d.image_sigma:g}" for name, d in DEMO_DEFAULTS.items()) + ")")
    parser.add_argument("--bound", default="",
                        help="F2IPerturb bound for both REaaS paths (empty: the server's default, the tightest)")
    parser.add_argument("--heads", default="linear,lipschitz",
                        help="REaaS head kinds selected among on held-out training features (comma-separated; "
                             "'mlp' adds the paper's MLP + CROWN)")
    parser.add_argument("--margins", default=None,
                        help="margin eps grid of the REaaS heads (comma-separated), in --margin-unit (default: the "
                             "data set's, " + "; ".join(f"{name}: {d.margins} {d.margin_unit}"
                                                          for name, d in DEMO_DEFAULTS.items()) + ")")
    parser.add_argument("--margin-unit", choices=("feature", "spread"), default=None,
                        help="feature: --margins are feature-space distances; spread: multiples of the training "
                             "features' spread (RMS distance to their mean)")
    parser.add_argument("--min-val-accuracy", type=float, default=None,
                        help="the largest held-out ACR is chosen among heads with at least this held-out accuracy "
                             "(the most accurate head if none reaches it; a constant head's radius is huge; "
                             "default: the data set's, " + ", ".join(f"{name}: {d.min_val_accuracy:g}"
                                                                     for name, d in DEMO_DEFAULTS.items()) + ")")
    parser.add_argument("--epochs", type=int, default=40, help="training epochs of every head")
    parser.add_argument("--lr", type=float, default=None,
                        help="Adam learning rate of the REaaS heads (default: the data set's, " + ", ".join(
                            f"{name}: {'per head kind' if d.lr is None else f'{d.lr:g}'}"
                            for name, d in DEMO_DEFAULTS.items()) + ")")
    parser.add_argument("--weight-decay", type=float, default=None,
                        help="Adam weight decay of the REaaS heads (default: the data set's, "
                             + ", ".join(f"{name}: {d.weight_decay:g}" for name, d in DEMO_DEFAULTS.items()) + ")")
    parser.add_argument("--temperature", type=float, default=None,
                        help="temperature of the margin heads' distance-unit loss, in --margin-unit (default: the "
                             "data set's, " + ", ".join(f"{name}: {d.temperature:g}" for name, d in DEMO_DEFAULTS.items())
                             + ")")
    parser.add_argument("--augment", type=int, default=0,
                        help="K shifted / elastic copies of each training image for the REaaS heads "
                             "(reaas_client.augment), each one more Feature query: 1 + K per training input (q/train)")
    parser.add_argument("--seed", type=int, default=0, help="seed of subsets, training and noise")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars or step lines (bars draw only when stderr is a terminal anyway)")
    add_standard_flags(parser)
    return parser


def with_dataset_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """`args` with every flag left unset taken from the data set's DemoDefaults."""
    defaults = DEMO_DEFAULTS[args.dataset]
    filled = {name: getattr(defaults, name) for name in DemoDefaults.__dataclass_fields__
              if getattr(args, name) is None}
    if args.out is None:
        filled["out"] = Path("runs") / ("demo" if args.dataset == "mnist-embedded" else "demo-text")
    return argparse.Namespace(**{**vars(args), **filled})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = with_dataset_defaults(parser.parse_args(argv))
    with reported_errors(parser.prog, debug=args.debug, usage_errors=(ServerStartError,)), \
            progress.reporting(not args.quiet):
        return _demo(args)


def _demo(args: argparse.Namespace) -> int:
    """The comparison itself: servers up, three paths certified, outputs written, servers down."""
    torch.set_num_threads(1)  # h and the feature-space samples are small; the servers get the other core
    train_config = TrainConfig(epochs=args.epochs, seed=args.seed)  # the paper's MLP
    margin_config = TrainConfig(epochs=args.epochs, seed=args.seed, lr=args.lr, weight_decay=args.weight_decay,
                                hidden=(512, 512), batch_size=128)  # bench-certify's margin heads
    served = {"checkpoint": args.checkpoint} if args.checkpoint else {"extra_args": ("--demo-kind", args.encoder)}
    cache_dir = args.out / "feature_cache"
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[PathResult] = []
    started = time.perf_counter()
    progress.step(f"starting a REaaS and a SEaaS server (logs: {args.out}/server-*.log) ...")
    with contextlib.ExitStack() as stack:
        addresses = {mode: stack.enter_context(background_server(mode, log_path=args.out / f"server-{mode}.log",
                                                                 **served))
                     for mode in progress.bar(("reaas", "seaas"), desc="starting servers", unit="server")}
        clients = {mode: stack.enter_context(EncoderClient(address, timeout_s=3600.0))
                   for mode, address in addresses.items()}
        info = clients["reaas"].info()
        data = load_downstream(args.dataset, None, clients["reaas"])
        train_idx = stratified_subset(data.train_labels, args.train_size, args.seed)
        train_inputs, train_labels = data.train_inputs[train_idx], data.train_labels[train_idx]
        test_idx = stratified_subset(data.test_labels, args.test_size, args.seed)
        seaas_idx = test_idx[: args.seaas_test_size]
        # The REaaS training features (1 query each, cached) also set the feature-space noise scale.
        fetched = fetch_features(clients["reaas"], train_inputs, train_labels, dataset=args.dataset,
                                 cache_dir=cache_dir, augment=args.augment, seed=args.seed)
        train_features = fetched.features
        spread = feature_spread(train_features)
        unit = spread if args.margin_unit == "spread" else 1.0
        search = HeadSearch(heads=tuple(h for h in args.heads.split(",") if h),
                            margins=tuple(float(m) * unit for m in args.margins.split(",") if m),
                            min_accuracy=args.min_val_accuracy)
        margin_config = replace(margin_config, temperature=args.temperature * unit)
        print(textwrap.fill(f"servers up: REaaS {addresses['reaas']}, SEaaS {addresses['seaas']}; encoder "
                            f"{info.model_id} ({info.description}), feature_dim {info.feature_dim}, Lipschitz <= "
                            f"{info.lipschitz_upper:.3g}, feature spread {spread:.3g}", width=100,
                            subsequent_indent="  "), file=sys.stderr)
        bound = args.bound or info.default_bound
        common = {"dataset": args.dataset, "cache_dir": cache_dir, "progress": not args.quiet}
        noise_unit = "px" if data.modality == "image" else "(embedding units)"

        def certify(config: PathConfig, indices: torch.Tensor, mode: str, note: str) -> PathResult:
            result = run_path(config, clients[mode], train_inputs, train_labels, data.test_inputs[indices],
                              data.test_labels[indices], data.num_classes, note=note, **common)
            write_records_csv(result.records, args.out / f"{config.path}.csv")
            results.append(result)
            return result

        bc = certify(PathConfig("reaas-bc", bound=args.bound, seed=args.seed, train=margin_config, search=search,
                                augment=args.augment),
                     test_idx, "reaas", f"head selected on held-out training features; F2I bound {bound}")
        print(f"REaaS-BC head, selected on held-out training features:\n{bc.selection.table()}", file=sys.stderr)
        # REaaS-SC's head and sigma_F, chosen as bench-certify chooses them (no query, no test input)
        sc_heads = smoothing_candidates([n for n in args.sc_heads.split(",") if n], selected=bc.selection.chosen,
                                        mlp=train_config, margin=margin_config)
        fractions = [float(f) for f in args.feature_sigma_fractions.split(",") if f]
        sc_choice = select_smoothing(train_features, train_labels, data.num_classes, sc_heads,
                                     [f * spread for f in fractions], holdout=args.holdout, n=args.grid_n,
                                     seed=args.seed, views=fetched.views)
        feature_sigma = sc_choice.sigma
        print(f"REaaS-SC head x sigma_F, selected on {args.holdout} held-out training features at N={args.grid_n}:"
              f"\n{sc_choice.table()}", file=sys.stderr)
        certify(PathConfig("reaas-sc", sigma=feature_sigma, n=args.n, bound=args.bound, seed=args.seed,
                           train=sc_heads[sc_choice.head], augment=args.augment),
                test_idx, "reaas", f"sigma_F={feature_sigma:.3g} ({feature_sigma / spread:.3g} x spread), N={args.n}; "
                                   f"head and sigma selected on held-out training features; F2I bound {bound}")
        # SEaaS-SC at full strength: the paper's MLP with consistency regularisation over its noisy training copies
        seaas_train = replace(train_config, consistency=CONSISTENCY_WEIGHT)
        certify(PathConfig("seaas-sc", sigma=args.image_sigma, n=args.seaas_n, seed=args.seed, train=seaas_train),
                seaas_idx, "seaas", f"{_fewer(len(seaas_idx), len(test_idx))}sigma={args.image_sigma:g} {noise_unit}; "
                                    f"N REDUCED to {args.seaas_n} (paper: 100 000; full N in make bench-certify)")
        for mode, client in clients.items():
            client.ledger.to_csv(args.out / f"ledger-{mode}.csv")
    heads = {r.summary.service: r.summary.extra.get("head", "") for r in results}
    title = (textwrap.fill(f"data: {args.dataset}; encoder: {info.model_id} ({info.description})", width=100,
                           subsequent_indent="  ")
             + "\n" + textwrap.fill("heads: " + "; ".join(f"{service} {head}" for service, head in heads.items()),
                                    width=100, subsequent_indent="  ") + "\n\n")
    plot_certified_accuracy({r.summary.service: r.records for r in results}, args.out / "certified_accuracy.png",
                            title=f"{args.dataset}, {info.model_id}", modality=data.modality)
    summary = args.out / "summary.md"
    summary.write_text(title + summary_table_markdown([r.summary for r in results]) + "\n")
    print(title + summary_table_text([r.summary for r in results]))
    print(f"\ntotal {time.perf_counter() - started:.0f} s; full table: {summary}; CSVs, ledgers and plot in "
          f"{args.out}/")
    return 0


def _fewer(certified: int, of: int) -> str:
    """The note's opening when SEaaS-SC certified only the first `certified` of the `of` REaaS test inputs."""
    return f"first {certified} of the {of} test inputs (each costs n0 + N queries); " if certified < of else ""


if __name__ == "__main__":
    sys.exit(main())
