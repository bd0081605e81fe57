"""The service under load and faults (issue 10), against a real ``reaas-server`` child on loopback.

Phases, each measured while probes run beside the load (a health check every 50 ms, a 4-image unary Feature
every 100 ms, in the f2i phase a light key's closed-form F2I call every 500 ms):

* ``streams``: 50 clients, each on its own connection, stream 4 096-image StreamFeatures batches in a loop.
* ``f2i``: 8 clients under one API key send slow F2IPerturb calls (``crown`` on the non-robust CNN); at the end
  they give up (cancel) and we time how long the server keeps using CPU.
* ``heavy``: one key sends 8 back-to-back 4 096-image unary Feature calls; the probe is another key (issue 22).
* ``small``: 64 clients send 4-image unary Feature calls, first as one key, then as 64 keys (issue 22).
* ``drain``: a server started N times under a CPU hog, SIGTERMed with a stream in flight: health must say
  NOT_SERVING, new calls UNAVAILABLE, the stream must be served to its end and the process exit 0.

Refused calls are retried after the server's ``grpc-retry-pushback-ms`` hint, as a well-behaved client does.
Writes ``benchmarks/results/load.md``. Run: ``make bench-load`` (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.environment import machine_summary, markdown_table, write_results
from reaas.v1 import encoder_service_pb2 as pb
from reaas_client import encode_tensor
from reaas_client.background_server import BackgroundServer, background_server_process
from reaas_client.retry import retry_pushback_s

_METHOD = "/reaas.v1.EncoderService/"
_INPUT_SHAPE = (1, 28, 28)  # the shipped demo encoders' digits


# -- what we observe of the server process ----------------------------------------------------------------
def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class RssSampler(threading.Thread):
    """Peak resident memory of a process, sampled every 20 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self._done = pid, rss_bytes(pid), threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.02):
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except (OSError, RuntimeError):
                return

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


# -- calls and their outcomes -------------------------------------------------------------------------------
@dataclass
class Outcomes:
    """Latencies of answered calls and the status of every refused one, thread-safe."""

    latencies_s: dict[str, list[float]] = field(default_factory=dict)
    errors: Counter = field(default_factory=Counter)  # (call kind, status name, had a retry hint)
    answered: Counter = field(default_factory=Counter)
    images: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self, kind: str, seconds: float, images: int = 0) -> None:
        with self.lock:
            self.latencies_s.setdefault(kind, []).append(seconds)
            self.answered[kind] += 1
            self.images[kind] += images

    def failed(self, kind: str, error: grpc.RpcError) -> float | None:
        """Record a refusal; return the server's retry hint in seconds, if it gave one."""
        hint = retry_pushback_s(error)
        with self.lock:
            self.errors[(kind, error.code().name, hint is not None)] += 1
        return hint


def percentile_ms(values: list[float], q: float) -> str:
    return f"{1e3 * float(np.percentile(values, q)):.1f}" if values else "–"


def feature_request(count: int, seed: int = 0) -> bytes:
    images = np.random.default_rng(seed).random((count, *_INPUT_SHAPE), dtype=np.float32)
    return pb.FeatureRequest(images=encode_tensor(images)).SerializeToString()


LIGHT_FEATURE = "unary Feature (4 images)"
LIGHT_F2I = "light key's F2I (4 images, lipschitz)"


def _probe(address: str, ready, stop, results, with_f2i: bool = False) -> None:
    """A load balancer's health checks (every 50 ms) and a light client's 4-image Feature calls (every 100 ms),
    each on its own thread so that a slow answer to one does not space out the other; with `with_f2i`, the light
    client also sends a 4-image F2I call (a closed-form bound: its own cost is nothing, its latency is its wait
    for an F2I slot) every 500 ms. The light client is its own key (its own connection, in open access).

    Runs in its own process so that the load generators' threads do not delay it on our side of the wire.
    """
    outcomes = Outcomes()
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        feature = channel.unary_unary(_METHOD + "Feature")
        f2i = channel.unary_unary(_METHOD + "F2IPerturb")
        request = feature_request(4, seed=1)
        pixels = np.random.default_rng(3).random((4, *_INPUT_SHAPE), dtype=np.float32)
        f2i_request = pb.F2IPerturbRequest(images=encode_tensor(pixels), feature_radii=[0.5] * 4,
                                           bound="lipschitz").SerializeToString()
        health.Check(health_pb2.HealthCheckRequest(), timeout=60)

        def every(period_s: float, kind: str, call, images: int = 0) -> None:
            while not stop.wait(period_s):
                _timed(outcomes, kind, call, images)

        threads = [
            threading.Thread(target=every, args=(0.05, "health",
                                                 lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=30))),
            threading.Thread(target=every, args=(0.1, LIGHT_FEATURE, lambda: feature(request, timeout=30), 4)),
        ]
        if with_f2i:
            threads.append(threading.Thread(target=every, args=(0.5, LIGHT_F2I,
                                                                lambda: f2i(f2i_request, timeout=120), 4)))
        for thread in threads:
            thread.start()
        ready.set()
        for thread in threads:
            thread.join()
    results.put((outcomes.latencies_s, dict(outcomes.errors), dict(outcomes.answered), dict(outcomes.images)))


