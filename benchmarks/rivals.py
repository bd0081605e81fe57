"""End-to-end rivals of REaaS on the same 2 000 training / 1 000 test digits (issue 21): certified quality per query.

Rows, every radius an l2 radius in pixel space:

* REaaS-BC: the 1-Lipschitz margin head on the shipped PCA-64 features (L = 1, so the feature radius is the image
  radius); 1 + --bc-augment queries per training input, 2 per test input (Feature + F2IPerturb). All test digits.
* REaaS-BC, prototype head (`reaas-bc-prototype`): a nearest-prototype head (reaas_client.heads, --proto-* flags)
  on the same features, its radius exact (bounds.max_affine); 1 query per training input, 2 per test input.
* REaaS-SC: the paper's MLP (optionally consistency-trained, --sc-heads) on noisy PCA-64 features, Cohen CERTIFY in
  feature space (no query); head and sigma_F chosen on held-out training features
  (reaas_client.smoothing_selection). --smooth-test class-balanced test digits.
* Cohen smoothing of a LeNet-5 trained on the pixels with Gaussian noise (Cohen et al. 2019), optionally with
  consistency regularisation (Jeong & Shin 2020: m noisy copies, lambda · KL(mean || each) + 0.5 · entropy of the
  mean), certified at N on --smooth-test class-balanced test digits. A client would run it itself: 0 queries, all compute.
* A 1-Lipschitz network on the pixels (AOL 784-1024-1024 + MaxMin, reaas_client.heads, the same distance-unit loss).
  All test digits.

Every deterministic row (REaaS-BC, the pixel network) is checked by an l2 PGD on the margin (float64, --attack-steps
x --attack-restarts) at each certified radius: the flips column must be 0. These are baselines, not product; they
live here and reuse the project's loss, heads, smoothing and certificates.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass, replace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.attack_radius import AttackConfig, Tightness, certificate_tightness  # noqa: E402
from benchmarks.environment import RESULTS, markdown_table, write_results  # noqa: E402
from benchmarks.heads import pca_features, pca_views  # noqa: E402
from bounds import certify_feature_radius, pgd_margin_attack  # noqa: E402
from reaas_client.downstream import (  # noqa: E402
    TrainConfig,
    feature_spread,
    stratified_subset,
    train_classifier,
    training_rows,
)  # noqa: E402
from reaas_client.heads import consistency_penalty  # noqa: E402
from reaas_client.pipelines import SmoothingConfig, certify_features  # noqa: E402
from reaas_client.smoothing_selection import select_smoothing, smoothing_candidates  # noqa: E402
from robust_pretrain import load_demo_encoder, load_embedded_mnist  # noqa: E402

RADII = (0.5, 1.0, 1.5, 2.0, 2.5)
ROW_KINDS = ("reaas-bc", "reaas-bc-prototype", "reaas-sc", "pixel", "cohen")


@dataclass(frozen=True)
class RivalRow:
    """One row: per-test-input certified radii (0 where wrong or abstained), correctness, and what it cost."""

    name: str
    radius: torch.Tensor
    correct: torch.Tensor
    queries: str
    client_s: float
    pgd_flips: str
    note: str
    tightness: Tightness | None = None

    def cells(self) -> list[object]:
        acr = float(torch.where(self.correct, self.radius, 0.0).mean())
        at = [f"{float(((self.radius >= r) & self.correct).float().mean()):.3f}" for r in RADII]
        tight = (["n/a (smoothed)", "n/a"] if self.tightness is None else
                 [f"{self.tightness.mean_attack:.3f}", f"{self.tightness.ratio:.3f}"])
        return [self.name, len(self.correct), f"{float(self.correct.float().mean()):.3f}", f"{acr:.3f}", *at,
                self.queries, f"{self.client_s:.0f}", self.pgd_flips, *tight, self.note]


def lenet() -> nn.Sequential:
    """LeNet-5 on flattened 28 x 28 digits (flat, so the project's GaussianFeatureSamples draws its noise)."""
    return nn.Sequential(nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120),
                         nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))


