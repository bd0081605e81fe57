"""The usage ledger on disk: quotas, the reaas-keys admin CLI, and nothing answered lost to a restart or SIGKILL."""

from __future__ import annotations

import csv
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from reaas_client import EncoderClient, ServiceError
from reaas_server import ServerConfig, run_server
from reaas_server.keys_cli import main as keys_main
from reaas_server.ledger import OPEN_ACCESS_RECHECK_S, LedgerError, UsageLedger
from reaas_server.quotas import QuotaBook, QuotaExceeded


@pytest.fixture()
def ledger_path(tmp_path):
    return tmp_path / "ledger.sqlite3"


def test_a_quota_refuses_the_request_that_would_exceed_it_and_usage_shows_what_remains(
        demo_encoder, make_images, ledger_path):
    ledger = UsageLedger(ledger_path)
    secret = ledger.add_key("quota", quota_queries=10, quota_period_s=86400)
    ledger.close()
    with run_server(ServerConfig(port=0, ledger_path=ledger_path), demo_encoder) as (_, port), \
            EncoderClient(f"127.0.0.1:{port}", api_key=secret, timeout_s=30) as client:
        client.features(make_images(6))
        quota = client.usage().quota
        assert (quota.limit, quota.period_s, quota.used, quota.remaining) == (10, 86400, 6, 4)
        assert quota.resets_at_unix % 86400 == 0
        with pytest.raises(ServiceError) as refused:
            client.features(make_images(5))
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "10 queries per day" in refused.value.details and "resets at" in refused.value.details
        client.features(make_images(4))  # exactly up to the limit is allowed
        assert client.usage().quota.remaining == 0
        assert client.usage().total_queries == 10


def test_a_stream_is_stopped_at_the_message_that_would_exceed_the_quota(demo_encoder, make_images, ledger_path):
    ledger = UsageLedger(ledger_path)
    secret = ledger.add_key("streamer", quota_queries=10, quota_period_s=100 * 365 * 86400)  # no window roll-over mid-test
    ledger.close()
    with run_server(ServerConfig(port=0, ledger_path=ledger_path), demo_encoder) as (_, port), \
            EncoderClient(f"127.0.0.1:{port}", api_key=secret, timeout_s=30) as client:
        answered = []
        with pytest.raises(ServiceError) as refused:
            for features in client.stream_features([(make_images(4, seed=s), None) for s in range(3)]):
                answered.append(features)
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(answered) == 2
        assert client.usage().total_queries == 8


def test_reservations_keep_concurrent_calls_from_overshooting_and_unanswered_ones_give_back():
    ledger = UsageLedger(None)
    ledger.add_key("k", quota_queries=10, quota_period_s=60)
    (key,) = ledger.api_keys()
    quotas = QuotaBook(ledger)
    first = quotas.reserve(key, 6)
    with pytest.raises(QuotaExceeded):
        quotas.reserve(key, 5)  # 6 are in flight: 6 + 5 > 10 although nothing is used yet
    quotas.release(first)  # the first call was refused downstream: its queries come back
    second = quotas.reserve(key, 10)
    ledger.charge("k", "Feature", queries=10, request_bytes=1, response_bytes=1, hold=second)
    assert quotas.status(key).used == 10
    with pytest.raises(QuotaExceeded) as exhausted:
        quotas.reserve(key, 1)
    assert exhausted.value.retry_after_ms is not None  # waiting for the next period helps
    with pytest.raises(QuotaExceeded, match="can never fit") as never:
        quotas.reserve(key, 11)
    assert never.value.retry_after_ms is None  # no hint: no client should retry it


