"""Downstream heads on the embedded digits: clean accuracy and BC ACR in feature space, per head kind and margin.

The encoder is the shipped PCA-64 checkpoint (`robust_pretrain.load_demo_encoder("pca")`, the floor of DESIGN.md:
64 orthonormal principal directions of the 2 000 pre-training digits, L = 1, so the feature radius is the image
radius). h is trained on the 2 000 downstream training digits
and certified by bounds.certify_feature_radius on all 1 000 test digits. An l2 PGD on h (bounds.pgd_margin_attack)
at each certified radius (float64, 100 steps x 5 restarts by default) must find no label change; the table counts violations (must be 0).
`--tightness`: also the end-to-end attack radius per test digit, the smallest l2 radius at which PGD flips the pixel
-> PCA -> h prediction (benchmarks.attack_radius, bisection on the radius), and mean(certified R) / mean(attack
radius): how much a tighter certificate could still win. `--augment K` trains on K shifted / elastic copies of each
training digit too (reaas_client.augment; what `fetch_features(augment=K)` sends, 1 + K queries per training digit).
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from benchmarks.attack_radius import AttackConfig, Tightness, certificate_tightness
from benchmarks.environment import RESULTS, invoked_command, machine_summary
from benchmarks.pattern_ceiling import ceiling_radius, largest_pattern_gradients, patterns_at
from bounds import MaxMin, certify_feature_radius, pgd_margin_attack
from reaas_client.augment import augmented_copies
from reaas_client.downstream import TrainConfig, train_classifier, training_rows
from robust_pretrain import load_demo_encoder, load_embedded_mnist


def pca_features() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train features, train labels, test features, test labels) through the shipped PCA-64 demo encoder."""
    splits = load_embedded_mnist()
    encoder = load_demo_encoder("pca").model.eval()
    with torch.no_grad():
        return (encoder(splits.downstream_train.images), splits.downstream_train.labels,
                encoder(splits.downstream_test.images), splits.downstream_test.labels)