def train_noisy_lenet(images: torch.Tensor, labels: torch.Tensor, sigma: float, *, consistency: float,
                      copies: int = 2, epochs: int = 60, batch_size: int = 128, lr: float = 1e-3,
                      seed: int = 0, device: str = "cpu") -> nn.Sequential:
    """Gaussian data augmentation at `sigma` (Cohen et al.); `consistency` > 0 adds Jeong & Shin's term over
    `copies` noisy copies of each input: lambda · mean_i KL(p_mean || p_i) + 0.5 · H(p_mean). Trained on `device`
    (the noise is drawn on the CPU, so a run replays on any device up to float rounding); returned there."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = lenet().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-images.shape[0] // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    m = copies if consistency > 0 else 1
    model.train()
    for _ in range(epochs):
        order = torch.randperm(images.shape[0], generator=generator)
        for start in range(0, images.shape[0], batch_size):
            batch = order[start:start + batch_size]
            x, y = images[batch].repeat(m, 1), labels[batch].repeat(m)
            logits = model((x + sigma * torch.randn(x.shape, generator=generator)).to(device))
            loss = nn.functional.cross_entropy(logits, y.to(device))
            if consistency > 0:
                loss = loss + consistency_penalty(logits, m, consistency)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def smoothed_row(name: str, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, sigma: float, n: int,
                 seed: int, *, queries: str, train_s: float, note: str, device: str = "cpu") -> RivalRow:
    """Cohen CERTIFY at N = n of `model` around each flat input (the project's certify_features; the noise drawn
    and `model` run on `device`)."""
    started = time.perf_counter()
    with torch.no_grad():
        certificates = certify_features(model, inputs, SmoothingConfig(sigma, n=n, seed=seed, device=device))
    correct = torch.tensor([c.prediction == int(y) for c, y in zip(certificates, labels, strict=True)])
    radius = torch.tensor([c.radius if ok else 0.0 for c, ok in zip(certificates, correct.tolist(), strict=True)])
    return RivalRow(name, radius, correct, queries, train_s + time.perf_counter() - started, "n/a (smoothed)",
                    note)


def deterministic_row(name: str, model: nn.Sequential, inputs: torch.Tensor, labels: torch.Tensor, *,
                      queries: str, train_s: float, note: str, steps: int, restarts: int, seed: int,
                      end_to_end: tuple[nn.Module, torch.Tensor] | None = None,
                      tightness: AttackConfig | None = None) -> RivalRow:
    """bounds.certify_feature_radius on `inputs` (L = 1 from input to them) and an l2 PGD at every certified
    radius, in float64 (float32 rounding can tie a margin proved in exact arithmetic). With `tightness`, the attack
    radius of the end-to-end model per input (`end_to_end`: (pixels -> prediction model, its pixel inputs); default
    `model` on `inputs`) and mean certified / mean attack."""
    started = time.perf_counter()
    cert = certify_feature_radius(model, inputs)
    certify_s = time.perf_counter() - started
    correct = cert.prediction == labels
    radius = torch.where(correct, cert.feature_radius, 0.0)
    certified = radius > 0
    worst, _ = pgd_margin_attack(copy.deepcopy(model).double(), inputs[certified].double(),
                                 cert.prediction[certified], radius[certified], steps=steps, restarts=restarts,
                                 generator=torch.Generator().manual_seed(seed))
    flips = f"{int((worst < 0).sum())} of {int(certified.sum())}"
    tight = None
    if tightness is not None:
        pipeline, pixels = end_to_end or (model, inputs)
        tight = certificate_tightness(pipeline, pixels, labels, radius, tightness)
        flips += f"; attack < certified: {tight.violations}; censored: {tight.censored}"
    return RivalRow(name, radius.float(), correct, queries, train_s + certify_s, flips, note, tight)


def plot(rows: list[RivalRow], path) -> None:
    grid = torch.linspace(0, 3, 61)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        curve = [float(((row.radius >= r) & row.correct).float().mean()) for r in grid]
        axes.plot(grid, curve, label=f"{row.name} ({len(row.correct)})",
                  linestyle="-" if row.name.startswith("REaaS") else "--")
    axes.set_xlabel("l2 radius (pixels)")
    axes.set_ylabel("certified accuracy")
    axes.set_title("Digits: REaaS vs end-to-end rivals (same 2 000 training digits)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    # REaaS-BC's defaults: the best head at clean accuracy >= 0.93 of benchmarks/results/heads.md
    add("--bc-margin", type=float, default=6.0, help="REaaS-BC head's margin eps (feature units)")
    add("--bc-epochs", type=int, default=200, help="REaaS-BC head's training epochs")
    add("--bc-augment", type=int, default=2,
        help="REaaS-BC: K shifted / elastic copies of each training digit (1 + K queries per training digit)")
    add("--bc-head", choices=("lipschitz", "orthogonal"), default="orthogonal",
        help="REaaS-BC head kind (reaas_client.heads: AOL or orthogonal 1-Lipschitz body)")
    add("--bc-hidden", default="512,512", help="REaaS-BC 1-Lipschitz body widths")
    add("--bc-temperature", type=float, default=TrainConfig.temperature, help="REaaS-BC loss temperature")
    # the prototype row's defaults: the best ACR of benchmarks/results/heads.md's prototype rows
    add("--proto-margin", type=float, default=4.0, help="prototype head's margin eps (feature units)")
    add("--proto-epochs", type=int, default=100, help="prototype head's training epochs")
    add("--prototypes", type=int, default=TrainConfig.prototypes, help="prototype head's prototypes per class")
    add("--sc-fractions", type=floats, default=(0.05, 0.1, 0.15, 0.2, 0.3, 0.4),
        help="REaaS-SC sigma grid, fractions of the feature spread, selected on 200 held-out training features")
    add("--sc-heads", default="mlp,mlp+cr",
        help="REaaS-SC head candidates, selected with sigma on the held-out features (reaas_client.smoothing_selection:"
             " 'mlp' the paper's MLP, '+cr' trained with consistency regularisation)")
    add("--sigmas", type=floats, default=(0.25, 0.5, 1.0), help="Cohen LeNet noise levels (pixels)")
    add("--consistency", type=floats, default=(0.0, 5.0),
        help="consistency weights lambda of the LeNet rows (0: plain noise training; > 0: 2 noisy copies)")
    add("--lenet-epochs", type=int, default=60, help="LeNet training epochs")
    add("--n", type=int, default=100_000, help="N of every smoothing certificate (LeNet and REaaS-SC)")
    add("--smooth-test", type=int, default=100,
        help="test digits certified by the smoothing rows: a class-balanced seeded subset (the test set is sorted by "
             "class, so its first 100 digits are all zeros); 1000 = all")
    add("--pixel-epochs", type=int, default=120, help="training epochs of the 1-Lipschitz pixel network")
    add("--pixel-margin", type=float, default=4.0, help="margin eps of the 1-Lipschitz pixel network (pixels)")
    add("--pixel-hidden", default="1024,1024", help="widths of the 1-Lipschitz pixel network")
    add("--attack-steps", type=int, default=100, help="PGD steps at each certified radius")
    add("--attack-restarts", type=int, default=5, help="PGD restarts at each certified radius")
    add("--tightness-max-radius", type=float, default=6.0,
        help="deterministic rows: the end-to-end attack radius is searched in [0, this] (censored beyond)")
    add("--tightness-search", type=int, default=9, help="bisection steps of the end-to-end attack radius")
    add("--tightness-targets", type=int, default=3,
        help="targeted PGD toward this many nearest runner-up classes at each probe (besides the untargeted one)")
    add("--seed", type=int, default=0, help="seed of training, noise and attacks")
    add("--rows", type=lambda text: tuple(text.split(",")), default=ROW_KINDS,
        help=f"which rows to run, comma-separated from {','.join(ROW_KINDS)} (default: all)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the LeNets train and every smoothing row draws its noise and runs its classifier (default: CUDA "
             "when present; N = 10^5 smoothing of 100 digits costs ~37 min a row on 2 CPU cores, seconds on a GPU)")
    add("--threads", type=int, default=1, help="torch CPU threads (default 1: 2 shared cores)")
    add("--name", default="rivals", help="results file stem under benchmarks/results/")
    args = parser.parse_args(argv)
    unknown = set(args.rows) - set(ROW_KINDS)
    if unknown:
        parser.error(f"unknown --rows {', '.join(sorted(unknown))}; choose from {', '.join(ROW_KINDS)}")
    torch.set_num_threads(args.threads)
    splits = load_embedded_mnist()
    images = splits.downstream_train.images.flatten(1)
    labels = splits.downstream_train.labels
    test, test_labels = splits.downstream_test.images.flatten(1), splits.downstream_test.labels
    few_index = stratified_subset(test_labels, args.smooth_test, args.seed)
    few, few_labels = test[few_index], test_labels[few_index]
    features, _, test_features, _ = pca_features()
    pgd = {"steps": args.attack_steps, "restarts": args.attack_restarts, "seed": args.seed}
    rows: list[RivalRow] = []

    def log(row: RivalRow) -> None:
        rows.append(row)
        print("| " + " | ".join(map(str, row.cells())) + " |", flush=True)

    tightness = AttackConfig(args.tightness_max_radius, args.tightness_search, args.attack_steps,
                             args.attack_restarts, args.seed, targets=args.tightness_targets)
    margin_head = TrainConfig(head="lipschitz", hidden=(512, 512), batch_size=128, seed=args.seed)
    bc_hidden = tuple(int(w) for w in args.bc_hidden.split(","))
    bc_config = replace(margin_head, head=args.bc_head, margin=args.bc_margin, epochs=args.bc_epochs,
                        hidden=bc_hidden, temperature=args.bc_temperature)
    if "reaas-bc" in args.rows:
        started = time.perf_counter()
        views = pca_views(args.bc_augment, args.seed) if args.bc_augment else None
        bc = train_classifier(*training_rows(features, labels, views), 10, bc_config)
        augmented = f", {args.bc_augment} augmented copies per training digit" if args.bc_augment else ""
        log(deterministic_row("REaaS-BC", bc, test_features, test_labels,
                              queries=f"{1 + args.bc_augment} train + 2 test", train_s=time.perf_counter() - started,
                              note=f"{args.bc_head} {'-'.join(map(str, bc_hidden))}, eps {args.bc_margin:g}, "
                                   f"{args.bc_epochs} epochs{augmented}",
                              end_to_end=(nn.Sequential(load_demo_encoder("pca").model.eval(), bc), test),
                              tightness=tightness, **pgd))

    if "reaas-bc-prototype" in args.rows:
        started = time.perf_counter()
        config = TrainConfig(head="prototype", margin=args.proto_margin, epochs=args.proto_epochs,
                             prototypes=args.prototypes, seed=args.seed)
        prototype = train_classifier(features, labels, 10, config)
        log(deterministic_row("REaaS-BC, prototype head", prototype, test_features, test_labels,
                              queries="1 train + 2 test", train_s=time.perf_counter() - started,
                              note=f"{args.prototypes} prototypes per class, eps {args.proto_margin:g}, "
                                   f"{args.proto_epochs} epochs, exact certificate",
                              end_to_end=(nn.Sequential(load_demo_encoder("pca").model.eval(), prototype), test),
                              tightness=tightness, **pgd))

    if "reaas-sc" in args.rows:
        started = time.perf_counter()
        spread = feature_spread(features)
        mlp = TrainConfig(hidden=(512, 512), epochs=100, batch_size=128, seed=args.seed)
        candidates = smoothing_candidates(args.sc_heads.split(","), selected=bc_config, mlp=mlp, margin=margin_head)
        chosen = select_smoothing(features, labels, 10, candidates, [f * spread for f in args.sc_fractions],
                                  seed=args.seed)
        print(chosen.table(), flush=True)
        sc = train_classifier(features, labels, 10, replace(candidates[chosen.head], noise_sigma=chosen.sigma))
        log(smoothed_row("REaaS-SC", sc, test_features[few_index], few_labels, chosen.sigma, args.n,
                         args.seed, queries="1 train + 2 test", train_s=time.perf_counter() - started,
                         note=f"{chosen.head}, sigma_F {chosen.sigma:.3g} ({chosen.sigma / spread:g} x spread), "
                              f"head and sigma_F chosen on held-out training features, N {args.n}",
                         device=args.device))

    if "pixel" in args.rows:
        hidden = tuple(int(w) for w in args.pixel_hidden.split(","))
        started = time.perf_counter()
        pixel = train_classifier(images, labels, 10, replace(margin_head, hidden=hidden, margin=args.pixel_margin,
                                                             epochs=args.pixel_epochs))
        log(deterministic_row("1-Lipschitz net on pixels", pixel, test, test_labels, queries="0 (no encoder)",
                              train_s=time.perf_counter() - started,
                              note=f"AOL 784-{'-'.join(map(str, hidden))} + MaxMin, eps {args.pixel_margin:g}, "
                                   f"{args.pixel_epochs} epochs", tightness=tightness, **pgd))

    for sigma in args.sigmas if "cohen" in args.rows else ():
        for weight in args.consistency:
            started = time.perf_counter()
            model = train_noisy_lenet(images, labels, sigma, consistency=weight, epochs=args.lenet_epochs,
                                      seed=args.seed, device=args.device)
            label = f"Cohen LeNet sigma {sigma:g}" + (f" + consistency (m 2, lambda {weight:g})" if weight else "")
            log(smoothed_row(label, model, few, few_labels, sigma, args.n, args.seed, queries="0 (no encoder)",
                             train_s=time.perf_counter() - started,
                             note=f"{args.lenet_epochs} epochs noise training, N {args.n}", device=args.device))

    headers = ["row", "test digits", "clean acc", "ACR", *[f"CA@{r:g}" for r in RADII], "queries / input",
               "client compute s", "PGD flips inside R (certified)", "end-to-end attack radius (mean)",
               "certified / attack (means)", "note"]
    png = RESULTS / f"{args.name}.png"
    plot(rows, png)
    smoothing = (f" (smoothing rows: {args.smooth_test} class-balanced test digits)"
                 if {"reaas-sc", "cohen"} & set(args.rows) else "")
    body = (f"Same 2 000 training digits and the same test digits in order{smoothing}; radii are l2 in pixel space, wrong or abstained inputs count 0. Client compute: "
            "training plus certification on this machine (REaaS rows exclude the provider's Feature / F2IPerturb "
            f"time; smoothing rows and the LeNets' training ran on {args.device}). PGD: l2, float64, at each certified radius, "
            f"{args.attack_steps} steps x {args.attack_restarts} restarts. Deterministic rows also carry the "
            "end-to-end attack radius (pixels -> PCA -> h for REaaS-BC; the network itself on pixels) per test digit, "
            f"{tightness.describe()}, and mean certified / mean attack radius: the tightness of the certificate "
            "(1 = nothing left for a tighter bound; an attack radius below a certified one would be a soundness "
            "bug, counted in the PGD column).\n\n"
            + markdown_table(headers, [row.cells() for row in rows])
            + f"\n\n![certified accuracy vs radius]({png.name})\n")
    print(write_results(args.name, "REaaS against end-to-end rivals on the embedded digits", body,
                        make_target="bench-rivals"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
