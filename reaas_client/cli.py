"""`reaas-certify`: train a downstream classifier over an encoder service and certify a test set.

Example (a REaaS server on port 50051, the embedded MNIST digits):

    reaas-certify --server 127.0.0.1:50051 --dataset mnist-embedded --path reaas-bc --test-size 200
    reaas-certify ... --path reaas-bc --head linear,lipschitz --margin 1,2,4 --hidden 512,512 --select-head
    reaas-certify ... --path reaas-sc --sigma 0.5 --n 1000000
    reaas-certify --server 127.0.0.1:50052 --dataset rt-embedded --path reaas-bc --head linear --margin 0.5
        (a text encoder: Rotten Tomatoes reviews, tokenized with the provider's vocabulary)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bounds import CERTIFY_METHODS
from reaas_client.client import EncoderClient
from reaas_client.command_line import (
    CommandLineParser,
    UsageError,
    add_standard_flags,
    existing_path,
    reported_errors,
)
from reaas_client.downstream import DEFAULT_CACHE_DIR, TrainConfig, stratified_subset
from reaas_client.head_selection import HeadSearch
from reaas_client.metrics import summary_table_markdown, summary_table_text, write_records_csv
from reaas_client.pipelines import PATHS, PathConfig, run_path
from reaas_client.plotting import plot_certified_accuracy
from reaas_client.seaas import WIRE_DTYPES
from reaas_client.tls import ClientTls

API_KEY_VARIABLE = "REAAS_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(
        prog="reaas-certify",
        environment={API_KEY_VARIABLE: "API key sent as x-api-key when --api-key is not given (unlike a flag, "
                                       "not visible in ps)"},
        description="Train a downstream classifier h on features from an encoder service, then certify every "
                    "test input's l2 robustness by one of the paper's three paths, and print ACR, certified "
                    "accuracy and the queries each input cost.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    service = parser.add_argument_group("service")
    service.add_argument("--server", required=True, action="append",
                         help="server address host:port; repeat (or comma-separate) for several replicas, "
                              "spread by gRPC round_robin")
    service.add_argument("--api-key", default=None,
                         help=f"API key sent as x-api-key (default: ${API_KEY_VARIABLE}, else none: anonymous); "
                              f"prefer ${API_KEY_VARIABLE}, since a flag is visible to every user in ps")
    service.add_argument("--timeout", type=float, default=3600.0,
                         help="deadline of each RPC in seconds (a SEaaS-SC stream of n0 + n images is one RPC)")
    tls = parser.add_argument_group("TLS", "without any of these the channel is insecure (loopback servers)")
    tls.add_argument("--tls", action="store_true",
                     help="TLS, trusting gRPC's default roots (implied by every other --tls-* flag)")
    tls.add_argument("--tls-ca", type=Path, default=None,
                     help="PEM CA certificates the server's certificate must chain to, instead of the default roots")
    tls.add_argument("--tls-client-cert", type=Path, default=None,
                     help="PEM client certificate for mutual TLS; needs --tls-client-key")
    tls.add_argument("--tls-client-key", type=Path, default=None, help="PEM private key of --tls-client-cert")
    tls.add_argument("--tls-server-name", default=None,
                     help="name the server's certificate carries, when not the host dialled (replicas on "
                          "several hosts)")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True,
                      help="images: cifar10, svhn, stl10, tiny-imagenet (need --data) or mnist-embedded (shipped); "
                           "text, for a text encoder: rt-embedded (shipped Rotten Tomatoes reviews, fresh/rotten), "
                           "sst2 (--data: a GLUE SST-2 TSV) or imdb (--data: a folder of pos/ and neg/ .txt files)")
    data.add_argument("--data", type=existing_path, default=None,
                      help="folder (or, for sst2, file) with the data set's standard files")
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
                           "seaas-sc (embedding units for text: rows of the embedding table have norm 1); also the "
                           "training noise (ignored by reaas-bc)")
    cert.add_argument("--n0", type=int, default=100, help="SC samples to select the top class")
    cert.add_argument("--n", type=int, default=100_000,
                      help="SC samples to estimate p_A. reaas-sc draws them locally around f(x) and sends no "
                           "query for them, so 1000000 is fine there (a larger N raises p_A's lower bound, hence "
                           "R_F); for seaas-sc each sample is a query")
    cert.add_argument("--seaas-wire-dtype", choices=WIRE_DTYPES, default="float32",
                      help="seaas-sc: dtype the n0 + n noisy test images travel in. float16 (round to nearest) "
                           "halves the bytes sent per image, uint8 (256 levels over the pixel range) quarters "
                           "them; the float32 features coming back are unchanged, so the total falls to ~0.54x "
                           "and ~0.31x on the pca demo encoder. The rounding runs on the client after the noise "
                           "and clipping, so it is part of the base classifier and the certificate stays sound; it "
                           "moves each pixel the encoder sees by at most half a rounding step (float16: 2^-12 on "
                           "[0, 1], uint8: 1/510), far below the noise (make bench-seaas-wire: no ACR change "
                           "beyond the smoothing's own noise)")
    cert.add_argument("--sample-batch-size", type=int, default=10_000,
                      help="noisy samples h classifies at once (bounds memory whatever --n is)")
    cert.add_argument("--alpha", type=float, default=0.001,
                      help="SC failure probability per certificate (Clopper-Pearson)")
    cert.add_argument("--method", choices=CERTIFY_METHODS, default="auto",
                      help="feature-space certificate of h for reaas-bc: auto (the Lipschitz margin for MaxMin/linear "
                           "heads, CROWN for a ReLU MLP), crown, ibp, or margin")
    cert.add_argument("--bound", default="",
                      help="F2IPerturb bound the server searches with (see the server's bounds_offered; "
                           "empty = its default)")
    cert.add_argument("--batch-size", type=int, default=256, help="test inputs per Feature/F2IPerturb request")
    train = parser.add_argument_group("downstream classifier h")
    train.add_argument("--head", default="mlp",
                       help="kind of h: mlp (the paper's ReLU MLP, cross-entropy, CROWN-certified), linear (one "
                            "Linear trained with a Lipschitz-margin loss; its feature radius margin/||w_y - w_j|| "
                            "is exact), lipschitz (1-Lipschitz AOL + MaxMin body of --hidden widths and a last "
                            "Linear, same loss; radius margin/(||w_y - w_j|| L_body)), orthogonal (the same with "
                            "orthogonal layers: a tighter certificate) or prototype (--prototypes points per "
                            "class, the nearest one's class wins; its radius is exact and it trains in seconds). "
                            "With --select-head, a comma-separated list of kinds to choose from")
    train.add_argument("--margin", default="1",
                       help="eps of the Lipschitz-margin loss, in feature-space units: the radius the linear, "
                            "lipschitz, orthogonal and prototype heads are trained to certify (larger: more robust, less accurate; scale it "
                            "with the encoder's feature spread). With --select-head, a comma-separated grid")
    train.add_argument("--temperature", type=float, default=TrainConfig.temperature,
                       help="temperature of the margin heads' distance-unit loss, in feature-space units")
    train.add_argument("--margin-warmup", type=float, default=TrainConfig.margin_warmup,
                       help="share of the training steps over which the margin ramps up from 0")
    train.add_argument("--select-head", action="store_true",
                       help="reaas-bc: choose the head kind x margin on held-out training features (a stratified "
                            "seeded split of the training set; each candidate scored by its validation ACR of "
                            "the feature radius), then retrain the choice on all training features. No extra "
                            "query and no test input is used")
    train.add_argument("--validation-fraction", type=float, default=0.2,
                       help="--select-head: share of each class's training inputs held out for scoring")
    train.add_argument("--min-validation-accuracy", type=float, default=0.0,
                       help="--select-head: only candidates with at least this validation accuracy may win")
    train.add_argument("--hidden", default="256,256",
                       help="hidden layer widths of the mlp or of the lipschitz body (even), comma-separated")
    train.add_argument("--prototypes", type=int, default=TrainConfig.prototypes,
                       help="prototypes per class of a prototype head")
    train.add_argument("--epochs", type=int, default=60, help="training epochs")
    train.add_argument("--lr", type=float, default=None,
                       help="Adam learning rate (default: 0.05 for a prototype head, 0.001 for the networks)")
    train.add_argument("--augment", type=int, default=0,
                       help="REaaS paths: also train h on K shifted / elastic copies of each training image "
                            "(reaas_client.augment), each copy one more Feature query: 1 + K per training input")
    parser.add_argument("--seed", type=int, default=0, help="seed of subsets, training and all noise")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                        help="where training features are cached (keyed by model sha256 + data set)")
    parser.add_argument("--no-cache", action="store_true", help="always fetch training features")
    parser.add_argument("--out", type=Path, default=Path("runs") / "certify",
                        help="folder for records.csv, ledger.csv, summary.md and the certified-accuracy PNG")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars or step lines (bars draw only when stderr is a terminal anyway)")
    add_standard_flags(parser)
    return parser


def client_tls(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ClientTls | None:
    """The TLS the flags ask for (None: an insecure channel); a bad combination or file is a usage error."""
    files = (args.tls_ca, args.tls_client_cert, args.tls_client_key)
    if not args.tls and args.tls_server_name is None and all(f is None for f in files):
        return None
    try:
        return ClientTls.from_files(*files, server_name=args.tls_server_name)
    except ValueError as error:
        parser.error(str(error))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    tls = client_tls(parser, args)
    heads = tuple(h for h in args.head.split(",") if h)
    margins = tuple(float(m) for m in args.margin.split(",") if m)
    if not args.select_head and (len(heads) != 1 or len(margins) != 1):
        parser.error("several --head or --margin values need --select-head")
    try:
        search = (HeadSearch(heads, margins, args.validation_fraction, args.min_validation_accuracy, args.method)
                  if args.select_head else None)
        config = PathConfig(
            path=args.path, sigma=args.sigma, n0=args.n0, n=args.n, alpha=args.alpha, method=args.method,
            bound=args.bound, seed=args.seed, batch_size=args.batch_size, search=search,
            sample_batch_size=args.sample_batch_size, seaas_wire_dtype=args.seaas_wire_dtype, augment=args.augment,
            train=TrainConfig(hidden=tuple(int(w) for w in args.hidden.split(",") if w), epochs=args.epochs,
                              lr=args.lr, head=heads[0], margin=margins[0], temperature=args.temperature,
                              margin_warmup=args.margin_warmup, prototypes=args.prototypes),
        )
    except ValueError as error:
        parser.error(str(error))
    with reported_errors(parser.prog, debug=args.debug):
        return _certify(args, config, tls)


def _certify(args: argparse.Namespace, config: PathConfig, tls: ClientTls | None) -> int:
    """Train h over the service, certify, write the outputs."""
    from reaas_client.downstream_data import load_downstream  # imported late so --help stays instant

    addresses = [a for item in args.server for a in item.split(",") if a]
    api_key = args.api_key or os.environ.get(API_KEY_VARIABLE) or None
    with EncoderClient(addresses, api_key=api_key, timeout_s=args.timeout, tls=tls) as client:
        info = client.info()
        if config.path != "seaas-sc" and info.mode != "reaas":  # refused now, not after training h
            raise UsageError(f"--path {config.path} needs F2IPerturb, which this server (--mode {info.mode}) does not "
                             "offer; use --path seaas-sc, or a server in --mode reaas")
        print(f"encoder {info.model_id} ({info.model_sha256[:12]}), {info.modality}, mode {info.mode}, "
              f"feature_dim {info.feature_dim}, {info.description}", file=sys.stderr)
        try:
            data = load_downstream(args.dataset, args.data, client)
        except ValueError as error:  # a data set the encoder cannot read, a malformed data file
            raise UsageError(str(error)) from error
        train_idx = stratified_subset(data.train_labels, args.train_size, args.seed)
        test_idx = stratified_subset(data.test_labels, args.test_size, args.seed)
        result = run_path(config, client, data.train_inputs[train_idx], data.train_labels[train_idx],
                          data.test_inputs[test_idx], data.test_labels[test_idx], data.num_classes,
                          dataset=args.dataset, cache_dir=None if args.no_cache else args.cache_dir,
                          progress=not args.quiet)
        if result.selection is not None:
            print("head selection on held-out training features:\n" + result.selection.table(), file=sys.stderr)
        args.out.mkdir(parents=True, exist_ok=True)
        write_records_csv(result.records, args.out / "records.csv")
        client.ledger.to_csv(args.out / "ledger.csv")
    (args.out / "summary.md").write_text(summary_table_markdown([result.summary]) + "\n")
    plot_certified_accuracy({result.summary.service: result.records}, args.out / "certified_accuracy.png",
                            title=args.dataset, modality=info.modality)
    print(summary_table_text([result.summary]))
    print(f"h accuracy on its training features: {result.train_accuracy:.3f}; full table in {args.out}/summary.md, "
          f"per-input records, ledger and plot in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
