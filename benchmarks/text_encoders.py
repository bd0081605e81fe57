"""Text encoders on Rotten Tomatoes reviews: clean accuracy and exact BC ACR per shipped encoder, head and margin.

Each shipped text demo encoder (robust_pretrain.demo.TEXT_DEMO_KINDS, made from provider text without labels) maps
the 10 000 training reviews and the first --test reviews of the 2 808 test reviews (split_text_set) to features;
the client trains a margin head (reaas_client TrainConfig, the Lipschitz-margin loss at eps · L in feature units, so
eps is in the units of the embedding matrix) and certifies each test review with the exact BC radius of a margin
head, margin / (||w_y - w_j|| · L_body) (bounds.lipschitz_margin_radius), divided by the encoder's recorded sound
global bound L. The ACR counts wrong predictions as 0. A head that predicts one class on every test review has no
meaningful radius: the row says "collapsed" and its ACR is reported as 0; a head no more accurate than the majority
class (0.584 of the first 500 test reviews) is marked "<= majority": its radius is not a frontier point either.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from benchmarks.environment import markdown_table, write_results
from bounds import global_lipschitz_upper, lipschitz_margin_radius
from reaas_client.downstream import TrainConfig, train_classifier
from robust_pretrain.demo import TEXT_DEMO_KINDS, load_demo_encoder
from robust_pretrain.text_data import TextSet, load_rotten_tomatoes, split_text_set
from robust_pretrain.text_embeddings import nearest_neighbour_distances
from robust_pretrain.text_encoders import fit_text_bag_features
from robust_pretrain.text_input import TextInput

DEFAULT_HEADS = ("linear:0,linear:0.005,linear:0.01,linear:0.02,linear:0.05,"
                 "lipschitz:0:0.001,lipschitz:0.005:0.001,lipschitz:0.01:0.001")


def features(model: nn.Module, text: TextInput, texts: TextSet, batch: int = 1000) -> torch.Tensor:
    """[len(texts), feature_dim]: the encoder's features of the tokenised, embedded texts."""
    ids = text.vocabulary.encode(texts.texts)
    with torch.no_grad():
        return torch.cat([model(text.embed(ids[i:i + batch])) for i in range(0, len(ids), batch)])


def encoders_to_measure(kinds: list[str], features_width: int) -> list[tuple[str, nn.Module, TextInput, float]]:
    """(name, model, front end, sound L) per shipped kind, plus random word features of `features_width` channels
    fitted here on the first kind's front end (text_bag_features: not shipped, measured beside the others)."""
    rows = []
    for kind in kinds:
        encoder = load_demo_encoder(kind)
        rows.append((kind, encoder.model, encoder.text, encoder.metadata.lipschitz_upper))
    if features_width:
        text = rows[0][2]
        model = fit_text_bag_features(text.input_shape, features_width)
        rows.append((f"text_bag_features-{features_width} (not shipped)", model, text,
                     global_lipschitz_upper(model, text.input_shape)))
    return rows


def parse_head(spec: str, default_lr: float) -> tuple[str, str, str]:
    """"linear" -> (linear, 0, default_lr); "linear:0.01" -> (linear, 0.01, default_lr); "lipschitz:0:1e-3"."""
    parts = spec.split(":")
    return parts[0], parts[1] if len(parts) > 1 else "0", parts[2] if len(parts) > 2 else str(default_lr)


def evaluate_head(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                  lipschitz: float, config: TrainConfig) -> dict:
    """Train head `config` (margin already in feature units) and certify it: accuracy, ACR in input units."""
    started = time.perf_counter()
    head = train_classifier(train, train_labels, 2, config)
    with torch.no_grad():
        prediction = head(test).argmax(dim=1)
    correct = prediction == test_labels
    collapsed = prediction.unique().numel() < 2
    radius = lipschitz_margin_radius(head, test, prediction) / lipschitz
    acr = 0.0 if collapsed else float(torch.where(correct, radius, 0.0).mean())
    return {"accuracy": float(correct.float().mean()), "acr": acr, "collapsed": collapsed,
            "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", choices=TEXT_DEMO_KINDS, default=list(TEXT_DEMO_KINDS),
                        help="shipped text encoders to measure")
    parser.add_argument("--heads", default=DEFAULT_HEADS,
                        help="head:eps[:lr], comma-separated; head linear or lipschitz, eps in embedding-matrix "
                        "units (the training margin is eps · L in feature units), lr overrides --lr")
    parser.add_argument("--features-width", type=int, default=1024,
                        help="also measure text_bag_features of this width on the first kind's front end (0: no)")
    parser.add_argument("--test", type=int, default=500, help="first N test reviews certified")
    parser.add_argument("--epochs", type=int, default=60, help="head training epochs")
    parser.add_argument("--lr", type=float, default=0.05, help="head Adam learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.0,
                        help="head weight decay (0: the features are small, 1e-4 costs 3 points of accuracy)")
    parser.add_argument("--hidden", default="256,256", help="widths of the lipschitz head's body")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    parser.add_argument("--output-name", default="text_encoders", help="writes benchmarks/results/<name>.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train, test = split_text_set(load_rotten_tomatoes())
    test = test.subset(torch.arange(min(args.test, len(test))), f"test{args.test}")
    majority = float(torch.bincount(test.labels).max()) / len(test)
    base = TrainConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                       hidden=tuple(int(w) for w in args.hidden.split(",")))
    rows, encoders = [], []
    for kind, model, text, lipschitz in encoders_to_measure(args.kinds, args.features_width):
        nearest = float(nearest_neighbour_distances(text.embedding).median())
        train_features, test_features = features(model, text, train), features(model, text, test)
        encoders.append([kind, train_features.shape[1], text.input_shape, f"{lipschitz:.4f}", f"{nearest:.3f}"])
        for spec in args.heads.split(","):
            head, eps, lr = parse_head(spec, args.lr)
            config = TrainConfig(**{**base.__dict__, "head": head, "margin": float(eps) * lipschitz, "lr": float(lr)})
            result = evaluate_head(train_features, train.labels, test_features, test.labels, lipschitz, config)
            note = "collapsed" if result["collapsed"] else "<= majority" if result["accuracy"] <= majority else ""
            rows.append([kind, head, f"{float(eps):g}", f"{float(lr):g}", f"{result['accuracy']:.3f}",
                         f"{result['acr']:.3f}", note, f"{result['seconds']:.0f}"])
            print("| " + " | ".join(rows[-1]) + " |", flush=True)
    body = "\n\n".join([
        __doc__.split("\n\n", 1)[1].strip(),
        f"Head: Adam (lr per row), weight decay {args.weight_decay:g}, {args.epochs} epochs, lipschitz body "
        f"{args.hidden}; {len(train)} training reviews, {len(test)} test reviews (majority class {majority:.3f}).",
        markdown_table(["encoder", "features", "input [d, 1, max_length]", "L (sound, recorded)",
                        "median nearest-neighbour distance in E"], encoders),
        markdown_table(["encoder", "head", "eps", "lr", "clean acc", "BC ACR", "collapsed?", "head s"], rows)])
    path = write_results(args.output_name, "Text encoders: clean accuracy and BC ACR on Rotten Tomatoes", body,
                         make_target="bench-text-encoders" if argv is None and args.output_name == "text_encoders"
                         else None)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