def test_concurrent_charges_are_each_committed_and_a_failed_commit_fails_every_call_in_it(ledger_path):
    """Group commit: many calls' rows go in one transaction, and each call still learns whether its row is in."""
    ledger = UsageLedger(ledger_path)
    barrier = threading.Barrier(16)

    def charge(index: int) -> None:
        barrier.wait()
        ledger.charge("anonymous", "Feature", queries=index, request_bytes=1, response_bytes=1)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(charge, range(16)))
    reader = UsageLedger(ledger_path)  # another connection sees every row: they were committed
    assert sorted(row[3] for row in reader.rows()) == list(range(16))
    reader.close()
    ledger._db.execute("DROP TABLE usage")  # noqa: SLF001 - a database that can no longer take the row
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda _: _raises(lambda: charge_one(ledger)), range(4)))
    assert all(isinstance(error, sqlite3.OperationalError) for error in outcomes)
    ledger.close()


def test_deferred_commits_commit_a_passs_rows_together_when_the_block_ends_and_none_if_it_fails(ledger_path):
    """The batcher's worker charges a pass's calls inside deferred_commits: one transaction when the block ends,
    before any reply leaves; a block that fails commits none of its rows."""
    ledger = UsageLedger(ledger_path)
    reader = UsageLedger(ledger_path)
    with ledger.deferred_commits():
        for queries in (1, 2, 3):
            ledger.charge("anonymous", "Feature", queries=queries, request_bytes=1, response_bytes=1)
        with ledger.deferred_commits():  # nested: the outer block commits
            ledger.charge("anonymous", "Feature", queries=4, request_bytes=1, response_bytes=1)
        assert list(reader.rows()) == []  # nothing committed before the block ends
    assert sorted(row[3] for row in reader.rows()) == [1, 2, 3, 4]
    with pytest.raises(RuntimeError), ledger.deferred_commits():
        ledger.charge("anonymous", "Feature", queries=5, request_bytes=1, response_bytes=1)
        raise RuntimeError("the pass failed")
    charge_one(ledger)  # outside a block: committed at once, as ever
    assert sorted(row[3] for row in reader.rows()) == [1, 1, 2, 3, 4]
    reader.close()
    ledger.close()


def charge_one(ledger: UsageLedger) -> None:
    ledger.charge("anonymous", "Feature", queries=1, request_bytes=1, response_bytes=1)


def _raises(call) -> BaseException | None:
    try:
        call()
    except BaseException as error:  # noqa: BLE001 - returned to the test
        return error
    return None


def test_a_key_issued_by_another_process_closes_open_access_within_the_recheck_time(ledger_path):
    server_side, admin_side = UsageLedger(ledger_path), UsageLedger(ledger_path)
    assert not server_side.has_keys()
    admin_side.add_key("alice")
    deadline = time.monotonic() + OPEN_ACCESS_RECHECK_S + 5
    while not server_side.has_keys():
        assert time.monotonic() < deadline, "the new key was never seen"
        time.sleep(0.01)
    server_side.close()
    admin_side.close()


def test_key_rules_are_checked_when_a_key_is_made():
    ledger = UsageLedger(None)
    ledger.add_key("a")
    for bad in (lambda: ledger.add_key("a"), lambda: ledger.add_key("anonymous"), lambda: ledger.add_key(""),
                lambda: ledger.add_key("b", quota_queries=5), lambda: ledger.add_key("b", quota_queries=0,
                                                                                      quota_period_s=60),
                lambda: ledger.revoke_key("nobody")):
        with pytest.raises(LedgerError):
            bad()


