"""Dynamic batching (issue 13): many clients each sending a few images, with the batcher on and off.

64 clients (4 processes x 16 threads, each client on its own connection) send 4-image unary Feature requests
to a ``reaas-server`` child for ``--seconds``; aggregate images/s against the in-process forward pass at batch
256 (the issue's goal: >= 0.7). Beside it, the ceiling no batcher can lift: the same clients calling
GetEncoderInfo, which does no encoder work at all, times 4 images per call. Also the p50 latency of a lone
1-image Feature call with the batcher on and off (the issue: not worse by more than the batcher's delay).
Then F2I: ``--f2i-clients`` clients send ``--images``-image F2IPerturb requests with the server's default bound to the
non-robust CNN (where the bound search is real work), the F2I batcher on and off.
Writes ``benchmarks/results/batching.md``. Run: ``make bench-service`` (this is its second half).
"""

from __future__ import annotations

import argparse
import statistics
import time

import grpc
import numpy as np
import torch

from benchmarks.client_swarm import swarm
from benchmarks.environment import machine_summary, markdown_table, write_results
from reaas.v1 import encoder_service_pb2 as pb
from reaas_client import encode_tensor
from reaas_client.background_server import background_server
from reaas_server import ServedEncoder

_METHOD = "/reaas.v1.EncoderService/"


def calls_per_second(address: str, method: str, request: bytes, clients: int, seconds: float,
                     processes: int = 4, timeout_s: float = 60.0) -> float:
    """Answered calls per second of `clients` clients spread over `processes` processes (client_swarm.swarm)."""
    outcome = swarm(address, method, request, clients, seconds, processes=processes, timeout_s=timeout_s)
    failed = {"RESOURCE_EXHAUSTED": outcome.refused, **outcome.other_errors}
    if any(failed.values()):
        print(f"  {method}: calls failed: {failed}", flush=True)
    return outcome.answered_per_second


def lone_latency_ms(address: str, request: bytes, calls: int = 200) -> float:
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(_METHOD + "Feature")
        call(request, timeout=60)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            call(request, timeout=60)
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def in_process_rate(kind: str, batch: int = 256, seconds: float = 3.0) -> float:
    encoder = ServedEncoder.load(None, "cpu", demo_kind=kind)
    images = torch.rand((batch, *encoder.metadata.input_shape), generator=torch.Generator().manual_seed(0))
    encoder.features(images)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += encoder.features(images).shape[0]
    return done / (time.perf_counter() - start)


def feature_request(count: int) -> bytes:
    images = np.random.default_rng(count).random((count, 1, 28, 28), dtype=np.float32)
    return pb.FeatureRequest(images=encode_tensor(images)).SerializeToString()


def f2i_request(count: int, feature_radius: float) -> bytes:
    images = np.random.default_rng(count).random((count, 1, 28, 28), dtype=np.float32)
    return pb.F2IPerturbRequest(images=encode_tensor(images), feature_radii=[feature_radius] * count
                                ).SerializeToString()


