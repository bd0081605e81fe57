"""How tight could a local-Lipschitz bound get? Our bound against the limit of its own relaxation and the attack.

    python -m benchmarks.jacobian_limit [--inputs 20] [--radii 0.1,0.5,2.5] [--encoders demo,cifar]

`local_lipschitz` (bounds.feature_distance) bounds ||J||_2 over every Jacobian J = W_L D_{L-1} ... D_1 W_1 whose
diagonal slopes D_k are 0 / 1 on stable neurons and anywhere in [0, 1], independently, on the unstable ones (the
intermediate bounds on the ball decide which). Per image and radius r this reports, in units of feature distance
per unit of image distance:

* `bound`: our sound upper bound K(r) of that supremum (CROWN intermediate bounds, as the "best" bound uses);
* `slope limit`: a *lower* bound of the same supremum, found by alternating ascent (power steps for the singular
  vectors, the optimal 0/1 slope per unstable neuron given the others); no bound that treats the slopes as
  independent can go below it, however clever;
* `attack`: what PGD achieves, max ||f(x + d) - f(x)|| / r over ||d|| <= r (a lower bound of the truth).

So attack / bound is the tightness our bound reaches at r, and attack / slope limit the best tightness any
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
from bounds.graph import BoundGraph
from bounds.operators import AddOperator, AffineOperator, Box, ReLUOperator


def _slope_sets(graph: BoundGraph, boxes: list[Box]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """relu node -> (fixed slope on stable neurons, mask of unstable neurons), each [batch, *shape]."""
    sets = {}
    for index, node in enumerate(graph.nodes):
        if isinstance(node.op, ReLUOperator):
            box = boxes[node.inputs[0]]
            unstable = (box.lower < 0) & (box.upper > 0)
            sets[index] = ((box.lower >= 0).to(box.lower.dtype), unstable)
    return sets


def _jvp(graph: BoundGraph, slopes: dict[int, torch.Tensor], v: torch.Tensor) -> dict[int, torch.Tensor]:
    """Every node's value of J(D)·v (biases dropped), the forward signal at each relu's input included."""
    values = {0: v}
    for index in range(1, len(graph.nodes)):
        node = graph.nodes[index]
        inputs = [values[i] for i in node.inputs]
        if isinstance(node.op, ReLUOperator):
            values[index] = inputs[0] * slopes[index]
        elif isinstance(node.op, AffineOperator):
            values[index] = node.op.linear(inputs[0])
        elif isinstance(node.op, AddOperator):
            values[index] = inputs[0] + inputs[1]
        else:
            raise TypeError(f"no linear map for {type(node.op).__name__}")
    return values


def _vjp(graph: BoundGraph, slopes: dict[int, torch.Tensor], u: torch.Tensor) -> dict[int, torch.Tensor]:
    """Every node's cotangent of u·J(D) (the backward signal at each relu's output included)."""
    grads = {graph.output_index: u}
    for index in range(graph.output_index, 0, -1):
        node = graph.nodes[index]
        if index not in grads:
            continue
        grad = grads[index]
        if isinstance(node.op, ReLUOperator):
            pulled = [grad * slopes[index]]
        elif isinstance(node.op, AffineOperator):
            pulled = [node.op.vjp(grad)]
        else:
            pulled = [grad, grad]
        for source, g in zip(node.inputs, pulled, strict=True):
            grads[source] = grads[source] + g if source in grads else g
    return grads


def slope_limit(graph: BoundGraph, images: torch.Tensor, boxes: list[Box], *, restarts: int = 4,
                iterations: int = 40, seed: int = 0) -> torch.Tensor:
    """Lower bound [batch] of sup ||J(D)||_2 over independent slopes (see the module docstring): every value is
    ||J(D)·v|| for an actual admissible D and unit v. The first restart starts from the slopes at the images
    themselves (admissible: the images lie in their balls), the others from random 0/1 slopes."""
    sets = _slope_sets(graph, boxes)
    batch = boxes[0].lower.shape[0]
    generator = torch.Generator().manual_seed(seed)
    best = torch.zeros(batch, dtype=torch.float64)
    view = (batch,) + (1,) * len(graph.input_shape)
    values = graph.forward_all(images)
    at_images = {i: (values[graph.nodes[i].inputs[0]] > 0).to(f.dtype) for i, (f, _) in sets.items()}
    for restart in range(restarts):
        slopes = {i: torch.where(u, at_images[i] if restart == 0 else
                                 torch.randint(0, 2, u.shape, generator=generator).to(f.dtype), f)
                  for i, (f, u) in sets.items()}
        v = torch.randn(batch, *graph.input_shape, generator=generator).to(boxes[0].lower.dtype)
        for _ in range(iterations):
            v = v / v.reshape(batch, -1).norm(dim=1).clamp(min=1e-30).reshape(view)
            forward = _jvp(graph, slopes, v)
            out = forward[graph.output_index].reshape(batch, -1)
            best = torch.maximum(best, out.norm(dim=1).to(torch.float64))
            u = (out / out.norm(dim=1, keepdim=True).clamp(min=1e-30)).reshape(forward[graph.output_index].shape)
            backward = _vjp(graph, slopes, u)
            # u·J(D)·v is linear in each D_k: the best 0/1 slope of an unstable neuron is 1 iff its forward signal
            # times its backward signal is positive (one layer at a time keeps the update an ascent)
            for index, (fixed, unstable) in sets.items():
                gain = forward[graph.nodes[index].inputs[0]] * backward[index]
                slopes[index] = torch.where(unstable, (gain > 0).to(fixed.dtype), fixed)
                forward = _jvp(graph, slopes, v)
                backward = _vjp(graph, slopes, u)
            v = backward[0]
        v = v / v.reshape(batch, -1).norm(dim=1).clamp(min=1e-30).reshape(view)
        best = torch.maximum(best, _jvp(graph, slopes, v)[graph.output_index].reshape(batch, -1).norm(dim=1)
                             .to(torch.float64))
    return best


def run(encoders: list[str], inputs: int, radii: list[float]) -> list[str]:
    lines = []
    for name, model, images in encoders_under_test(encoders, inputs):
        graph = bounds.build_graph(model, tuple(images.shape[1:]))
        generator = torch.Generator().manual_seed(0)
        lines += [f"## {name}", "", "| r | bound K(r) | slope limit | attack | attack / bound | attack / slope limit "
                  "| unstable ReLUs | s |", "|---|---|---|---|---|---|---|---|"]
        for r in radii:
            start = time.perf_counter()
            bound, limit, attack, unstable = [], [], [], []
            for chunk in images.split(10):  # CROWN intermediate bounds of a whole conv layer: keep memory modest
                radius = torch.full((chunk.shape[0],), r)
                with torch.no_grad():
                    boxes = bounds.compute_bounds(graph, bounds.InputBall(chunk, radius), intermediate="crown")
                    bound.append(local_jacobian_norm(graph, boxes))
                    limit.append(slope_limit(graph, chunk, boxes))
                    unstable.append(torch.stack([u.flatten(1).float().mean(dim=1)
                                                 for _, u in _slope_sets(graph, boxes).values()], dim=1))
                distance, _ = bounds.pgd_feature_distance(model, chunk, radius, steps=100, restarts=3,
                                                          generator=generator)
                attack.append(distance / r)
            bound, limit, attack = (torch.cat(t).to(torch.float64) for t in (bound, limit, attack))
            unstable = torch.cat(unstable).mean(dim=0).tolist()
            if bool((attack > bound * (1 + 1e-4)).any()) or bool((limit > bound * (1 + 1e-4)).any()):
                raise AssertionError(f"{name}, r={r}: a lower bound exceeds the sound bound K(r): soundness bug")
            lines.append(f"| {r} | {bound.mean():.4f} | {limit.mean():.4f} | {attack.mean():.4f} | "
                         f"{(attack / bound).mean():.3f} | {(attack / limit).mean():.3f} | "
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
