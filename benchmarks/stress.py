"""Faults and edges, replayed against real `reaas-server` processes on loopback (issue 24): one PASS/FAIL per case.

1. crafted feature radii: INVALID_ARGUMENT naming the range, the limit itself answered, and the F2I CPU per
   image at any accepted R_F at most 2x its cost at R_F = 0.5;
2. a read-only ledger: refused at start, one line naming it;
3. a write lock held elsewhere while serving: UNAVAILABLE within the busy timeout, then served again;
4. a key revoked while its stream is open: refused at the next message;
5. drains under load beside CPU hogs: exit 0 within --grace + 1 s, no traceback, every call answered or cleanly
   refused;
6. unusable ledgers and a certificate with another's key at start: one line each, no traceback;
7. observability: an expired deadline counted DEADLINE_EXCEEDED, the ledger file private (0600).

The fast cases are also tests in `make test` (tests/reaas_server/test_ledger_faults.py, test_f2i_service.py,
test_usage_ledger.py); this script runs them as a tester would, with the drains many times under CPU load.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch

from benchmarks.environment import load_line, machine_summary, markdown_table, write_results
from reaas_server.ledger import BUSY_TIMEOUT_S, UsageLedger

_METHOD = "/reaas.v1.EncoderService/"
CLEAN_CODES = {"OK", "UNAVAILABLE", "CANCELLED", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}


@dataclass(frozen=True)
class Case:
    name: str
    passed: bool
    measured: str


def pb():
    from reaas.v1 import encoder_service_pb2

    return encoder_service_pb2


def images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 1, 28, 28), dtype=np.float32)


def feature_request(count: int):
    from reaas_client.wire import encode_tensor

    return pb().FeatureRequest(images=encode_tensor(images(count)))


@contextlib.contextmanager
def server(folder: Path, *extra: str, ledger: Path | None = None, name: str = "server") -> Iterator[tuple]:
    """A `reaas-server` child; yields (address, process, log path)."""
    log = folder / f"{name}.log"
    command = [sys.executable, "-m", "reaas_server.cli", "--port", "0", "--bound-cost-budget", "0",
               "--ledger", str(ledger or folder / f"{name}.sqlite3"), "--log-level", "INFO", *extra]
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=handle, text=True)
    try:
        line = process.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"reaas-server did not start: {line!r}; log: {log}")
        yield line.split("listening on ")[1].split()[0], process, log
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stdout.close()


def start_fails(folder: Path, *extra: str, ledger: str, timeout_s: float = 120) -> tuple[int, str, float]:
    """(exit status, stderr, seconds) of a `reaas-server` expected to refuse to start."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "reaas_server.cli", "--port", "0", "--ledger", ledger,
                           "--log-level", "WARNING", *extra], capture_output=True, text=True, timeout=timeout_s)
    return done.returncode, done.stderr, time.monotonic() - started


def one_clean_line(code: int, err: str, *needles: str) -> bool:
    lines = [line for line in err.strip().splitlines() if line]
    return code == 2 and len(lines) == 1 and "Traceback" not in err and all(n in err for n in needles)


# -- 1 ------------------------------------------------------------------------------------------------------
def crafted_radii(folder: Path, kind: str, bounds: tuple[str, ...]) -> Case:
    from reaas.v1 import encoder_service_pb2_grpc as pb_grpc
    from reaas_client.wire import encode_tensor
    from reaas_server import ServedEncoder

    refused, answered = 0, False
    with server(folder, "--demo-kind", kind, name="radii") as (address, _, _), \
            grpc.insecure_channel(address) as channel:
        stub = pb_grpc.EncoderServiceStub(channel)
        limit = stub.GetEncoderInfo(pb().EncoderInfoRequest(), timeout=60).max_feature_radius
        one = encode_tensor(images(1))
        crafted = (1e308, 1.8e308, float("inf"), float("nan"), -1.0, limit * (1 + 1e-9))
        for radius in crafted:
            try:
                stub.F2IPerturb(pb().F2IPerturbRequest(images=one, feature_radii=[radius], bound="lipschitz"),
                                timeout=60)
            except grpc.RpcError as error:
                refused += error.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_feature_radius" in error.details()
        reply = stub.F2IPerturb(pb().F2IPerturbRequest(images=one, feature_radii=[limit]), timeout=600)
        answered = reply.radii[0].image_radius > 0
    # CPU per image of the default bound, in this process (one torch thread), at R_F 0.5 and across the range
    torch.set_num_threads(1)
    encoder = ServedEncoder.load(None, "cpu", demo_kind=kind)
    probe = encoder.probe_images(2)

    def cost(radius: float, bound: str) -> float:
        started = time.thread_time()
        encoder.image_radii(probe, torch.full((2,), radius, dtype=torch.float64), bound=bound, chunk_size=16,
                            memory_budget_bytes=256 << 20)
        return (time.thread_time() - started) / 2

    ratios = []
    for bound in bounds:
        base = cost(0.5, bound)
        worst = max(cost(limit * fraction, bound) for fraction in (1e-3, 0.1, 1.0))
        ratios.append((bound, base, worst))
    passed = refused == len(crafted) and answered and all(worst <= 2 * base for _, base, worst in ratios)
    return Case("1. crafted R_F", passed,
                f"{refused}/{len(crafted)} crafted R_F refused INVALID_ARGUMENT; R_F = limit ({limit:.4g}) answered: "
                f"{answered}; F2I CPU per image ({kind}, 2 images, one thread) at R_F 0.5 -> the worst over R_F in "
                f"[1e-3, 1] x limit, goal <= 2x: "
                + "; ".join(f"{b} {base:.2f} -> {worst:.2f} s ({worst / base:.2f}x)" for b, base, worst in ratios))