def test_reaas_keys_adds_lists_revokes_and_exports(ledger_path, tmp_path, capsys, demo_encoder, make_images):
    assert keys_main(["--ledger", str(ledger_path), "add", "alice", "--quota", "100", "--period", "hour"]) == 0
    secret = capsys.readouterr().out.strip()
    assert secret.startswith("reaas_")
    with run_server(ServerConfig(port=0, ledger_path=ledger_path), demo_encoder) as (_, port):
        with EncoderClient(f"127.0.0.1:{port}", api_key=secret) as alice:
            alice.features(make_images(3))
            alice.features(make_images(2))
        assert keys_main(["--ledger", str(ledger_path), "list"]) == 0
        listing = capsys.readouterr().out
        assert "alice" in listing and "active" in listing and "5/100 per hour" in listing
        assert keys_main(["--ledger", str(ledger_path), "revoke", "alice"]) == 0
        with EncoderClient(f"127.0.0.1:{port}", api_key=secret) as alice, pytest.raises(ServiceError) as refused:
            alice.features(make_images(1))  # revocation takes effect on the running server's next call
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert keys_main(["--ledger", str(ledger_path), "export", str(tmp_path / "bill.csv")]) == 0
    with open(tmp_path / "bill.csv") as handle:
        rows = list(csv.DictReader(handle))
    features = [(r["key_name"], r["queries"]) for r in rows if r["rpc"] == "Feature"]
    assert features == [("alice", "3"), ("alice", "2")]
    assert {r["rpc"] for r in rows} == {"Feature", "GetEncoderInfo"}  # free calls are listed too, at 0 queries
    with pytest.raises(SystemExit) as refused:  # a clear error, not a traceback
        keys_main(["--ledger", str(ledger_path), "revoke", "alice"])
    assert refused.value.code == 2 and "no active key" in capsys.readouterr().err


def _start(ledger_path) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen(
        [sys.executable, "-m", "reaas_server.cli", "--port", "0", "--ledger", str(ledger_path), "--log-level",
         "WARNING", "--bound-cost-budget", "0", "--drain-delay", "0"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = server.stdout.readline()
    assert "listening on" in line, line
    return server, line.split("listening on ")[1].split()[0]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@pytest.mark.parametrize("stop", ["SIGKILL", "SIGTERM"])
def test_the_ledger_after_a_restart_equals_what_was_answered_before(ledger_path, make_images, stop, backend,
                                                                     request):
    if backend == "postgresql":
        ledger_path = request.getfixturevalue("postgres_url")
    server, address = _start(ledger_path)
    try:
        with EncoderClient(address) as client:
            client.features(make_images(7))
            assert len(list(client.stream_features([(make_images(3), None), (make_images(2), None)]))) == 2
            client.f2i_perturb(make_images(4), [0.5] * 4, bound="lipschitz")
            answered = client.ledger.totals_by_rpc()
        server.send_signal(getattr(signal, stop))
        server.wait(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
        server.stdout.close()
    server, address = _start(ledger_path)
    try:
        with EncoderClient(address) as client:
            usage = client.usage()
    finally:
        server.kill()
        server.wait()
        server.stdout.close()
    assert usage.total_queries == 7 + 5 + 4
    for rpc, row in answered.items():
        assert usage.rpcs[rpc].queries == row.queries
        assert usage.rpcs[rpc].request_bytes == row.request_bytes
        assert usage.rpcs[rpc].response_bytes == row.response_bytes


def test_a_key_revoked_mid_stream_is_refused_at_the_next_message(demo_encoder, make_images, ledger_path):
    from reaas.v1 import encoder_service_pb2 as pb
    from reaas.v1 import encoder_service_pb2_grpc as pb_grpc
    from reaas_client.wire import encode_tensor

    admin = UsageLedger(ledger_path)
    secret = admin.add_key("leaver")
    revoked = threading.Event()
    message = pb.FeatureRequest(images=encode_tensor(make_images(3).numpy()))

    def requests():
        yield message
        yield message
        revoked.wait(timeout=60)
        yield message  # the key was revoked after the first two were answered

    with run_server(ServerConfig(port=0, ledger_path=ledger_path), demo_encoder) as (_, port), \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        replies = pb_grpc.EncoderServiceStub(channel).StreamFeatures(
            requests(), metadata=(("x-api-key", secret),), timeout=60)
        assert [next(replies).features.shape[0] for _ in range(2)] == [3, 3]
        admin.revoke_key("leaver")
        revoked.set()
        with pytest.raises(grpc.RpcError) as refused:
            next(replies)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked while this stream was open" in refused.value.details()
    assert [row[3] for row in admin.rows() if row[1] == "leaver"] == [3, 3]  # the third was never billed
    admin.close()
