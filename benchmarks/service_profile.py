"""Where a server's time goes under many small clients (issue 22, item 2): server CPU per call and a py-spy profile.

Starts the server (``reaas-server`` with its default admission, ``benchmarks.bare_server``, or the grpc.aio prototype
``benchmarks.aio_feature_server``), runs the many-clients load (``client_swarm.swarm``, raw stubs) or one stream and,
while it runs, ``py-spy record`` on the server's process (all threads, idle frames dropped, collapsed stacks). Prints
the server's CPU seconds per handled call (answered + refused, from /proc) split by thread kind, the client's for a
stream (it runs in this process: on 2 shared cores the client's CPU is part of the budget), and the functions holding
the most samples, inclusive, so a reader sees which layer costs what.
py-spy is not a project dependency: ``pip install --target /tmp/pyspy py-spy``, then ``--py-spy /tmp/pyspy/bin/py-spy``.
Findings go, by hand, into ``benchmarks/results/service_profile.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from benchmarks.aio_feature_server import aio_feature_server_process
from benchmarks.bare_server import bare_server_process
from benchmarks.batching import feature_request
from benchmarks.client_swarm import SwarmOutcome, swarm
from benchmarks.environment import load_line, machine_summary
from reaas_client import EncoderClient
from reaas_client.background_server import background_server_process


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far, all its threads (from /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of all a process's threads so far (from /proc/PID/task/*/status);
    threads that ended are not counted."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += sum(int(line.split()[1]) for line in (task / "status").read_text().splitlines()
                         if "ctxt_switches" in line)
    return total


def cpu_by_thread_kind(pid: int) -> Counter[str]:
    """CPU seconds so far of a process's live threads, by kind: the OS thread name and niceness (reaas-server's
    compute threads run at niceness 10, its event loop and io threads at 0; gRPC's own threads are named
    event_engine or grpc_*)."""
    kinds: Counter[str] = Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            name = (task / "comm").read_text().strip()
            kinds[f"{name} (nice {fields[16]})"] += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return kinds


def inclusive_samples(collapsed: Path) -> tuple[Counter[str], Counter[str], int]:
    """Per function: samples with it anywhere on the stack (inclusive) and on top (self); and the total."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0] + ")" if " (" in f else f
                  for f in stack.split(";")]
        n = int(count)
        total += n
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    return inclusive, own, total


@contextlib.contextmanager
def _server(kind: str, encoder: str, server_args: tuple[str, ...]):
    if kind == "bare":
        with bare_server_process(64) as (process, address):
            yield process, address
    elif kind == "proto":
        with aio_feature_server_process(encoder) as (process, address):
            yield process, address
    else:
        extra = ("--demo-kind", encoder, "--log-level", "WARNING", "--bound-cost-budget", "0", *server_args)
        with background_server_process(extra_args=extra) as server:
            yield server.process, server.address


def stream_load(address: str, batch: int, seconds: float) -> SwarmOutcome:
    """One EncoderClient streaming `batch`-image messages, 16 per StreamFeatures call, for `seconds`; a "call" in
    the outcome is one streamed message."""
    images = np.random.default_rng(1).random((batch, 1, 28, 28), dtype=np.float32)
    messages, start = 0, time.perf_counter()
    with EncoderClient(address, timeout_s=120) as client:
        while time.perf_counter() - start < seconds:
            messages += sum(1 for _ in client.stream_features((images, None) for _ in range(16)))
    return SwarmOutcome(answered=messages, refused=0, other_errors={}, elapsed_s=time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=("reaas", "bare", "proto"), default="reaas",
                        help="reaas-server, the bare gRPC server (benchmarks.bare_server) or the grpc.aio prototype "
                             "with the work and no service layers (benchmarks.aio_feature_server)")
    parser.add_argument("--encoder", default="pca", help="--demo-kind of the reaas server")
    parser.add_argument("--server-args", default="",
                        help="more reaas-server flags, space-separated, e.g. '--max-feature-images 128' (a "
                             "smaller image pool, so calls queue)")
    parser.add_argument("--load", choices=("unary", "stream"), default="unary",
                        help="unary: --clients raw-stub clients of --images images; stream: one EncoderClient "
                             "streaming batches of --stream-batch images (calls of 16 batches)")
    parser.add_argument("--stream-batch", type=int, default=256)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--py-spy", default=None, help="py-spy executable; without it, CPU per call only")
    parser.add_argument("--gil", action="store_true",
                        help="py-spy samples only the thread holding the GIL: where Python's one lane goes")
    parser.add_argument("--output", type=Path, default=Path("/tmp/service_profile.txt"), help="collapsed stacks")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args(argv)
    print(f"machine: {machine_summary()}\n{load_line()}", flush=True)
    with _server(args.server, args.encoder, tuple(args.server_args.split())) as (process, address):
        outcome: list[SwarmOutcome] = []
        load = threading.Thread(target=lambda: outcome.append(
            swarm(address, "Feature", feature_request(args.images), args.clients, args.seconds)
            if args.load == "unary" else stream_load(address, args.stream_batch, args.seconds)))
        cpu_before, switches_before = cpu_seconds(process.pid), context_switches(process.pid)
        kinds_before, client_before = cpu_by_thread_kind(process.pid), os.times()
        load.start()
        if args.py_spy:
            # the swarm's processes take a few seconds to connect; sample the middle of the window
            subprocess.run([args.py_spy, "record", "--pid", str(process.pid), "--duration",
                            str(max(1, int(args.seconds) - 2)), "--format", "raw", "--rate", "200", "--threads",
                            *(["--gil"] if args.gil else []), "--nonblocking", "--output", str(args.output)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        load.join()
        client_after = os.times()
        kinds = cpu_by_thread_kind(process.pid)
        kinds.subtract(kinds_before)
        cpu = cpu_seconds(process.pid) - cpu_before
        switches = context_switches(process.pid) - switches_before
    result = outcome[0]
    handled = result.answered + result.refused
    print(f"{args.server}: {result.answered:,} answered, {result.refused:,} refused, other {result.other_errors}, "
          f"in {result.elapsed_s:.1f} s; server CPU {cpu:.2f} s (incl. connection set-up) = "
          f"{1e3 * cpu / max(handled, 1):.3f} ms per handled call, {switches / max(handled, 1):.1f} context switches "
          "per handled call")
    per_call = 1e3 / max(handled, 1)
    print("  by thread kind (ms per handled call): " + ", ".join(
        f"{kind} {seconds * per_call:.3f}" for kind, seconds in kinds.most_common() if seconds * per_call >= 0.005))
    if args.load == "stream":  # the unary swarm's clients are processes of their own
        client = (client_after.user - client_before.user) + (client_after.system - client_before.system)
        print(f"  client (this process) {client * per_call:.3f} ms of CPU per message")
    if args.py_spy:
        inclusive, own, total = inclusive_samples(args.output)
        print(f"{total} samples (all threads, idle dropped); inclusive % / self % / function")
        for frame, n in inclusive.most_common(args.top):
            print(f"{100 * n / total:6.1f} {100 * own[frame] / total:6.1f}  {frame}")


if __name__ == "__main__":
    main()