def pca_views(copies: int, seed: int) -> torch.Tensor:
    """Features [N, copies, 64] of `copies` augmented copies of each training digit (reaas_client.augment, the
    copies `fetch_features(augment=copies)` would send, encoded here by the same checkpoint the server serves)."""
    images = load_embedded_mnist().downstream_train.images
    encoder = load_demo_encoder("pca").model.eval()
    views = augmented_copies(images, copies, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return encoder(views).view(images.shape[0], copies, -1)


@dataclass(frozen=True)
class EndToEnd:
    """The pixel -> PCA -> h model a certificate is about: the served encoder and the test digits [N, 1, 28, 28]."""

    encoder: nn.Module
    images: torch.Tensor

    def tightness(self, h: nn.Module, labels: torch.Tensor, certified: torch.Tensor,
                  config: AttackConfig) -> Tightness:
        return certificate_tightness(nn.Sequential(self.encoder, h), self.images, labels, certified, config)


def stable_pair_share(h: nn.Sequential, features: torch.Tensor, radius: torch.Tensor) -> float | None:
    """Mean share, over inputs with R > 0, of h's first-layer MaxMin pairs whose order is fixed on B(z, R).

    Pair k (halves a_k, b_k of the first Linear's output) is stable iff |(a_k - b_k).z + c_k| > ||a_k - b_k|| R. A
    local bound (CROWN, interval Clarke Jacobians) can only beat the global Lipschitz margin where pairs are stable,
    so a small share says a tighter certificate must reason about the pairs' orderings themselves. None for a head
    without MaxMin."""
    if not any(isinstance(m, MaxMin) for m in h) or not bool((radius > 0).any()):
        return None
    first = next(m for m in h if isinstance(m, nn.Linear))
    half = first.out_features // 2
    with torch.no_grad():
        pre = features[radius > 0] @ first.weight.T + first.bias
        gap = (pre[:, :half] - pre[:, half:]).abs()
        slope = (first.weight[:half] - first.weight[half:]).norm(dim=1)
        return float((gap > slope * radius[radius > 0, None].to(gap.dtype)).float().mean())


def pattern_ceiling_acr(h: nn.Sequential, features: torch.Tensor, labels: torch.Tensor) -> tuple[float, float] | None:
    """(ACR ceiling of any pattern-blind Lipschitz certificate, mean over class pairs of the largest pattern gradient
    / ||w_y - w_j||) for a MaxMin margin head; None for another head (benchmarks.pattern_ceiling)."""
    if not any(isinstance(m, MaxMin) for m in h):
        return None
    largest = largest_pattern_gradients(h, patterns_at(h, features[:32]))
    last = [m for m in h if isinstance(m, nn.Linear)][-1].weight.detach().double()
    spread = (last[:, None] - last[None]).norm(dim=-1)
    pairs = ~torch.eye(len(last), dtype=torch.bool)
    radius = ceiling_radius(h, features, largest)
    with torch.no_grad():
        correct = h(features).argmax(dim=1) == labels
    return float(torch.where(correct, radius, 0.0).mean()), float((largest[pairs] / spread[pairs]).mean())


def parse_head(spec: str, base: TrainConfig) -> TrainConfig:
    """"linear:1", "lipschitz:4", "prototype:4" or "mlp" -> a TrainConfig on top of `base`."""
    head, _, margin = spec.partition(":")
    return replace(base, head=head, margin=float(margin or base.margin))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", default="linear:4,lipschitz:2,lipschitz:3,lipschitz:4,lipschitz:5,lipschitz:6",
                        help="head:margin pairs, comma-separated (mlp takes no margin)")
    parser.add_argument("--hidden", default="512,512", help="lipschitz body widths (and the mlp's)")
    parser.add_argument("--epochs", type=int, default=200, help="training epochs of every head")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch size")
    parser.add_argument("--temperature", type=float, default=TrainConfig.temperature,
                        help="temperature of the distance-unit margin loss (feature units)")
    parser.add_argument("--margin-warmup", type=float, default=TrainConfig.margin_warmup,
                        help="share of the steps over which the margin ramps up from 0")
    parser.add_argument("--lr", type=float, default=None,
                        help="Adam learning rate (default: the head kind's, TrainConfig.learning_rate)")
    parser.add_argument("--prototypes", type=int, default=TrainConfig.prototypes,
                        help="prototypes per class of a prototype head")
    parser.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay, help="Adam weight decay")
    parser.add_argument("--noise-sigma", type=float, default=0.0,
                        help="Gaussian noise added to the training features at every step (feature units)")
    parser.add_argument("--augment", type=int, default=0,
                        help="K augmented copies of each training digit (reaas_client.augment; K more queries each)")
    parser.add_argument("--seed", type=int, default=0, help="seed of training and augmentation")
    parser.add_argument("--attack-steps", type=int, default=100, help="PGD steps at each certified radius")
    parser.add_argument("--attack-restarts", type=int, default=5, help="PGD restarts at each certified radius")
    parser.add_argument("--tightness", action="store_true",
                        help="attack radius of the end-to-end model per test digit and certified / attack")
    parser.add_argument("--tightness-max-radius", type=float, default=6.0,
                        help="largest radius the tightness attack probes (censored beyond)")
    parser.add_argument("--tightness-search", type=int, default=9, help="bisection steps of the tightness attack")
    parser.add_argument("--tightness-targets", type=int, default=3,
                        help="targeted PGD toward this many nearest runner-up classes at each probe (besides the "
                             "untargeted one)")
    parser.add_argument("--pattern-ceiling", action="store_true",
                        help="the ACR no Lipschitz certificate blind to MaxMin patterns can exceed "
                             "(benchmarks.pattern_ceiling): is a finer global bound worth building?")
    parser.add_argument("--save-dir", default="", help="save each trained h here (<head>-<eps>.pt)")
    parser.add_argument("--load-dir", default="",
                        help="evaluate the heads --save-dir saved there (same flags) instead of training them")
    parser.add_argument("--output", default=str(RESULTS / "heads.md"), help="markdown table written here")
    parser.add_argument("--append", action="store_true",
                        help="append a section (command, machine, table) to --output instead of rewriting it")
    args = parser.parse_args(argv)
    train, train_labels, test, test_labels = pca_features()
    attack = AttackConfig(args.tightness_max_radius, args.tightness_search, args.attack_steps, args.attack_restarts,
                          targets=args.tightness_targets)
    end_to_end = EndToEnd(load_demo_encoder("pca").model.eval(), load_embedded_mnist().downstream_test.images)
    base = TrainConfig(hidden=tuple(int(w) for w in args.hidden.split(",")), epochs=args.epochs,
                       batch_size=args.batch_size, temperature=args.temperature, margin_warmup=args.margin_warmup,
                       lr=args.lr, weight_decay=args.weight_decay, noise_sigma=args.noise_sigma, seed=args.seed,
                       prototypes=args.prototypes)
    views = pca_views(args.augment, args.seed) if args.augment else None
    train, train_labels = training_rows(train, train_labels, views)
    rows = []
    for spec in args.heads.split(","):
        config = parse_head(spec, base)
        started = time.perf_counter()
        stored = f"{spec.replace(':', '-')}.pt"
        h = (torch.load(Path(args.load_dir) / stored, weights_only=False) if args.load_dir
             else train_classifier(train, train_labels, 10, config))
        trained = time.perf_counter() - started
        cert = certify_feature_radius(h, test)
        correct = cert.prediction == test_labels
        radius = torch.where(correct, cert.feature_radius, 0.0)
        certified = radius > 0
        # attacked in float64: h's float32 rounding (~1e-7 of its logits) can tie a margin the certificate
        # proved to be 1e-7 in exact arithmetic, which is no counterexample to the certificate
        worst, _ = pgd_margin_attack(copy.deepcopy(h).double(), test[certified].double(), cert.prediction[certified],
                                     radius[certified], steps=args.attack_steps, restarts=args.attack_restarts,
                                     generator=torch.Generator().manual_seed(0))
        tight = end_to_end.tightness(h, test_labels, radius, attack) if args.tightness else None
        stable = stable_pair_share(h, test, radius)
        ceiling = pattern_ceiling_acr(h, test, test_labels) if args.pattern_ceiling else None
        if args.save_dir:
            Path(args.save_dir).mkdir(parents=True, exist_ok=True)
            torch.save(h, Path(args.save_dir) / stored)
        shape = (f"{config.prototypes} per class" if config.head == "prototype"
                 else "-".join(map(str, config.hidden)))
        training = (f"{shape}, {config.epochs} ep, batch {config.batch_size}, tau {config.temperature:g}, ramp "
                    f"{config.margin_warmup:g}, lr {config.learning_rate:g}, wd {config.weight_decay:g}"
                    + (f", noise {config.noise_sigma:g}" if config.noise_sigma else ""))
        rows.append(f"| {config.head} | {config.margin:g} | {training} | {1 + args.augment} | "
                    f"{correct.float().mean():.3f} | "
                    f"{radius.mean():.3f} | {int((worst < 0).sum())} | "
                    f"{'n/a' if stable is None else f'{stable:.3f}'} | "
                    + ("" if ceiling is None else f"{ceiling[0]:.3f} | {ceiling[1]:.3f} | ") + (
                        f"{tight.mean_attack:.3f} | {tight.ratio:.3f} | {tight.censored} | {tight.violations} | "
                        if tight else "") + ("loaded" if args.load_dir else f"{trained:.0f}") + " |")
        print(rows[-1], flush=True)
    table = "\n".join([
        f"`{invoked_command()}`  ", machine_summary(), "",
        "| head | eps | training | q/train | clean acc | BC ACR (feature = image radius, L = 1) | PGD flips inside R_F | "
        "layer-1 MaxMin pairs stable on B(z, R) | "
        + ("ACR ceiling of any pattern-blind Lipschitz bound | largest pattern gradient / ‖w_y − w_j‖ (mean) | "
           if args.pattern_ceiling else "")
        + ("end-to-end attack radius (mean) | certified / attack | censored | attack < certified | "
           if args.tightness else "") + "train s |",
        "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if args.pattern_ceiling else "")
        + ("---|---|---|---|" if args.tightness else ""), *rows, ""])
    if args.pattern_ceiling:
        table += ("\nPattern ceiling: per class pair, the largest gradient norm of the margin over MaxMin patterns "
                  "found by sign ascent from the patterns at 32 test digits and 8 random ones (a lower bound on what "
                  "any pattern-blind global bound must allow); min_j m_j / that, averaged with wrong digits as 0.\n")
    if args.tightness:
        table += f"\nTightness attack: {attack.describe()}, on pixel -> PCA -> h (all test digits).\n"
    title = "# Downstream heads on PCA-64 features of the embedded digits (1 000 test digits)\n\n"
    with open(args.output, "a" if args.append else "w") as handle:
        handle.write(("\n" if args.append else title) + table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