# -- 2 and 6 ------------------------------------------------------------------------------------------------
def read_only_ledger(folder: Path) -> Case:
    path = folder / "read-only.sqlite3"
    UsageLedger(path).close()
    os.chmod(path, 0o444)
    immutable = os.geteuid() == 0  # root ignores modes: make the file immutable instead
    if immutable and (shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode):
        return Case("2. read-only ledger", False, "cannot make a read-only file here (root, and no chattr)")
    try:
        code, err, seconds = start_fails(folder, "--demo-kind", "nonrobust", ledger=str(path))
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=False)
    return Case("2. read-only ledger", one_clean_line(code, err, str(path)),
                f"exit {code} after {seconds:.1f} s: {err.strip()}")


def startup_errors(folder: Path) -> Case:
    import trustme

    outcomes = []
    corrupt = folder / "corrupt.sqlite3"
    corrupt.write_bytes(b"not a database " * 300)
    truncated = folder / "truncated.sqlite3"
    ledger = UsageLedger(truncated)
    ledger.add_key("someone")
    ledger.close()
    truncated.write_bytes(truncated.read_bytes()[:1500])
    (folder / "a-folder.sqlite3").mkdir()
    locked = folder / "locked.sqlite3"
    UsageLedger(locked).close()
    holder = sqlite3.connect(locked, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        for name in ("corrupt", "truncated", "a-folder", "locked"):
            path = folder / f"{name}.sqlite3"
            code, err, seconds = start_fails(folder, ledger=str(path))
            outcomes.append((name, one_clean_line(code, err, str(path)), seconds))
    finally:
        holder.rollback()
        holder.close()
    authority = trustme.CA()
    first, second = authority.issue_cert("localhost"), authority.issue_cert("localhost")
    first.cert_chain_pems[0].write_to_path(folder / "cert.pem")
    second.private_key_pem.write_to_path(folder / "other-key.pem")
    code, err, seconds = start_fails(folder, "--tls-cert", str(folder / "cert.pem"), "--tls-key",
                                     str(folder / "other-key.pem"), ledger=":memory:")
    outcomes.append(("TLS certificate with another's key", one_clean_line(code, err), seconds))
    passed = all(ok for _, ok, _ in outcomes)
    return Case("6. startup errors", passed, "; ".join(f"{name}: {'one line' if ok else 'NOT one line'} in "
                                                      f"{seconds:.1f} s" for name, ok, seconds in outcomes))


# -- 3 ------------------------------------------------------------------------------------------------------
def lock_while_serving(folder: Path) -> Case:
    path = folder / "lock.sqlite3"
    request = feature_request(2)
    with server(folder, ledger=path, name="lock") as (address, _, _), grpc.insecure_channel(address) as channel:
        feature = channel.unary_unary(_METHOD + "Feature", pb().FeatureRequest.SerializeToString,
                                      pb().FeatureResponse.FromString)
        feature(request, timeout=30)
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        codes, waits = [], []
        try:
            for _ in range(3):
                started = time.monotonic()
                try:
                    feature(request, timeout=30)
                    codes.append("OK")
                except grpc.RpcError as error:
                    codes.append(error.code().name)
                waits.append(time.monotonic() - started)
        finally:
            holder.rollback()
            holder.close()
        feature(request, timeout=30)
    passed = set(codes) == {"UNAVAILABLE"} and max(waits) < BUSY_TIMEOUT_S + 1
    return Case("3. ledger locked while serving", passed,
                f"calls under the lock: {codes}, answered in at most {max(waits):.2f} s (busy timeout "
                f"{BUSY_TIMEOUT_S:g} s); served again once the lock was gone")


# -- 4 ------------------------------------------------------------------------------------------------------
def revocation_mid_stream(folder: Path) -> Case:
    path = folder / "revoke.sqlite3"
    admin = UsageLedger(path)
    secret = admin.add_key("leaver")
    revoked = threading.Event()
    message = feature_request(4)

    def requests():
        yield message
        yield message
        revoked.wait(timeout=60)
        for _ in range(10):
            yield message

    outcome = "no refusal"
    with server(folder, ledger=path, name="revoke") as (address, _, _), grpc.insecure_channel(address) as channel:
        stream = channel.stream_stream(_METHOD + "StreamFeatures", pb().FeatureRequest.SerializeToString,
                                       pb().FeatureResponse.FromString)
        replies = stream(requests(), metadata=(("x-api-key", secret),), timeout=60)
        answered = sum(1 for _, _ in zip(range(2), replies, strict=False))
        admin.revoke_key("leaver")
        revoked.set()
        try:
            answered += sum(1 for _ in replies)
        except grpc.RpcError as error:
            outcome = error.code().name
    billed = [row[3] for row in admin.rows() if row[1] == "leaver"]
    admin.close()
    passed = outcome == "UNAUTHENTICATED" and answered == 2 and billed == [4, 4]
    return Case("4. revocation mid-stream", passed,
                f"after revoke: {outcome} at the next message; {answered} replies in all, billed {billed}")


# -- 5 ------------------------------------------------------------------------------------------------------
def _recorder(outcomes: collections.Counter) -> Callable[[str], None]:
    lock = threading.Lock()

    def record(code: str) -> None:
        with lock:
            outcomes[code] += 1

    return record


def call_until_refused(address: str, method: str, make: Callable, response, stop: threading.Event,
                       record: Callable[[str], None]) -> None:
    """Call `method` again and again until `stop` or a call is not answered (the drain refused or cut it)."""
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(_METHOD + method, type(make()).SerializeToString, response.FromString)
        while not stop.is_set():
            try:
                call(make(), timeout=60)
                code = "OK"
            except grpc.RpcError as error:
                code = error.code().name
            record(code)
            if code != "OK":
                return


def drains(folder: Path, count: int, grace_s: float, hogs: int) -> Case:
    from reaas_client.wire import encode_tensor

    hog_processes = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
    exits, bad = [], []
    try:
        for trial in range(count):
            outcomes: collections.Counter[str] = collections.Counter()
            with server(folder, "--demo-kind", "nonrobust", "--grace", str(grace_s), "--drain-delay", "1",
                        name=f"drain-{trial}") as (address, process, log):
                stop = threading.Event()
                record = _recorder(outcomes)
                f2i = lambda: pb().F2IPerturbRequest(images=encode_tensor(images(4)),  # noqa: E731
                                                     feature_radii=[0.5] * 4, bound="crown")
                threads = [threading.Thread(target=call_until_refused,
                                            args=(address, "F2IPerturb", f2i, pb().F2IPerturbResponse, stop, record))
                           for _ in range(3)]
                threads += [threading.Thread(target=call_until_refused,
                                             args=(address, "Feature", lambda: feature_request(64),
                                                   pb().FeatureResponse, stop, record)) for _ in range(4)]
                for thread in threads:
                    thread.start()
                time.sleep(3)
                started = time.monotonic()
                process.send_signal(signal.SIGTERM)
                code = process.wait(timeout=grace_s + 60)
                exits.append(time.monotonic() - started)
                stop.set()
                for thread in threads:
                    thread.join(timeout=90)
                text = log.read_text()
                unclean = set(outcomes) - CLEAN_CODES
                if code != 0 or "Traceback" in text or unclean or exits[-1] > grace_s + 1:
                    bad.append(f"trial {trial}: exit {code} after {exits[-1]:.2f} s, tracebacks "
                               f"{text.count('Traceback')}, statuses {dict(outcomes)}")
    finally:
        for hog in hog_processes:
            hog.kill()
            hog.wait()
    within = sum(seconds <= grace_s + 1 for seconds in exits)
    return Case("5. drains under load", not bad,
                f"{within}/{count} exited 0 within --grace {grace_s:g} + 1 s beside {hogs} CPU hogs (F2I crown "
                f"searches and Feature calls in flight); exit after SIGTERM: median {np.median(exits):.2f} s, max "
                f"{max(exits):.2f} s" + (f"; failures: {'; '.join(bad)}" if bad else ""))


# -- 7 ------------------------------------------------------------------------------------------------------
def observability(folder: Path) -> Case:
    import urllib.request

    path = folder / "observe.sqlite3"
    with server(folder, "--metrics-port", "0", "--metrics-host", "127.0.0.1", "--demo-kind", "nonrobust",
                ledger=path, name="observe") as (address, _, log), grpc.insecure_channel(address) as channel:
        f2i = channel.unary_unary(_METHOD + "F2IPerturb", pb().F2IPerturbRequest.SerializeToString,
                                  pb().F2IPerturbResponse.FromString)
        from reaas_client.wire import encode_tensor

        request = pb().F2IPerturbRequest(images=encode_tensor(images(8)), feature_radii=[0.5] * 8, bound="crown")
        codes = []
        for _ in range(4):
            try:
                f2i(request, timeout=0.3)
                codes.append("OK")
            except grpc.RpcError as error:
                codes.append(error.code().name)
        port = next(int(line.rsplit(":", 1)[1].split("/")[0]) for line in log.read_text().splitlines()
                    if "metrics on http://" in line)
        deadline = time.monotonic() + 60
        counted, by_code = 0, {}
        while time.monotonic() < deadline:  # the server records a call when its handler ends
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            by_code = {line.split('code="')[1].split('"')[0]: int(float(line.rsplit(" ", 1)[1]))
                       for line in text.splitlines()
                       if line.startswith("reaas_rpc_calls_total{") and 'rpc="F2IPerturb"' in line}
            counted = by_code.get("DEADLINE_EXCEEDED", 0)
            if sum(by_code.values()) >= 4:
                break
            time.sleep(0.2)
    mode = stat.S_IMODE(path.stat().st_mode)
    passed = codes == ["DEADLINE_EXCEEDED"] * 4 and counted == 4 and mode == 0o600
    recorded = {code: n for code, n in by_code.items() if n}
    return Case("7. observability", passed, f"clients saw {codes}; the metrics recorded {recorded}; "
                                            f"ledger file mode {oct(mode)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drains", type=int, default=30, help="SIGTERM drains under load (case 5)")
    parser.add_argument("--grace", type=float, default=5.0, help="--grace of the drained servers")
    parser.add_argument("--hogs", type=int, default=2, help="busy-looping processes beside the drains")
    parser.add_argument("--kind", default="nonrobust", help="encoder of the crafted-R_F case (--demo-kind)")
    parser.add_argument("--bounds", default="auto,crown,local_lipschitz",
                        help="bounds whose F2I cost is measured across the R_F range (case 1)")
    args = parser.parse_args(argv)
    print(f"machine: {machine_summary()}\n{load_line()}", flush=True)
    cases = []
    with tempfile.TemporaryDirectory(prefix="reaas-stress-") as name:
        folder = Path(name)
        for run in (lambda: crafted_radii(folder, args.kind, tuple(args.bounds.split(","))), lambda: read_only_ledger(folder),
                    lambda: lock_while_serving(folder), lambda: revocation_mid_stream(folder),
                    lambda: drains(folder, args.drains, args.grace, args.hogs), lambda: startup_errors(folder),
                    lambda: observability(folder)):
            try:
                case = run()
            except Exception as error:  # noqa: BLE001 - a case that crashed is a FAIL with its reason, not a stop
                case = Case(getattr(run, "__name__", "case"), False, f"crashed: {type(error).__name__}: {error}")
            cases.append(case)
            print(f"{'PASS' if case.passed else 'FAIL'}  {case.name}: {case.measured}", flush=True)
    body = (f"Load before the run: {load_line()}.\n\n"
            + markdown_table(["case", "result", "measured"],
                             [[c.name, "PASS" if c.passed else "FAIL", c.measured] for c in cases]) + "\n")
    path = write_results("stress", "Faults and edges, replayed", body, make_target="stress")
    print(f"wrote {path}")
    sys.exit(0 if all(c.passed for c in cases) else 1)


if __name__ == "__main__":
    main()