def _timed(outcomes: Outcomes, kind: str, call, images: int = 0) -> None:
    start = time.perf_counter()
    try:
        call()
    except grpc.RpcError as error:
        outcomes.failed(kind, error)
        return
    outcomes.ok(kind, time.perf_counter() - start, images)


# -- phases ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PhaseResult:
    name: str
    outcomes: Outcomes
    seconds: float
    idle_rss: int
    peak_rss: int
    cpu_stop_s: float | None = None  # f2i: seconds from the clients giving up to the server's CPU going idle


def run_streams(server: BackgroundServer, clients: int, batch: int, batches_per_stream: int,
                seconds: float) -> PhaseResult:
    outcomes = Outcomes()
    request = feature_request(batch)
    stop = threading.Event()

    def client(index: int) -> None:
        # its own connection, as 50 separate clients would have (channels of one process share them by default)
        with grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            stream = channel.stream_stream(_METHOD + "StreamFeatures")
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    replies = stream(iter([request] * batches_per_stream), timeout=120,
                                     metadata=(("x-api-key", f"client-{index}"),))
                    answered = sum(1 for _ in replies)
                except grpc.RpcError as error:
                    hint = outcomes.failed("StreamFeatures", error)
                    stop.wait(hint if hint is not None else 1.0)
                    continue
                outcomes.ok("StreamFeatures", time.perf_counter() - start, answered * batch)

    return _run_phase("streams", server, outcomes, [lambda i=i: client(i) for i in range(clients)], stop, seconds)


def run_f2i(server: BackgroundServer, clients: int, images: int, bound: str, seconds: float) -> PhaseResult:
    outcomes = Outcomes()
    pixels = np.random.default_rng(2).random((images, *_INPUT_SHAPE), dtype=np.float32)
    request = pb.F2IPerturbRequest(images=encode_tensor(pixels), feature_radii=[0.5] * images,
                                   bound=bound).SerializeToString()
    stop = threading.Event()
    in_flight: list[grpc.Future] = []
    lock = threading.Lock()

    def client() -> None:
        with grpc.insecure_channel(server.address) as channel:
            f2i = channel.unary_unary(_METHOD + "F2IPerturb")
            while not stop.is_set():
                start = time.perf_counter()
                future = f2i.future(request, timeout=600, metadata=(("x-api-key", "one-client"),))
                with lock:
                    in_flight.append(future)
                try:
                    future.result()
                except grpc.FutureCancelledError:
                    return  # we gave up on it ourselves (give_up cancels every call in flight)
                except grpc.RpcError as error:
                    if error.code() == grpc.StatusCode.CANCELLED and stop.is_set():
                        return  # we gave up on it ourselves
                    hint = outcomes.failed("F2IPerturb", error)
                    stop.wait(hint if hint is not None else 1.0)
                    continue
                outcomes.ok("F2IPerturb", time.perf_counter() - start, images)

    def give_up() -> float:
        with lock:
            for future in in_flight:
                future.cancel()
        return _seconds_until_cpu_idle(server.process.pid)

    return _run_phase("f2i", server, outcomes, [client] * clients, stop, seconds, on_stop=give_up, probe_f2i=True)


