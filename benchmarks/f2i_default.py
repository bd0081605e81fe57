"""The default F2I bound ("auto") against the tightest bound offered ("best"), per shipped encoder.

Issue 9's goal: on the product encoder the default answers >= 1 000 images/s on CPU with radii >= 0.99x those of
the tightest bound. For each encoder: images/s of "auto" in-process on the test digits, how many it answered in
closed form, and radius(auto) / radius(best) on a subset ("best" is the minimum of every sound bound with CROWN
intermediate bounds, seconds per image). `make bench-f2i` -> benchmarks/results/f2i_default.md.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks.environment import markdown_table, write_results
from bounds import f2i_radius
from robust_pretrain import load_demo_encoder, load_embedded_mnist


def measure(kind: str, images: torch.Tensor, feature_radius: float, best_count: int) -> list[object]:
    encoder = load_demo_encoder(kind)
    lipschitz = encoder.metadata.lipschitz_upper
    radii = torch.full((images.shape[0],), feature_radius)
    started = time.perf_counter()
    auto = f2i_radius(encoder.model, images, radii, bound="auto", lipschitz_upper=lipschitz)
    auto_seconds = time.perf_counter() - started
    closed = sum(1 for bound, steps in zip(auto.bound, auto.search_steps.tolist(), strict=True)
                 if bound == "lipschitz" and steps == 0)
    started = time.perf_counter()
    best = f2i_radius(encoder.model, images[:best_count], radii[:best_count], bound="best",
                      lipschitz_upper=lipschitz)
    best_seconds = (time.perf_counter() - started) / best_count
    ratio = auto.image_radius[:best_count] / best.image_radius.clamp(min=1e-300)
    return [kind, f"{lipschitz:.6g}", feature_radius, images.shape[0], f"{images.shape[0] / auto_seconds:,.1f}",
            f"{closed}/{images.shape[0]}", best_count, f"{float(ratio.min()):.4f}", f"{float(ratio.mean()):.4f}",
            f"{best_seconds:.3f}", "met" if images.shape[0] / auto_seconds >= 1000 and ratio.min() >= 0.99 else "NOT met"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", default="pca,lipschitz",
                        help="shipped demo kinds, comma-separated (spectral: ~1 s per image of search)")
    parser.add_argument("--images", type=int, default=200, help="test digits for the auto throughput")
    parser.add_argument("--best-images", type=int, default=10, help="test digits on which 'best' is compared")
    parser.add_argument("--feature-radii", default="0.5,1.5", help="R_F values (feature units)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    images = load_embedded_mnist().downstream_test.images
    images = images[torch.linspace(0, len(images) - 1, args.images).round().long()]
    rows = []
    for kind in args.encoders.split(","):
        for feature_radius in (float(r) for r in args.feature_radii.split(",")):
            rows.append(measure(kind, images, feature_radius, args.best_images))
            print(rows[-1], flush=True)
    body = "\n".join([
        markdown_table(["encoder", "L (sound)", "R_F", "images", "auto images/s", "closed form", "best images",
                        "min auto/best", "mean auto/best", "best s/image", "goal (>= 1 000/s, >= 0.99x)"], rows),
        "",
        "auto = closed form R_F(1 - 1e-4)/L where a lower bound of ||J(x)|| proves no K·r bound beats it by the "
        "search tolerance (1e-3), best_ibp search elsewhere. The goal is about the product encoder (pca); the other "
        "rows show what auto costs where the test cannot decide (the learned MaxMin encoder: ||J(x)|| ~ 0.94 L) or "
        "where local bounds really pay (the paper's spectral ReLU CNN).",
    ])
    write_results("f2i_default", "F2I: the default bound against the tightest", body, make_target="bench-f2i")
    return 0


if __name__ == "__main__":
    sys.exit(main())
