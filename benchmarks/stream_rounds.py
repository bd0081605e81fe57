"""One stream against several servers in alternating short rounds: an A/B of server variants under the same load.

A one-stream rate on 2 shared cores moves 5-10 % between runs a minute apart, as much as the changes worth
measuring; servers started once each and taking turns every few seconds see the same load, so the medians of their
rounds compare. Each server spec is ``bare`` (benchmarks.bare_server), ``proto`` (benchmarks.aio_feature_server) or
``reaas`` with optional reaas-server flags after a colon, e.g. ``reaas:--stream-window-kib 1024``. Prints each
round and the medians relative to the first spec; findings go, by hand, into benchmarks/results/service_profile.md.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import numpy as np

from benchmarks.aio_feature_server import aio_feature_server_process
from benchmarks.bare_server import bare_server_process
from benchmarks.environment import load_line, machine_summary
from benchmarks.service_throughput import images_per_second
from reaas_client import EncoderClient
from reaas_client.background_server import background_server


def stream_rate(address: str, batch: np.ndarray, seconds: float, messages_per_call: int = 16) -> float:
    """Images/s of one EncoderClient streaming `batch` in calls of `messages_per_call` messages for `seconds`
    (service_throughput.images_per_second: one warm-up call first, as many_clients measures its stream row)."""
    with EncoderClient(address, timeout_s=120) as client:
        return images_per_second(
            lambda: sum(r.shape[0] for r in client.stream_features((batch, None) for _ in range(messages_per_call))),
            seconds)


def _start(spec: str, encoder: str, stack: contextlib.ExitStack) -> str:
    kind, _, flags = spec.partition(":")
    if kind == "bare":
        return stack.enter_context(bare_server_process(64))[1]
    if kind == "proto":
        return stack.enter_context(aio_feature_server_process(encoder))[1]
    if kind == "reaas":
        return stack.enter_context(background_server(extra_args=(
            "--demo-kind", encoder, "--log-level", "WARNING", "--bound-cost-budget", "0", *flags.split())))
    raise SystemExit(f"unknown server spec {spec!r}: bare, proto or reaas[:FLAGS]")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("servers", nargs="+", help="bare | proto | reaas[:reaas-server flags]")
    parser.add_argument("--encoder", default="pca", help="--demo-kind served")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=2.0, help="per server per round")
    parser.add_argument("--batch", type=int, default=256, help="images per streamed message")
    args = parser.parse_args(argv)
    print(f"machine: {machine_summary()}\n{load_line()}", flush=True)
    batch = np.random.default_rng(1).random((args.batch, 1, 28, 28), dtype=np.float32)
    with contextlib.ExitStack() as stack:
        addresses = {spec: _start(spec, args.encoder, stack) for spec in args.servers}
        rates: dict[str, list[float]] = {spec: [] for spec in args.servers}
        for round_index in range(args.rounds):
            for spec in args.servers if round_index % 2 == 0 else reversed(args.servers):
                rates[spec].append(stream_rate(addresses[spec], batch, args.seconds))
            print(f"round {round_index}: " + ", ".join(f"{s} {rates[s][-1]:,.0f}" for s in args.servers), flush=True)
    first = statistics.median(rates[args.servers[0]])
    for spec in args.servers:
        median = statistics.median(rates[spec])
        print(f"median {spec}: {median:,.0f} images/s, {median / first:.3f} of {args.servers[0]}")
    print(load_line())


if __name__ == "__main__":
    main()