def f2i_rows(kind: str, clients: int, images: int, seconds: float, feature_radius: float) -> list[list[str]]:
    """F2I images/s of `clients` concurrent callers, the F2I batcher on and off, and the passes it ran."""
    request = f2i_request(images, feature_radius)
    measured = {}
    for label, flags in (("on", ("--f2i-batching", "on")), ("off", ("--f2i-batching", "off"))):
        extra = ("--demo-kind", kind, "--log-level", "WARNING", "--bound-cost-budget", "0",
                 "--max-f2i-calls", str(clients), "--max-calls-per-key", str(clients),
                 "--workers", str(clients + 16), *flags)
        with background_server(extra_args=extra) as address:
            measured[label] = images * calls_per_second(address, "F2IPerturb", request, clients, seconds,
                                                        processes=min(4, clients), timeout_s=600)
        print(f"{kind} F2I batcher {label}: {measured[label]:,.1f} images/s", flush=True)
    return [[kind, f"{clients} x {images} images, R_F {feature_radius}", f"{measured['off']:,.1f}",
             f"{measured['on']:,.1f}", f"{measured['on'] / measured['off']:.2f}"]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default="pca,nonrobust",
                        help="shipped encoders to serve: the default PCA (a 0.2 ms forward) and the non-robust CNN")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--images", type=int, default=4, help="images per request")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--f2i-kind", default="nonrobust", help="encoder for the F2I section ('' skips it)")
    parser.add_argument("--f2i-clients", type=int, default=8)
    parser.add_argument("--f2i-seconds", type=float, default=30.0,
                        help="F2I calls start during this many seconds; the rate counts until the last returns")
    parser.add_argument("--f2i-feature-radius", type=float, default=0.5, help="R_F of every F2I request")
    args = parser.parse_args(argv)
    print(f"machine: {machine_summary()}", flush=True)
    rows, goals = [], []
    request, lone = feature_request(args.images), feature_request(1)
    info = pb.EncoderInfoRequest().SerializeToString()
    for kind in args.kinds.split(","):
        local = in_process_rate(kind)
        measured = {}
        for label, flags in (("on", ()), ("off", ("--batch-max-images", "0"))):
            extra = ("--demo-kind", kind, "--log-level", "WARNING", "--bound-cost-budget", "0",
                     # the default admission (by images) runs every client's call: this measures batching
                     *flags)
            with background_server(extra_args=extra) as address:
                rate = args.images * calls_per_second(address, "Feature", request, args.clients, args.seconds)
                latency = lone_latency_ms(address, lone)
                ceiling = args.images * calls_per_second(address, "GetEncoderInfo", info, args.clients,
                                                         args.seconds) if label == "on" else None
            measured[label] = (rate, latency, ceiling)
            print(f"{kind} batcher {label}: {rate:,.0f} images/s, lone 1-image p50 {latency:.2f} ms", flush=True)
        (on, lat_on, ceiling), (off, lat_off, _) = measured["on"], measured["off"]
        rows.append([kind, f"{local:,.0f}", f"{off:,.0f}", f"{on:,.0f}", f"{on / local:.3f}",
                     f"{ceiling:,.0f} ({ceiling / local:.3f})", f"{lat_off:.2f} / {lat_on:.2f}"])
        goals.append([kind, "64 clients x 4 images >= 0.7 of in-process at batch 256", f"{on / local:.3f}",
                      "met" if on >= 0.7 * local else "**NOT met**"])
    body = (
        f"{args.clients} clients (4 processes, one connection each) send {args.images}-image unary Feature "
        f"requests for {args.seconds:.0f} s to a `reaas-server` child on loopback; the batcher's max delay is 0 "
        "(batches form while a pass runs). 'Call ceiling' is the same clients calling GetEncoderInfo (no encoder "
        f"work) times {args.images}: what unary calls of this size could reach with a free encoder.\n\n"
        + markdown_table(["encoder", "in-process forward, batch 256 (images/s)", "batcher off", "batcher on",
                          "on / in-process", "call ceiling (/ in-process)", "lone 1-image p50 ms, off / on"], rows)
        + "\n\n## Goals (issue 13)\n\n" + markdown_table(["encoder", "goal", "measured", ""], goals) + "\n"
    )
    if args.f2i_kind:
        f2i = f2i_rows(args.f2i_kind, args.f2i_clients, args.images, args.f2i_seconds, args.f2i_feature_radius)
        body += (
            "\n## F2IPerturb\n\n"
            f"{args.f2i_clients} clients send {args.images}-image F2IPerturb requests with the server's default bound "
            f"(R_F {args.f2i_feature_radius}, random images) for {args.f2i_seconds:.0f} s, images/s counted until the "
            "last call returned; requests for one searched bound share searches of up to one F2I chunk "
            "(64 images) with `--f2i-batching on` (the default, auto, turns it on for CUDA only). Closed-form bounds (a division) never queue.\n\n"
            + markdown_table(["encoder", "load", "batcher off (images/s)", "batcher on (images/s)", "on / off"], f2i)
            + "\n"
        )
    print(body)
    path = write_results("batching", "Dynamic batching", body, make_target="bench-service")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
