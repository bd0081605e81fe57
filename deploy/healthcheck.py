"""One grpc.health.v1 Check against a reaas-server: exit 0 when it is SERVING, 1 otherwise (the probe of a container).

Docker's HEALTHCHECK and the Kubernetes probes (deploy/k8s/deployment.yaml) run this inside the server's container.
Why a script and not the kubelet's built-in ``grpc:`` probe: the server puts health on its one port, TLS included
when --tls-cert is given, and the kubelet's gRPC probe speaks plaintext only (no TLS, no client certificate), so
against a TLS server it never succeeds. This probe speaks TLS with the same ClientTls the Python client uses.

A draining server (SIGTERM: health NOT_SERVING for --drain-delay) fails the probe, as a load balancer should see it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reaas_client.tls import ClientTls

SERVICE = "reaas.v1.EncoderService"  # the server sets it (and "") SERVING at start, NOT_SERVING when it drains


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--address", default="127.0.0.1:50051", help="HOST:PORT of the server (default: %(default)s)")
    parser.add_argument("--service", default=SERVICE, help="health service name to check (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds for the call (default: %(default)s)")
    tls = parser.add_argument_group("TLS", "with --tls-ca the probe speaks TLS, as it must to a --tls-cert server")
    tls.add_argument("--tls-ca", type=Path, help="PEM CA bundle the server's certificate chains to")
    tls.add_argument("--tls-server-name", help="name on the server's certificate when it is not the dialled host")
    tls.add_argument("--tls-client-cert", type=Path, help="PEM client certificate (server run with --tls-client-ca)")
    tls.add_argument("--tls-client-key", type=Path, help="PEM key of --tls-client-cert")
    return parser.parse_args(argv)


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if args.tls_ca is None:
        return grpc.insecure_channel(args.address)
    tls = ClientTls.from_files(args.tls_ca, args.tls_client_cert, args.tls_client_key, args.tls_server_name)
    name = tls.name_override([args.address])
    options = [("grpc.ssl_target_name_override", name)] if name is not None else []
    return grpc.secure_channel(args.address, tls.channel_credentials(), options=options)


def check(args: argparse.Namespace) -> str:
    """The service's status name (SERVING, NOT_SERVING, ...) or the gRPC error that stood in the way."""
    try:
        with _channel(args) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as error:
        return f"{error.code().name}: {error.details()}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        status = check(args)
    except ValueError as error:  # an unreadable TLS file: the probe is misconfigured, say which file
        print(f"reaas-healthcheck: {error}", file=sys.stderr)
        return 1  # not 2: Docker reserves HEALTHCHECK's exit code 2
    print(f"{args.address} {args.service or '(server)'}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
