"""How tight could a local-Lipschitz bound get? Our bound against the limit of its own relaxation and the attack.

    python -m benchmarks.jacobian_limit [--inputs 20] [--radii 0.1,0.5,2.5] [--encoders demo,cifar]

`local_lipschitz` (bounds.feature_distance) bounds ||J||_2 over every Jacobian J = W_L D_{L-1} ... D_1 W_1 whose
diagonal slopes D_k are 0 / 1 on stable neurons and anywhere in [0, 1], independently, on the unstable ones (the
intermediate bounds on the ball decide which). Per image and radius r this reports, in units of feature distance
per unit of image distance:

* `bound`: our sound upper bound K(r) of that supremum (CROWN intermediate bounds, as the "best" bound uses);
* `global`: bounds.global_lipschitz_upper, the same expansion with every ReLU unstable (valid at every r; the
  expansion is not monotone in the set of unstable neurons, so it can beat K(r));
* `slope limit`: a *lower* bound of the same supremum, found by alternating ascent (power steps for the singular
  vectors, the optimal 0/1 slope per unstable neuron given the others); no bound that treats the slopes as
  independent can go below it, however clever;
* `attack`: what PGD achieves, max ||f(x + d) - f(x)|| / r over ||d|| <= r (a lower bound of the truth).

So attack / min(bound, global) is the tightness our bounds reach at r, and attack / slope limit the best any
independent-slope (Clarke-Jacobian) bound could reach there; closing the rest needs reasoning about which slope
patterns can occur together (branch and bound over activations). Writes benchmarks/results/jacobian_limit.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import bounds
from benchmarks.bounds import encoders_under_test
from benchmarks.environment import machine_summary
from bounds.feature_distance import local_jacobian_norm
from bounds.slope_ascent import slope_ascent_lower, slope_sets


def run(encoders: list[str], inputs: int, radii: list[float]) -> list[str]:
    lines = []
    for name, model, images in encoders_under_test(encoders, inputs):
        graph = bounds.build_graph(model, tuple(images.shape[1:]))
        generator = torch.Generator().manual_seed(0)
        product = bounds.layer_product_lipschitz_upper(model, tuple(images.shape[1:]))
        global_bound = bounds.global_lipschitz_upper(model, tuple(images.shape[1:]))
        lines += [f"## {name}", "", f"Global bounds (valid at every r): layer-norm product {product:.4f}; "
                  f"global_lipschitz_upper (midpoint expansion, every ReLU unstable) {global_bound:.4f}.", "",
                  "| r | bound K(r) | slope limit | attack | attack / bound | attack / global | attack / slope limit "
                  "| unstable ReLUs | s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in radii:
            start = time.perf_counter()
            bound, limit, attack, unstable = [], [], [], []
            for chunk in images.split(10):  # CROWN intermediate bounds of a whole conv layer: keep memory modest
                radius = torch.full((chunk.shape[0],), r)
                with torch.no_grad():
                    boxes = bounds.compute_bounds(graph, bounds.InputBall(chunk, radius), intermediate="crown")
                    bound.append(local_jacobian_norm(graph, boxes))
                    limit.append(slope_ascent_lower(graph, chunk, boxes))
                    unstable.append(torch.stack([u.flatten(1).float().mean(dim=1)
                                                 for _, u in slope_sets(graph, boxes).values()], dim=1))
                distance, _ = bounds.pgd_feature_distance(model, chunk, radius, steps=100, restarts=3,
                                                          generator=generator)
                attack.append(distance / r)
            bound, limit, attack = (torch.cat(t).to(torch.float64) for t in (bound, limit, attack))
            unstable = torch.cat(unstable).mean(dim=0).tolist()
            ceiling = torch.minimum(bound, torch.full_like(bound, global_bound)) * (1 + 1e-4)
            if bool((attack > ceiling).any()) or bool((limit > bound * (1 + 1e-4)).any()):
                raise AssertionError(f"{name}, r={r}: a lower bound exceeds a sound upper bound: soundness bug")
            lines.append(f"| {r} | {bound.mean():.4f} | {limit.mean():.4f} | {attack.mean():.4f} | "
                         f"{(attack / bound).mean():.3f} | {(attack / global_bound).mean():.3f} | "
                         f"{(attack / limit).mean():.3f} | "
                         f"{', '.join(f'{u:.0%}' for u in unstable)} | {time.perf_counter() - start:.0f} |")
            print(lines[-1], flush=True)
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=20, help="images per encoder (default 20)")
    parser.add_argument("--radii", default="0.1,0.5,2.5", help="comma-separated image radii r")
    parser.add_argument("--encoders", default="demo,cifar", help="comma-separated subset of demo,cifar")
    parser.add_argument("--output", default="benchmarks/results/jacobian_limit.md", help="Markdown report path")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.jacobian_limit " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"{command}\n{machine_summary()}", flush=True)
    body = run(args.encoders.split(","), args.inputs, [float(v) for v in args.radii.split(",")])
    text = "\n".join([
        "# Local-Lipschitz bound vs the limit of its relaxation", "", f"Command: `{command.strip()}`", "",
        f"Machine: {machine_summary()}", f"Inputs per encoder: {args.inputs}", "",
        "Per unit of image radius r (means over images): `bound` is our sound K(r) (local_lipschitz, CROWN "
        "intermediate bounds); `slope limit` a lower bound of the supremum it bounds, over independent ReLU slopes "
        "(alternating ascent); `attack` PGD's feature distance / r. `unstable ReLUs`: share per ReLU layer.", "",
        *body])
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
