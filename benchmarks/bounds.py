"""Benchmark of the F2I bounds: certified image radius R per bound, time and peak memory per image, and the PGD
attack limit R_atk (the smallest r at which PGD moves the features by R_F; no sound bound can exceed it).

    python -m benchmarks.bounds [--inputs 50] [--feature-radii 0.1,0.5,1.0] [--encoders demo,cifar]

Encoders: the demo encoder (`robust_pretrain.load_demo_encoder("spectral")`: the shipped checkpoint, or its
labelled seeded-init stand-in while none is shipped) on embedded-MNIST test digits, and a CIFAR-sized 4-conv
encoder (seeded init, built here from the bounds vocabulary) on the same digits padded to 32x32 and repeated over
3 channels (no CIFAR-10 on this machine). Writes a Markdown report (default benchmarks/results/bounds.md).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import bounds
from benchmarks.environment import machine_summary
from bounds.search import batched_binary_search

BOUNDS = ("lipschitz", "ibp", "crown", "crown_spectral", "local_lipschitz", "best", "best_ibp")


@dataclass(frozen=True)
class Row:
    encoder: str
    bound: str
    feature_radius: float
    mean_radius: float
    seconds_per_image: float
    peak_bytes_per_image: float
    steps: float
    deciders: str
    tightness: float  # mean over images of R / R_atk
    vs_crown: float  # mean R / mean R(crown)


def _cifar_encoder(seed: int = 0) -> nn.Module:
    """Seeded 4-conv encoder with every layer rescaled to spectral norm 1 (a stand-in for the spectral-norm
    penalised pre-training; default init alone makes the net so contractive that R_atk dwarfs the image)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 4, stride=2, padding=1), nn.ReLU(),  # 16x16
        nn.Conv2d(8, 16, 4, stride=2, padding=1), nn.ReLU(),  # 8x8
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),  # 8x8
        nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(),  # 4x4
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 32),
    ).eval()
    graph = bounds.build_graph(model, (3, 32, 32), dtype=torch.float64)
    layers = [m for m in model if isinstance(m, nn.Conv2d | nn.Linear)]
    operators = [n.op for n in graph.nodes[1:] if hasattr(n.op, "weight")]
    with torch.no_grad():
        for layer, op in zip(layers, operators, strict=True):
            layer.weight.div_(bounds.operator_norm_upper(op))
    return model


