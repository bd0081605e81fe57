"""An unusable, read-only or locked ledger (issue "faults and edges", item 2): found at start, before the encoder
loads, as one line naming the file and the fix; a lock held elsewhere while serving is UNAVAILABLE within
BUSY_TIMEOUT_S, never UNKNOWN after a 30 s wait; the file is private (0600)."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import time

import grpc
import pytest

from reaas_server import ServerConfig, run_server
from reaas_server.ledger import BUSY_TIMEOUT_S, UsageLedger


def _serve_and_fail(ledger: str, monkeypatch, capsys) -> tuple[int, str]:
    """reaas-server's main() on `ledger`; the encoder must never load. (exit status, stderr)."""
    from reaas_server import cli
    from reaas_server.encoder_host import ServedEncoder

    def never(*_args, **_kwargs):
        raise AssertionError("the encoder loaded before the ledger was checked")

    monkeypatch.setattr(ServedEncoder, "load", never)
    with pytest.raises(SystemExit) as exited:
        cli.main(["--port", "0", "--ledger", ledger, "--log-level", "ERROR"])
    return exited.value.code, capsys.readouterr().err


def _corrupt(path) -> None:
    path.write_bytes(b"not a database, just bytes " * 200)


def _truncated(path) -> None:
    ledger = UsageLedger(path)
    ledger.add_key("someone")
    ledger.close()
    path.write_bytes(path.read_bytes()[:1500])


def _newer(path) -> None:
    UsageLedger(path).close()
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA user_version = 999")


@pytest.mark.parametrize(("make", "says"), [
    (_corrupt, "not a usable SQLite database"),
    (_truncated, "not a usable SQLite database"),
    (lambda path: path.mkdir(), "is a folder"),
    (_newer, "newer than this reaas-server's"),
])
def test_an_unusable_ledger_stops_the_server_before_the_encoder_loads(tmp_path, monkeypatch, capsys, make, says):
    path = tmp_path / "ledger.sqlite3"
    make(path)
    code, err = _serve_and_fail(str(path), monkeypatch, capsys)
    assert code == 2
    assert says in err and str(path) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_ledger_locked_elsewhere_at_start_is_reported_within_the_busy_timeout(tmp_path, monkeypatch, capsys):
    path = tmp_path / "ledger.sqlite3"
    UsageLedger(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        code, err = _serve_and_fail(str(path), monkeypatch, capsys)
        assert time.monotonic() - started < BUSY_TIMEOUT_S + 5
    finally:
        holder.rollback()
        holder.close()
    assert code == 2 and "locked by another process" in err and str(path) in err


def test_a_read_only_ledger_is_reported_at_start(tmp_path, monkeypatch, capsys):
    """A ledger this user may not write (mode 0444; as root, which ignores modes, the file made immutable)."""
    import shutil

    path = tmp_path / "ledger.sqlite3"
    UsageLedger(path).close()
    os.chmod(path, 0o444)
    immutable = os.geteuid() == 0
    if immutable and (shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode):
        pytest.skip("root ignores file modes, and chattr +i is not available here")
    try:
        code, err = _serve_and_fail(str(path), monkeypatch, capsys)
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    assert code == 2 and str(path) in err
    assert "read-only" in err or "cannot create or write" in err


def test_the_ledger_file_is_private(tmp_path, demo_encoder):
    path = tmp_path / "ledger.sqlite3"
    with run_server(ServerConfig(port=0, ledger_path=path), demo_encoder):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_lock_held_elsewhere_while_serving_answers_unavailable_not_unknown(tmp_path, demo_encoder, make_images):
    from reaas.v1 import encoder_service_pb2 as pb
    from reaas_client.wire import encode_tensor

    path = tmp_path / "ledger.sqlite3"
    request = pb.FeatureRequest(images=encode_tensor(make_images(2).numpy()))
    with run_server(ServerConfig(port=0, ledger_path=path), demo_encoder) as (_, port), \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        feature = channel.unary_unary("/reaas.v1.EncoderService/Feature",
                                      request_serializer=pb.FeatureRequest.SerializeToString,
                                      response_deserializer=pb.FeatureResponse.FromString)
        feature(request, timeout=30)
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # as `sqlite3 ledger.sqlite3` left open in a shell would
        try:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                feature(request, timeout=30)
            waited = time.monotonic() - started
        finally:
            holder.rollback()
            holder.close()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "locked" in refused.value.details()
        assert waited < BUSY_TIMEOUT_S + 5
        feature(request, timeout=30)  # the lock gone, the service goes on
    ledger = UsageLedger(path)
    assert sum(1 for row in ledger.rows() if row[2] == "Feature") == 2  # the refused call is not billed
    ledger.close()