def _feature_caller(channel: grpc.Channel, request: bytes, images: int, kind: str, outcomes: Outcomes,
                    stop: threading.Event, timeout_s: float) -> None:
    """Unary Feature calls back to back until `stop`; a refusal is counted, then retried after the server's hint."""
    feature = channel.unary_unary(_METHOD + "Feature")
    while not stop.is_set():
        start = time.perf_counter()
        try:
            feature(request, timeout=timeout_s)
        except grpc.RpcError as error:
            hint = outcomes.failed(kind, error)
            stop.wait(hint if hint is not None else 1.0)
            continue
        outcomes.ok(kind, time.perf_counter() - start, images)


def run_heavy_feature(server: BackgroundServer, clients: int, images: int, seconds: float) -> PhaseResult:
    """`clients` threads of one key (one shared connection: one key in open access) sending `images`-image unary
    Feature calls back to back, beside the light client of the probe (issue 22: its p99 stays <= 250 ms)."""
    outcomes, stop = Outcomes(), threading.Event()
    request = feature_request(images, seed=4)
    with grpc.insecure_channel(server.address) as channel:
        client = lambda: _feature_caller(channel, request, images, f"heavy key's Feature ({images} images)",  # noqa: E731
                                         outcomes, stop, timeout_s=300)
        return _run_phase("heavy key", server, outcomes, [client] * clients, stop, seconds)


def run_small_clients(server: BackgroundServer, clients: int, images: int, seconds: float, *,
                      one_key: bool) -> PhaseResult:
    """`clients` clients sending `images`-image unary Feature calls back to back, either as one key (one shared
    connection) or as `clients` keys (a connection each)."""
    outcomes, stop = Outcomes(), threading.Event()
    request = feature_request(images, seed=5)
    kind = f"{clients} small clients' Feature ({images} images)"
    shared = grpc.insecure_channel(server.address) if one_key else None

    def client() -> None:
        own = None if shared else grpc.insecure_channel(server.address,
                                                          options=[("grpc.use_local_subchannel_pool", 1)])
        try:
            _feature_caller(shared or own, request, images, kind, outcomes, stop, timeout_s=60)
        finally:
            if own is not None:
                own.close()

    try:
        return _run_phase(f"{clients} small, {'one key' if one_key else f'{clients} keys'}", server, outcomes,
                          [client] * clients, stop, seconds)
    finally:
        if shared is not None:
            shared.close()