def encoders_under_test(names: list[str], inputs: int) -> list[tuple[str, nn.Module, torch.Tensor]]:
    from robust_pretrain import load_demo_encoder, load_embedded_mnist

    digits = load_embedded_mnist().downstream_test
    # a class-balanced, deterministic pick of test digits
    order = torch.argsort(torch.arange(len(digits.labels)) % 10 * 10_000 + torch.arange(len(digits.labels)))
    images = digits.images[order[torch.arange(inputs) * (len(order) // inputs)]]
    result = []
    if "demo" in names:
        loaded = load_demo_encoder("spectral")
        label = f"demo `{loaded.metadata.model_id}` ({loaded.metadata.description.split('(')[0].strip()})"
        result.append((label, loaded.model, images))
    if "cifar" in names:
        padded = nn.functional.pad(images, (2, 2, 2, 2)).repeat(1, 3, 1, 1)
        result.append(("cifar-sized 4-conv, seeded init, layers at spectral norm 1 (3x32x32)", _cifar_encoder(),
                       padded))
    return result


class _PeakMemory:
    """Peak memory of the block: CUDA allocator peak on a GPU, else the process's peak RSS (VmHWM, reset through
    /proc/self/clear_refs) above the RSS at entry."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        return 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            with contextlib.suppress(OSError):  # not Linux: the peak then counts from process start
                Path("/proc/self/clear_refs").write_text("5")
            self.base = self._status("VmRSS:")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.peak = max(0, self._status("VmHWM:") - self.base)


def attack_limit(model: nn.Module, images: torch.Tensor, feature_radius: float, guess: torch.Tensor,
                 seed: int = 0) -> torch.Tensor:
    """R_atk [batch]: the largest r found at which PGD does not yet move the features by R_F (relative 1e-2)."""
    generator = torch.Generator().manual_seed(seed)

    def not_reached(radius: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        distance, _ = bounds.pgd_feature_distance(model, images[index.to(images.device)], radius.to(images.dtype),
                                                  steps=40, restarts=2, generator=generator)
        return (distance < feature_radius).cpu()

    radius, _ = batched_binary_search(not_reached, torch.zeros(images.shape[0]), guess, tolerance=1e-2,
                                      max_steps=40)
    return radius


def run(encoders: list[str], inputs: int, feature_radii: list[float], device: torch.device,
        memory_budget: int, tolerance: float, bound_names: tuple[str, ...]) -> tuple[list[Row], list[str]]:
    rows, notes = [], []
    for name, model, images in encoders_under_test(encoders, inputs):
        model = model.to(device)
        images = images.to(device)
        shape = tuple(images.shape[1:])
        lipschitz = bounds.global_lipschitz_upper(model, shape)
        notes.append(f"{name}: global Lipschitz upper bound {lipschitz:.4g}")
        for feature_radius in feature_radii:
            radii = torch.full((images.shape[0],), feature_radius)
            results = {}
            for bound in bound_names:
                with _PeakMemory(device) as memory:
                    start = time.perf_counter()
                    result = bounds.f2i_radius(model, images, radii, bound=bound, lipschitz_upper=lipschitz,
                                               memory_budget_bytes=memory_budget, tolerance=tolerance)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    elapsed = time.perf_counter() - start
                results[bound] = (result, elapsed, memory.peak)
                print(f"  {name[:40]:40s} R_F={feature_radius:<4} {bound:16s} mean R={result.image_radius.mean():.4f}"
                      f"  {elapsed / images.shape[0]:.3f} s/image", flush=True)
            largest = torch.stack([r.image_radius for r, _, _ in results.values()]).max(dim=0).values
            limit = attack_limit(model, images, feature_radius, 4 * largest.clamp(min=1e-6))
            # the attack limit is found to 1e-2 relative: a certified radius beyond 1.01·R_atk is a soundness bug
            violations = {b: int((r.image_radius > limit * 1.01 + 1e-9).sum()) for b, (r, _, _) in results.items()}
            notes.append(f"{name}, R_F={feature_radius}: mean R_atk {limit.mean():.4f}; images where a certified "
                         f"radius exceeds the attack limit: {sum(violations.values())} ({violations})")
            crown_mean = float(results["crown"][0].image_radius.mean())
            for bound, (result, elapsed, peak) in results.items():
                radius = result.image_radius
                counts = {b: result.bound.count(b) for b in sorted(set(result.bound))}
                rows.append(Row(
                    encoder=name, bound=bound, feature_radius=feature_radius, mean_radius=float(radius.mean()),
                    seconds_per_image=elapsed / images.shape[0], peak_bytes_per_image=peak / images.shape[0],
                    steps=float(result.search_steps.double().mean()),
                    deciders=", ".join(f"{b} {c}" for b, c in counts.items()),
                    tightness=float((radius / limit.clamp(min=1e-12)).mean()),
                    vs_crown=float(radius.mean()) / crown_mean if crown_mean > 0 else float("nan"),
                ))
            rows.append(Row(name, "attack limit R_atk", feature_radius, float(limit.mean()), float("nan"),
                            float("nan"), float("nan"), "PGD 40 steps x 2 restarts", 1.0, float("nan")))
    return rows, notes


def report(rows: list[Row], notes: list[str], command: str, device: torch.device, inputs: int) -> str:
    lines = ["# F2I bounds benchmark", "", f"Command: `{command}`", "", f"Machine: {machine_summary()}",
             f"Bounds computed on: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
                                                else ""),
             f"Inputs per encoder: {inputs}", "",
             "R: mean certified image radius; tightness: mean over images of R / R_atk; vs CROWN: mean R / mean "
             "R(crown); time and peak memory per image over the whole batched search (peak: CUDA allocator on a "
             "GPU, process peak RSS above the start on a CPU).", ""]
    for encoder in dict.fromkeys(r.encoder for r in rows):
        lines += [f"## {encoder}", "",
                  "| R_F | bound | mean R | tightness R/R_atk | vs CROWN | s / image | peak MiB / image | steps | "
                  "decided by |", "|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r.encoder == encoder):
            lines.append(f"| {r.feature_radius} | {r.bound} | {r.mean_radius:.4f} | {r.tightness:.3f} | "
                         f"{r.vs_crown:.2f} | {r.seconds_per_image:.4f} | {r.peak_bytes_per_image / 2**20:.2f} | "
                         f"{r.steps:.1f} | {r.deciders} |")
        lines.append("")
    lines += ["## Notes", ""] + [f"* {n}" for n in notes] + [""]
    lines += ["## Goals", ""] + _goals(rows) + [""]
    return "\n".join(lines)


def _goals(rows: list[Row]) -> list[str]:
    out = []
    for encoder in dict.fromkeys(r.encoder for r in rows):
        for feature_radius in dict.fromkeys(r.feature_radius for r in rows):
            pick = {r.bound: r for r in rows if r.encoder == encoder and r.feature_radius == feature_radius}
            combined = "best" if "best" in pick else "best_ibp"
            best, crown = pick[combined], pick["crown"]
            out.append(
                f"* {encoder}, R_F={feature_radius}: combined ({combined}) R / CROWN-only R = {best.vs_crown:.2f} "
                f"({'met' if best.vs_crown >= 1.5 else 'missed'}, goal >= 1.5); tightness {best.tightness:.3f} "
                f"({'met' if best.tightness >= 0.8 else 'missed'}, goal >= 0.8); time {best.seconds_per_image:.4f} "
                f"vs CROWN-only {crown.seconds_per_image:.4f} s/image "
                f"({'met' if best.seconds_per_image < crown.seconds_per_image else 'missed'})")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=50, help="images per encoder (default 50)")
    parser.add_argument("--feature-radii", default="0.1,0.5,1.0", help="comma-separated R_F values")
    parser.add_argument("--encoders", default="demo,cifar", help="comma-separated subset of demo,cifar")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    parser.add_argument("--memory-budget-mib", type=int, default=1024, help="F2I memory budget (MiB)")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="relative tolerance of every radius search")
    parser.add_argument("--bounds", default=",".join(BOUNDS), help="comma-separated bounds (must include crown and best or best_ibp)")
    parser.add_argument("--output", default="benchmarks/results/bounds.md", help="Markdown report path")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    command = "python -m benchmarks.bounds " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"{command}\n{machine_summary()}\ndevice {device}", flush=True)
    rows, notes = run(args.encoders.split(","), args.inputs, [float(v) for v in args.feature_radii.split(",")],
                      device, args.memory_budget_mib * 2**20, args.tolerance, tuple(args.bounds.split(",")))
    text = report(rows, notes, command.strip(), device, args.inputs)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
