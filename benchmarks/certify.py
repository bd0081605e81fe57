"""Certification benchmark: one row per encoder x path, every row on the same class-balanced test inputs.

Rows (benchmarks.certify_rows): for each encoder of --encoders, REaaS-BC (head kind x margin selected on held-out
training features; the paper's MLP + CROWN is a candidate too for the paper's encoders) and REaaS-SC (sigma
selected on held-out training features, N samples in feature space, no query); SEaaS-SC through each encoder of
--seaas-encoders served as a standard Feature-only service (sigma on a grid at reduced N, then the full N). Every
row also carries the mean radius of a white-box l2 PGD attack on its classifier h(f(.)) (benchmarks.attack_radius).
The report (benchmarks.certify_report) computes the goals' verdicts and the pre-training ratios from the rows.

`make bench-certify` = `python -m benchmarks.certify`: the embedded MNIST digits and the shipped demo encoders.
A quick end-to-end check: `--test-size 10 --seaas-n 2000 --feature-n 2000 --grid-test-size 10` (~17 min on 2
busy cores, most of it head selection). The full default run, estimated from that smoke run on a quiet 2-core
machine: ~50 min (head selection ~5, REaaS-BC/SC on the non-robust CNN ~20 (F2I best_ibp at ~4-8 s per input),
other REaaS rows ~6, attacks ~4, SEaaS-SC at N = 10^5 on 100 inputs ~14 through the non-robust CNN and ~4
through PCA); `--seaas-encoders nonrobust,new,identity` adds ~8 min.
Writes benchmarks/results/<name>.md and <name>.png with the command and the machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks import certify_report as report
from benchmarks.attack_radius import AttackConfig
from benchmarks.certify_rows import Data, EncoderReport, Settings, parse_encoders, reaas_rows, seaas_row
from benchmarks.environment import RESULTS, machine_summary, write_results
from reaas_client.downstream import TrainConfig, stratified_subset
from reaas_client.downstream_data import TEXT_TEST_FRACTION, is_text_dataset
from reaas_client.head_selection import HeadSearch
from reaas_client.smoothing_selection import CONSISTENCY_WEIGHT


def load_data(args: argparse.Namespace) -> Data:
    """All test inputs in class-balanced order (the shared subset is the first --test-size). Text: tokenized with
    the vocabulary of --new-encoder (every text row must serve the same one)."""
    if is_text_dataset(args.dataset):
        return load_text_data(args)
    from robust_pretrain import load_dataset

    train = load_dataset(args.dataset, args.data, "train")
    test = load_dataset(args.dataset, args.data, "test")
    train_idx = stratified_subset(train.labels, args.train_size, args.seed)
    test_idx = stratified_subset(test.labels, 0, args.seed)
    return Data(args.dataset, train.images[train_idx], train.labels[train_idx], test.images[test_idx],
                test.labels[test_idx], train.num_classes, min(args.test_size, len(test_idx)))


def load_text_data(args: argparse.Namespace) -> Data:
    from robust_pretrain.text_data import REVIEW_SPLIT, load_text_dataset, split_text_set

    vocabulary = parse_encoders([args.new_encoder])[0].load().text.vocabulary
    texts = load_text_dataset(args.dataset, args.data)
    held_out = max(1, round(len(texts) * TEXT_TEST_FRACTION))
    sizes = REVIEW_SPLIT if args.dataset == "rt-embedded" else (len(texts) - held_out, held_out)
    train, test = split_text_set(texts, sizes)
    train_idx = stratified_subset(train.labels, args.train_size, args.seed)
    test_idx = stratified_subset(test.labels, 0, args.seed)
    return Data(args.dataset, vocabulary.encode(train.texts)[train_idx], train.labels[train_idx],
                vocabulary.encode(test.texts)[test_idx], test.labels[test_idx], len(texts.classes),
                min(args.test_size, len(test_idx)), vocabulary)


def floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v)


def names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    from robust_pretrain.demo import DEFAULT_DEMO_KIND

    parser = argparse.ArgumentParser(prog="python -m benchmarks.certify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--dataset", default="mnist-embedded",
        help="data set name (robust_pretrain.DATASETS, or a text one: rt-embedded, sst2, imdb, with text encoders)")
    add("--data", type=Path, default=None, help="data set folder (not for mnist-embedded)")
    add("--encoders", type=names, default=("pca", "lipschitz", "spectral", "nonrobust"),
        help="encoders of the REaaS rows: shipped demo kinds or checkpoint paths (comma-separated)")
    add("--new-encoder", default=DEFAULT_DEMO_KIND,
        help="the encoder the goals are about (the product default; 'new' in --seaas-encoders means it)")
    add("--seaas-encoders", type=names, default=("nonrobust", "new"),
        help="encoders served as a standard SEaaS service for the SEaaS-SC rows ('new' = --new-encoder; add "
             "'identity' for plain Cohen smoothing, the strongest SEaaS version, ~8 min more at N = 10^5)")
    add("--skip-seaas", action="store_true", help="no SEaaS-SC rows")
    add("--test-size", type=int, default=100, help="shared class-balanced test subset of every row")
    add("--all-test-encoders", type=names, default=("pca", "new"),
        help="encoders whose REaaS-BC also runs on all test inputs (second table; 'new' = --new-encoder)")
    add("--train-size", type=int, default=0, help="training inputs (0 = all)")
    add("--feature-n", type=int, default=100_000, help="REaaS-SC N (feature-space samples, no query)")
    add("--seaas-n", type=int, default=100_000, help="SEaaS-SC N of the reported rows (queries per test input)")
    add("--grid-n", type=int, default=2_000, help="SC N while selecting sigma (both SC paths)")
    add("--grid-test-size", type=int, default=30, help="first test inputs of the SEaaS-SC sigma grid")
    add("--holdout", type=int, default=200, help="held-out training inputs on which REaaS-SC's sigma is selected")
    add("--feature-sigma-fractions", type=floats, default=(0.05, 0.1, 0.2, 0.4),
        help="REaaS-SC sigma grid as fractions of the training features' spread (RMS distance to their mean)")
    add("--image-sigmas", type=floats, default=(0.25, 0.5, 1.0), help="SEaaS-SC sigma grid in pixel units")
    add("--heads", type=names, default=("linear", "lipschitz"), help="REaaS-BC margin head kinds to select among")
    add("--margins", type=floats, default=(1.0, 2.0, 3.0, 4.0, 5.0, 6.0),
        help="REaaS-BC margin grid (in --margin-unit; on the digits the held-out frontier turns at eps 5-6)")
    add("--margin-unit", choices=("feature", "spread"), default="feature",
        help="--margins in feature-space units, or as multiples of each encoder's training-feature spread (text "
             "encoders' features are small: mean pooling divides by max_length)")
    add("--floor", default="pca", help="the floor encoder the new one must beat (text: text-pca)")
    add("--nonrobust", default="nonrobust", help="the non-robust encoder of the pre-training comparison")
    add("--mlp-head-encoders", type=names, default=("spectral", "nonrobust", "adversarial"),
        help="encoders whose REaaS-BC selection also tries the paper's MLP head (CROWN)")
    add("--min-val-accuracy", type=float, default=0.95,
        help="select the largest held-out ACR among head candidates with at least this held-out accuracy (the "
             "goal's bar; the most accurate candidate when none reaches it; a constant head has a huge radius on "
             "1/K of the inputs)")
    add("--head-hidden", type=lambda t: tuple(int(v) for v in t.split(",")), default=(512, 512),
        help="hidden widths of the lipschitz and mlp heads")
    add("--head-epochs", type=int, default=100, help="training epochs of every head")
    add("--head-lr", type=float, default=None,
        help="Adam learning rate of the REaaS margin heads (default: the head kind's, TrainConfig.learning_rate)")
    add("--head-weight-decay", type=float, default=TrainConfig.weight_decay,
        help="Adam weight decay of the REaaS margin heads (text: 0, measured by bench-text-encoders)")
    add("--head-temperature", type=float, default=TrainConfig.temperature,
        help="temperature of the margin heads' distance-unit loss, in --margin-unit (text: 0.002 x spread)")
    add("--head-batch-size", type=int, default=128, help="training batch size of every head")
    add("--sc-heads", type=names, default=("selected", "mlp", "mlp+cr"),
        help="REaaS-SC head candidates, chosen with sigma on held-out training features and trained on noisy "
             "features ('selected': REaaS-BC's chosen kind and margin; '+cr': with consistency regularisation); "
             "SEaaS-SC trains the paper's MLP (with --seaas-consistency)")
    add("--seaas-consistency", type=float, default=CONSISTENCY_WEIGHT,
        help="SEaaS-SC head: consistency weight lambda over two of each training image's 25 noisy copies per step "
             "(0: the paper's plain Gaussian augmentation)")
    add("--augment", type=int, default=0,
        help="K shifted / elastic copies of each training image for the REaaS heads (reaas_client.augment): 1 + K "
             "queries per training input, shown in the queries / train input column")
    add("--attack-steps", type=int, default=100, help="PGD steps per probe radius")
    add("--attack-restarts", type=int, default=2, help="PGD restarts per probe radius")
    add("--attack-search", type=int, default=8, help="bisection steps over the attack radius")
    add("--attack-max-radius", type=float, default=4.0,
        help="largest radius the attack probes (an input not flipped there counts as this, 'censored')")
    add("--bound", default="", help="F2IPerturb bound ('' = the server's default)")
    add("--seed", type=int, default=0, help="seed of the subsets, heads, noise and attacks")
    add("--name", default="certify", help="results file stem under benchmarks/results/")
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    base = TrainConfig(hidden=args.head_hidden, epochs=args.head_epochs, batch_size=args.head_batch_size,
                       seed=args.seed)
    margin_heads = replace(base, lr=args.head_lr, weight_decay=args.head_weight_decay,
                           temperature=args.head_temperature)
    resolve = lambda items: tuple(args.new_encoder if v == "new" else v for v in items)  # noqa: E731
    return Settings(
        feature_n=args.feature_n, seaas_n=args.seaas_n, grid_n=args.grid_n,
        grid_test_size=min(args.grid_test_size, args.test_size), holdout=args.holdout,
        feature_sigma_fractions=args.feature_sigma_fractions, image_sigmas=args.image_sigmas,
        search=HeadSearch(heads=args.heads, margins=args.margins, min_accuracy=args.min_val_accuracy),
        mlp_head_encoders=args.mlp_head_encoders, all_test_encoders=resolve(args.all_test_encoders),
        margin_train=margin_heads, margins_in_spread=args.margin_unit == "spread", sc_heads=args.sc_heads, sc_train=replace(base, head="mlp"),
        seaas_train=replace(base, head="mlp", consistency=args.seaas_consistency),
        attack=AttackConfig(args.attack_max_radius, args.attack_search, args.attack_steps, args.attack_restarts,
                            args.seed),
        bound=args.bound, seed=args.seed, augment=args.augment)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dataset not in ("mnist-embedded", "rt-embedded") and args.data is None:
        parser.error(f"--dataset {args.dataset} needs --data (its files) and checkpoint paths in --encoders")
    settings = settings_from(args)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # the client's work is small; the server subprocess gets the other core
    print(machine_summary(), flush=True)
    started = time.perf_counter()
    data = load_data(args)
    seaas = () if args.skip_seaas else tuple(dict.fromkeys(args.new_encoder if v == "new" else v
                                                           for v in args.seaas_encoders))
    parts: list[EncoderReport] = []
    for encoder in parse_encoders(args.encoders):
        parts.append(reaas_rows(encoder, data, settings, started))
    for encoder in parse_encoders(seaas):
        parts.append(seaas_row(encoder, data, settings, started))
    rows = [row for part in parts for row in part.rows]
    all_test = {row.encoder: part.bc_all for part in parts for row in part.rows[:1] if part.bc_all is not None}
    picture = report.plot(rows, RESULTS / f"{args.name}.png", title=f"{data.name}, {data.test_size} test inputs",
                          modality="text" if data.is_text else "image")
    radius_space = ("embedding-space l2 radius r (over the whole [max_length x embed_dim] embedding matrix of "
                    "unit-norm token rows)" if data.is_text else "image-space l2 radius r")
    goals = (report.text_goals(rows, args.new_encoder, args.nonrobust) if data.is_text
             else report.goals(rows, args.new_encoder, args.floor, args.nonrobust))
    sections = [
        f"Every row is on the same {data.test_size} class-balanced test inputs. New encoder (`--new-encoder`): "
        f"`{args.new_encoder}`. Clean acc is the certified classifier's (h(f(x)) for BC, the smoothed prediction "
        "for SC; abstain = wrong); CA@r = certified accuracy at " + radius_space + "; ACR counts wrong or "
        "abstained inputs as 0. Attack radius: " + settings.attack.describe() + ", white-box on the served "
        "checkpoint, 0 for misclassified inputs. It attacks each row's base classifier h(f(.)) (h(f(clip(.))) for "
        "SEaaS, which clips before querying): for REaaS-BC that is the certified classifier, so certified / "
        "attack <= 1 must hold; an SC row certifies the *smoothed* classifier, so its ratio is a comparison, not "
        "a bound. Queries and bytes per input come from the client's QueryLedger.",
        "### Rows\n\n" + report.main_table(rows, report.TEXT_RADII if data.is_text else report.RADII),
        report.soundness_line(rows, settings.attack.max_radius),
        f"![certified accuracy vs radius]({picture.name})",
        "### Goals (computed from the rows above)\n\n" + goals,
        "### Pre-training: robust vs non-robust (ACR ratios from the rows above; paper, CIFAR-10: BC 0.139 vs "
        "0.010, SC 0.173 vs 0.014, about 13x)\n\n"
        + report.pretraining_comparison(rows, [(args.new_encoder, args.nonrobust), ("spectral", args.nonrobust)]),
    ]
    if all_test:
        sections.append(f"### REaaS-BC on all {len(data.test_images)} test inputs\n\n"
                        + report.all_test_table(all_test))
    sections.append("### How each row chose its head and sigma\n\n" + "\n\n".join(t for p in parts for t in p.tables))
    sections.append(f"Total wall time {time.perf_counter() - started:.0f} s.")
    path = write_results(args.name, f"Certification: REaaS vs SEaaS on {data.name}", "\n\n".join(sections),
                         make_target="bench-certify-text" if args.name == "certify_text"
                         else "bench-certify" if len(sys.argv) == 1 else None)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
