"""`reaas-certify`: train a downstream classifier over an encoder service and certify a test set.

Example (a REaaS server on port 50051, the embedded MNIST digits):

    reaas-certify --server 127.0.0.1:50051 --dataset mnist-embedded --path reaas-bc --test-size 200
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reaas_client.client import EncoderClient
from reaas_client.downstream import DEFAULT_CACHE_DIR, TrainConfig, stratified_subset
from reaas_client.metrics import summary_table_markdown, write_records_csv
from reaas_client.pipelines import PATHS, PathConfig, run_path
from reaas_client.plotting import plot_certified_accuracy


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reaas-certify",
        description="Train a downstream classifier h on features from an encoder service, then certify every "
                    "test input's l2 robustness by one of the paper's three paths, and print ACR, certified "
                    "accuracy and the queries each input cost.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    service = parser.add_argument_group("service")
    service.add_argument("--server", required=True, action="append",
                         help="server address host:port; repeat (or comma-separate) for several replicas, "
                              "spread by gRPC round_robin")
    service.add_argument("--api-key", default=None, help="API key sent as x-api-key (none: anonymous)")
    service.add_argument("--timeout", type=float, default=3600.0,
                         help="deadline of each RPC in seconds (a SEaaS-SC stream of n0 + n images is one RPC)")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True,
                      help="cifar10, svhn, stl10, tiny-imagenet (need --data) or mnist-embedded (shipped)")
    data.add_argument("--data", type=Path, default=None, help="folder with the data set's standard files")
    data.add_argument("--train-size", type=int, default=0,
                      help="training inputs used (class-balanced seeded subset; 0 = all)")
    data.add_argument("--test-size", type=int, default=500,
                      help="test inputs certified (class-balanced seeded subset; 0 = all)")
    cert = parser.add_argument_group("certification")
    cert.add_argument("--path", required=True, choices=PATHS,
                      help="reaas-bc: bound propagation on h + F2IPerturb (2 queries/test input); reaas-sc: "
                           "smoothing on h in feature space + F2IPerturb (2 queries/test input); seaas-sc: "
                           "smoothing in image space through the feature API (n0 + n queries/test input)")
    cert.add_argument("--sigma", type=float, default=0.25,
                      help="SC noise std: feature-space units for reaas-sc, pixel units ([0,1] scale) for "
                           "seaas-sc; also the training noise (ignored by reaas-bc)")
    cert.add_argument("--n0", type=int, default=100, help="SC samples to select the top class")
    cert.add_argument("--n", type=int, default=100_000, help="SC samples to estimate p_A")
    cert.add_argument("--alpha", type=float, default=0.001,
                      help="SC failure probability per certificate (Clopper-Pearson)")
    cert.add_argument("--method", choices=("crown", "ibp"), default="crown",
                      help="feature-space bound on h for reaas-bc")
    cert.add_argument("--bound", default="",
                      help="F2IPerturb bound the server searches with (see the server's bounds_offered; "
                           "empty = its default)")
    cert.add_argument("--batch-size", type=int, default=256, help="test inputs per Feature/F2IPerturb request")
    train = parser.add_argument_group("downstream classifier h (MLP)")
    train.add_argument("--hidden", default="256,256", help="hidden layer widths, comma-separated")
    train.add_argument("--epochs", type=int, default=60, help="training epochs")
    train.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of subsets, training and all noise")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                        help="where training features are cached (keyed by model sha256 + data set)")
    parser.add_argument("--no-cache", action="store_true", help="always fetch training features")
    parser.add_argument("--out", type=Path, default=Path("runs") / "certify",
                        help="folder for records.csv, ledger.csv, summary.md and the certified-accuracy PNG")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from robust_pretrain import load_dataset  # data sets only; imported late so --help stays instant

    train_set = load_dataset(args.dataset, args.data, "train")
    test_set = load_dataset(args.dataset, args.data, "test")
    train_idx = stratified_subset(train_set.labels, args.train_size, args.seed)
    test_idx = stratified_subset(test_set.labels, args.test_size, args.seed)
    config = PathConfig(
        path=args.path, sigma=args.sigma, n0=args.n0, n=args.n, alpha=args.alpha, method=args.method,
        bound=args.bound, seed=args.seed, batch_size=args.batch_size,
        train=TrainConfig(hidden=tuple(int(w) for w in args.hidden.split(",") if w), epochs=args.epochs,
                          lr=args.lr),
    )
    addresses = [a for item in args.server for a in item.split(",") if a]
    with EncoderClient(addresses, api_key=args.api_key, timeout_s=args.timeout) as client:
        info = client.info()
        print(f"encoder {info.model_id} ({info.model_sha256[:12]}), mode {info.mode}, "
              f"feature_dim {info.feature_dim}, {info.description}", file=sys.stderr)
        result = run_path(config, client, train_set.images[train_idx], train_set.labels[train_idx],
                          test_set.images[test_idx], test_set.labels[test_idx], train_set.num_classes,
                          dataset=args.dataset, cache_dir=None if args.no_cache else args.cache_dir,
                          progress=not args.quiet)
        args.out.mkdir(parents=True, exist_ok=True)
        write_records_csv(result.records, args.out / "records.csv")
        client.ledger.to_csv(args.out / "ledger.csv")
    table = summary_table_markdown([result.summary])
    (args.out / "summary.md").write_text(table + "\n")
    plot_certified_accuracy({result.summary.service: result.records}, args.out / "certified_accuracy.png",
                            title=args.dataset)
    print(table)
    print(f"h accuracy on its training features: {result.train_accuracy:.3f}; outputs in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