def _seconds_until_cpu_idle(pid: int, window_s: float = 0.25, idle_fraction: float = 0.05,
                            timeout_s: float = 120.0) -> float:
    """Seconds from now until the first `window_s` window in which the process used < `idle_fraction` of a core."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        window_start, used = time.monotonic(), cpu_seconds(pid)
        time.sleep(window_s)  # a measurement window, not a wait for a state
        if cpu_seconds(pid) - used < idle_fraction * window_s:
            return window_start - start
    return float("inf")


def _run_phase(name: str, server: BackgroundServer, outcomes: Outcomes, clients, stop: threading.Event,
               seconds: float, on_stop=None, probe_f2i: bool = False) -> PhaseResult:
    pid = server.process.pid
    idle = rss_bytes(pid)
    sampler = RssSampler(pid)
    sampler.start()
    spawn = multiprocessing.get_context("spawn")
    probe_ready, probe_stop, probe_results = spawn.Event(), spawn.Event(), spawn.Queue()
    probe = spawn.Process(target=_probe, args=(server.address, probe_ready, probe_stop, probe_results, probe_f2i),
                          daemon=True)
    probe.start()
    if not probe_ready.wait(120):
        raise RuntimeError("the probe process did not reach the server within 120 s")
    threads = [threading.Thread(target=c, daemon=True) for c in clients]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    stop.wait(seconds)
    stop.set()
    cpu_stop = on_stop() if on_stop is not None else None
    for thread in threads:
        thread.join(timeout=180)
    elapsed = time.perf_counter() - started
    probe_stop.set()
    latencies, errors, answered, images = probe_results.get(timeout=60)
    probe.join(timeout=60)
    outcomes.latencies_s.update(latencies)
    outcomes.errors.update(errors)
    outcomes.answered.update(answered)
    outcomes.images.update(images)
    return PhaseResult(name, outcomes, elapsed, idle, sampler.stop(), cpu_stop)


@contextlib.contextmanager
def warm_server(encoder_args: list[str]) -> Iterator[BackgroundServer]:
    """A fresh server per phase (so one phase's memory does not count as the next one's idle), warmed by a call."""
    with background_server_process(extra_args=(*encoder_args, "--log-level", "WARNING")) as server:
        with grpc.insecure_channel(server.address) as channel:
            channel.unary_unary(_METHOD + "Feature")(feature_request(4), timeout=60)
        yield server


# -- drain stress ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DrainRun:
    clean: bool
    reason: str
    seconds: float


def one_drain(encoder_args: list[str], timeout_s: float = 60.0) -> DrainRun:
    """Start, stream one batch, SIGTERM, observe NOT_SERVING and a refused call, finish the stream, exit 0."""
    start = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "reaas_server.cli", "--port", "0", "--grace", "30", "--drain-delay", "0.2", "--ledger", ":memory:",
         "--bound-cost-budget", "0", "--log-level", "WARNING", *encoder_args],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = process.stdout.readline()
        if "listening on" not in line:
            return DrainRun(False, f"did not start: {line!r}", time.monotonic() - start)
        address = line.split("listening on ")[1].split()[0]
        request = pb.FeatureRequest.FromString(feature_request(2))
        more = threading.Event()

        def requests():
            yield request
            more.wait(timeout_s)
            yield request

        with grpc.insecure_channel(address) as channel:
            stream = channel.stream_stream(_METHOD + "StreamFeatures", pb.FeatureRequest.SerializeToString,
                                           pb.FeatureResponse.FromString)
            replies = stream(requests(), timeout=timeout_s)
            next(replies)
            process.send_signal(signal.SIGTERM)
            health = health_pb2_grpc.HealthStub(channel)
            while health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == (
                    health_pb2.HealthCheckResponse.SERVING):
                if time.monotonic() - start > timeout_s:
                    return DrainRun(False, "health stayed SERVING", time.monotonic() - start)
            feature = channel.unary_unary(_METHOD + "Feature", pb.FeatureRequest.SerializeToString,
                                          pb.FeatureResponse.FromString)
            try:
                feature(request, timeout=10)
                return DrainRun(False, "a new call was served while draining", time.monotonic() - start)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    return DrainRun(False, f"new call got {error.code().name}", time.monotonic() - start)
            more.set()
            if len(list(replies)) != 1:
                return DrainRun(False, "the in-flight stream lost its last reply", time.monotonic() - start)
        code = process.wait(timeout=timeout_s)
        return DrainRun(code == 0, f"exit {code}", time.monotonic() - start)
    except (grpc.RpcError, subprocess.TimeoutExpired) as error:
        return DrainRun(False, f"{type(error).__name__}: {error}", time.monotonic() - start)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()


def run_drains(count: int, encoder_args: list[str], hogs: int) -> list[DrainRun]:
    from tqdm import tqdm

    hog_processes = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
    try:
        return [one_drain(encoder_args) for _ in tqdm(range(count), desc="SIGTERM drains", unit="drain")]
    finally:
        for hog in hog_processes:
            hog.kill()
            hog.wait()


# -- replica loss -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReplicaKillResult:
    job: str
    trials: int
    images: int  # per trial
    lost: int  # images whose features were missing or differed from the undisturbed run, all trials
    failed_jobs: int
    killed_mid_job: int  # trials in which the kill landed before the job had finished


def _start_replica(encoder_args: list[str]) -> BackgroundServer:
    stack = contextlib.ExitStack()
    server = stack.enter_context(background_server_process(
        extra_args=(*encoder_args, "--log-level", "WARNING", "--bound-cost-budget", "0")))
    _REPLICA_STACKS[server.process.pid] = stack
    return server


_REPLICA_STACKS: dict[int, contextlib.ExitStack] = {}


def _stop_replica(server: BackgroundServer) -> None:
    _REPLICA_STACKS.pop(server.process.pid).close()


def run_replica_kills(encoder_args: list[str], trials: int, images: int, seed: int = 0) -> list[ReplicaKillResult]:
    """Two replicas behind one round_robin client; one is SIGKILLed at a random moment of each job.

    Jobs: unary Feature calls of 64, 256 and 4 096 images, and a StreamFeatures job of 256-image batches. The
    undisturbed run of the same job on the same two replicas is the reference; every image whose features are
    missing or differ bit-wise counts as lost.
    """
    from reaas_client import EncoderClient

    rng = np.random.default_rng(seed)
    pixels = rng.random((images, *_INPUT_SHAPE), dtype=np.float32)
    jobs = {f"unary Feature, {n}-image calls": n for n in (64, 256, 4096)} | {"StreamFeatures, 256-image batches": 0}
    replicas = [_start_replica(encoder_args) for _ in range(2)]
    results = []
    try:
        for job, size in jobs.items():
            def run(client: EncoderClient, size: int = size) -> np.ndarray:
                if size:
                    return np.concatenate([client.features(pixels[i:i + size]) for i in range(0, images, size)])
                batches = ((pixels[i:i + 256], None) for i in range(0, images, 256))
                return np.concatenate(list(client.stream_features(batches, timeout_s=600)))

            with EncoderClient([r.address for r in replicas], timeout_s=600) as client:
                start = time.monotonic()
                reference = run(client)
                undisturbed_s = time.monotonic() - start
            lost = failed = mid_job = 0
            for _ in range(trials):
                victim = int(rng.integers(2))
                done = threading.Event()

                def kill(delay_s: float, victim: int = victim, done: threading.Event = done) -> None:
                    if not done.wait(delay_s):
                        replicas[victim].process.kill()

                killer = threading.Thread(target=kill, args=(float(rng.uniform(0, undisturbed_s)),))
                with EncoderClient([r.address for r in replicas], timeout_s=600) as client:
                    killer.start()
                    try:
                        answer = run(client)
                        lost += int((~(answer == reference).all(axis=1)).sum())
                    except Exception as error:  # noqa: BLE001 - a lost job is what we count
                        print(f"  {job}: job failed: {error}", flush=True)
                        failed += 1
                        lost += images
                    done.set()
                    killer.join()
                if replicas[victim].process.poll() is not None:
                    mid_job += 1
                    _stop_replica(replicas[victim])
                    replicas[victim] = _start_replica(encoder_args)
            results.append(ReplicaKillResult(job, trials, images, lost, failed, mid_job))
            print(f"  {job}: {lost} images lost in {trials} trials ({mid_job} kills mid-job)", flush=True)
    finally:
        for replica in replicas:
            _stop_replica(replica)
    return results


# -- report ------------------------------------------------------------------------------------------------
def _phase_rows(result: PhaseResult) -> list[list[object]]:
    rows = []
    for kind, latencies in sorted(result.outcomes.latencies_s.items()):
        errors = sum(n for (k, _, _), n in result.outcomes.errors.items() if k == kind)
        rows.append([result.name, kind, result.outcomes.answered[kind], errors,
                     f"{result.outcomes.images[kind] / result.seconds:.0f}" if result.outcomes.images[kind] else "–",
                     percentile_ms(latencies, 50), percentile_ms(latencies, 99)])
    for kind in sorted({k for k, _, _ in result.outcomes.errors} - set(result.outcomes.latencies_s)):
        errors = sum(n for (k, _, _), n in result.outcomes.errors.items() if k == kind)
        rows.append([result.name, kind, 0, errors, "–", "–", "–"])
    return rows


def _goal(met: bool) -> str:
    return "met" if met else "**NOT met**"


def report(phases: list[PhaseResult], drains: list[DrainRun], kills: list[ReplicaKillResult],
           args: argparse.Namespace) -> str:
    body = [
        f"Server: `reaas-server --demo-kind {args.demo_kind}` with its default admission limits, a child process "
        "on loopback; load generators and probes share the machine's cores with it. Latencies are of answered "
        "calls; refused calls are retried after the server's hint.\n",
        markdown_table(["phase", "call", "answered", "refused", "images/s", "p50 ms", "p99 ms"],
                       [row for phase in phases for row in _phase_rows(phase)]),
        "\nRefusals by status (call, status, with a grpc-retry-pushback-ms hint):\n",
        markdown_table(["phase", "call", "status", "retry hint", "count"],
                       [[p.name, k, code, "yes" if hint else "no", n]
                        for p in phases for (k, code, hint), n in sorted(p.outcomes.errors.items())]
                       or [["–", "–", "–", "–", 0]]),
        "\nMemory (server RSS, sampled every 20 ms):\n",
        markdown_table(["phase", "idle MB", "peak MB", "peak / idle"],
                       [[p.name, f"{p.idle_rss / 2**20:.0f}", f"{p.peak_rss / 2**20:.0f}",
                         f"{p.peak_rss / p.idle_rss:.2f}"] for p in phases]),
        "",
    ]
    goals = []
    for phase in phases:
        health = phase.outcomes.latencies_s.get("health", [])
        unary = phase.outcomes.latencies_s.get(LIGHT_FEATURE, [])
        bad = {(k, c, h): n for (k, c, h), n in phase.outcomes.errors.items()
               if c != "RESOURCE_EXHAUSTED" or not h}
        unary_refused = sum(n for (k, _, _), n in phase.outcomes.errors.items() if k == LIGHT_FEATURE)
        goals += [
            [phase.name, "health p99 ≤ 100 ms", f"{percentile_ms(health, 99)} ms",
             _goal(bool(health) and np.percentile(health, 99) <= 0.1)],
            [phase.name, "unary Feature p99 ≤ 1 s", f"{percentile_ms(unary, 99)} ms",
             _goal(bool(unary) and np.percentile(unary, 99) <= 1.0)],
            [phase.name, "the light client is answered, not refused", f"{len(unary)} of {len(unary) + unary_refused}",
             _goal(bool(unary) and unary_refused == 0)],
            [phase.name, "every error RESOURCE_EXHAUSTED with a retry hint",
             "all" if not bad else ", ".join(f"{n}× {k} {c}{'' if h else ' (no hint)'}"
                                             for (k, c, h), n in bad.items()), _goal(not bad)],
            [phase.name, "peak RSS ≤ 2× idle", f"{phase.peak_rss / phase.idle_rss:.2f}×",
             _goal(phase.peak_rss <= 2 * phase.idle_rss)],
        ]
        light_f2i = phase.outcomes.latencies_s.get(LIGHT_F2I, [])
        heavy_f2i = phase.outcomes.latencies_s.get("F2IPerturb", [])
        if phase.name == "heavy key":
            goals.append([phase.name, "the light key's 4-image Feature p99 ≤ 250 ms (issue 22)",
                          f"{percentile_ms(unary, 99)} ms", _goal(bool(unary) and np.percentile(unary, 99) <= 0.25)])
        if light_f2i or phase.outcomes.errors.get((LIGHT_F2I, "RESOURCE_EXHAUSTED", True)):
            refused = sum(n for (k, _, _), n in phase.outcomes.errors.items() if k == LIGHT_F2I)
            goals.append([phase.name, "the light key's F2I waits at most one slot time (p99 ≤ the heavy calls' p99) "
                          "and is never refused (issue 22)",
                          f"p99 {percentile_ms(light_f2i, 99)} ms vs {percentile_ms(heavy_f2i, 99)} ms; "
                          f"{refused} refused",
                          _goal(bool(light_f2i) and bool(heavy_f2i) and refused == 0
                                and np.percentile(light_f2i, 99) <= np.percentile(heavy_f2i, 99))])
        if "small" in phase.name:
            refused = sum(n for (k, _, _), n in phase.outcomes.errors.items() if "small clients" in k)
            goals.append([phase.name, "0 refusals (their images stay under the queue's capacity) (issue 22)",
                          f"{refused}", _goal(refused == 0)])
        if phase.cpu_stop_s is not None:
            goals.append([phase.name, "cancelled F2I stops using CPU within 1 s", f"{phase.cpu_stop_s:.2f} s",
                          _goal(phase.cpu_stop_s <= 1.0)])
    if drains:
        clean = sum(d.clean for d in drains)
        goals.append(["drain", f"{len(drains)} SIGTERMs under CPU load: all clean", f"{clean}/{len(drains)}",
                      _goal(clean == len(drains))])
        failures = Counter(d.reason for d in drains if not d.clean)
        body.append(f"Drains: {clean}/{len(drains)} clean under {args.hogs} CPU hog processes, "
                    f"median {statistics.median(d.seconds for d in drains):.2f} s each (start to exit)"
                    + (f"; failures: {dict(failures)}" if failures else "") + ".\n")
    if kills:
        body += ["Replica loss: two replicas behind one round_robin `EncoderClient`, one SIGKILLed at a uniformly "
                 "random moment of each job (a kill that lands after the job finished counts as not mid-job):\n",
                 markdown_table(["job", "trials", "images per trial", "kills mid-job", "failed jobs", "images lost"],
                                [[k.job, k.trials, k.images, k.killed_mid_job, k.failed_jobs, k.lost] for k in kills]),
                 ""]
        lost = sum(k.lost for k in kills)
        goals.append(["replica loss", "a replica killed mid-job: 0 lost results",
                      f"{lost} lost in {sum(k.killed_mid_job for k in kills)} mid-job kills", _goal(lost == 0)])
    body += ["## Goals (issue 10)\n", markdown_table(["phase", "goal", "measured", ""], goals)]
    return "\n".join(body)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-kind", default="nonrobust",
                        help="shipped encoder to serve: the non-robust CNN has the slowest forward and bounds "
                        "of the shipped ones, the hardest case for fairness (default: %(default)s)")
    parser.add_argument("--stream-clients", type=int, default=50)
    parser.add_argument("--stream-batch", type=int, default=4096, help="images per streamed request")
    parser.add_argument("--batches-per-stream", type=int, default=4)
    parser.add_argument("--f2i-clients", type=int, default=8)
    parser.add_argument("--f2i-images", type=int, default=8)
    parser.add_argument("--f2i-bound", default="crown")
    parser.add_argument("--heavy-clients", type=int, default=8, help="heavy key's concurrent Feature calls")
    parser.add_argument("--heavy-images", type=int, default=4096, help="images per heavy Feature call")
    parser.add_argument("--small-clients", type=int, default=64)
    parser.add_argument("--small-images", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each load phase")
    parser.add_argument("--drains", type=int, default=100, help="SIGTERM drains to run (0: skip)")
    parser.add_argument("--hogs", type=int, default=2, help="busy-looping processes beside the drains")
    parser.add_argument("--phases", default="streams,f2i,heavy,small",
                        help="load phases to run, comma-separated: streams, f2i, heavy (one key's big Feature "
                             "calls beside a light key), small (many small clients as one key, then as many keys)")
    parser.add_argument("--kill-trials", type=int, default=5, help="replica kills per job kind (0: skip)")
    parser.add_argument("--kill-images", type=int, default=8192, help="images per replica-loss job")
    parser.add_argument("--name", default="load", help="results file stem in benchmarks/results/")
    parser.add_argument("--server-args", default="", help="more reaas-server flags, space-separated")
    args = parser.parse_args(argv)
    print(f"machine: {machine_summary()}", flush=True)
    encoder_args = ["--demo-kind", args.demo_kind, *args.server_args.split()]
    phases = []
    wanted = args.phases.split(",")
    if "streams" in wanted:
        print(f"streams: {args.stream_clients} clients × {args.stream_batch}-image batches, {args.seconds} s",
              flush=True)
        with warm_server(encoder_args) as server:
            phases.append(run_streams(server, args.stream_clients, args.stream_batch, args.batches_per_stream,
                                      args.seconds))
    if "f2i" in wanted:
        print(f"f2i: {args.f2i_clients} clients × {args.f2i_images}-image {args.f2i_bound} calls, {args.seconds} s",
              flush=True)
        with warm_server(encoder_args) as server:
            phases.append(run_f2i(server, args.f2i_clients, args.f2i_images, args.f2i_bound, args.seconds))
    if "heavy" in wanted:
        print(f"heavy: one key's {args.heavy_clients} × {args.heavy_images}-image Feature calls, {args.seconds} s",
              flush=True)
        with warm_server(encoder_args) as server:
            phases.append(run_heavy_feature(server, args.heavy_clients, args.heavy_images, args.seconds))
    if "small" in wanted:
        for one_key in (True, False):
            print(f"small: {args.small_clients} clients × {args.small_images} images, one key: {one_key}, "
                  f"{args.seconds} s", flush=True)
            with warm_server(encoder_args) as server:
                phases.append(run_small_clients(server, args.small_clients, args.small_images, args.seconds,
                                                one_key=one_key))
    drains = run_drains(args.drains, encoder_args, args.hogs) if args.drains else []
    kills = run_replica_kills(encoder_args, args.kill_trials, args.kill_images) if args.kill_trials else []
    text = report(phases, drains, kills, args)
    print(text)
    path = write_results(args.name, "Service under load (issue 10)", text, make_target="bench-load")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
