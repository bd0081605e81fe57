"""Run `reaas-server` as a background subprocess on a free loopback port (demo and benchmarks).

The client never imports the server: it starts the server's CLI in a child process, reads the port from the
CLI's handshake line ("reaas-server listening on HOST:PORT ..."), waits for grpc.health.v1 SERVING, and
always stops the child (SIGTERM, then SIGKILL) when the `with` block ends, on error or Ctrl-C too. On Linux the
child also gets SIGTERM when its parent dies without reaching that block (SIGKILL, a crash): a killed benchmark
must not leave a server behind holding CPU and memory.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

_HANDSHAKE = re.compile(r"listening on (\S+):(\d+)")
_EXIT_WITH_PARENT = "REAAS_EXIT_WITH_PARENT"  # read by reaas_server.parent_watch (the client never imports it)


class ServerStartError(RuntimeError):
    """The background server exited or did not become healthy in time (its log path is in the message)."""


@dataclass(frozen=True)
class BackgroundServer:
    """A healthy server child: where to call it, and the process (benchmarks read its memory and CPU)."""

    address: str
    process: subprocess.Popen


@contextlib.contextmanager
def background_server(mode: str = "reaas", *, checkpoint: Path | None = None, log_path: Path | None = None,
                      startup_timeout_s: float = 120.0, extra_args: tuple[str, ...] = (),
                      python: str | None = None) -> Iterator[str]:
    """Yield "127.0.0.1:PORT" of a healthy `reaas-server --mode MODE` child; stop it on exit. ``python``: the
    interpreter that runs the server (default this one's), e.g. another virtual environment's."""
    with background_server_process(mode, checkpoint=checkpoint, log_path=log_path,
                                   startup_timeout_s=startup_timeout_s, extra_args=extra_args,
                                   python=python) as server:
        yield server.address


@contextlib.contextmanager
def background_server_process(mode: str = "reaas", *, checkpoint: Path | None = None, log_path: Path | None = None,
                              startup_timeout_s: float = 120.0, extra_args: tuple[str, ...] = (),
                              python: str | None = None) -> Iterator[BackgroundServer]:
    """Like `background_server`, yielding the child process too."""
    command = [python or sys.executable, "-m", "reaas_server.cli", "--host", "127.0.0.1", "--port", "0", "--mode", mode,
               "--grace", "2", "--ledger", ":memory:", *extra_args]
    if checkpoint is not None:
        command += ["--checkpoint", str(checkpoint)]
    log = open(log_path, "w") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
    # The child asks Linux to end it with this process (reaas_server/parent_watch.py); no pre-exec hook here: one
    # makes Python fork with its fork handlers, and gRPC's waited forever for this process's gRPC threads.
    environment = {**os.environ, _EXIT_WITH_PARENT: str(os.getpid())}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=environment)
    try:
        address = _wait_for_handshake(process, startup_timeout_s, log_path)
        _wait_for_serving(address, process, startup_timeout_s, log_path)
        yield BackgroundServer(address, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
        if log is not subprocess.DEVNULL:
            log.close()


def _wait_for_handshake(process: subprocess.Popen, timeout_s: float, log_path: Path | None) -> str:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:  # readline blocks; a thread lets the deadline apply
        for line in process.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            match = _HANDSHAKE.search(lines.get(timeout=0.5))
        except queue.Empty:
            if process.poll() is not None:
                raise ServerStartError(f"reaas-server exited with {process.returncode}; log: {log_path}") from None
            continue
        if match:
            return f"127.0.0.1:{match.group(2)}"
    raise ServerStartError(f"reaas-server printed no port within {timeout_s:.0f} s; log: {log_path}")


def _wait_for_serving(address: str, process: subprocess.Popen, timeout_s: float, log_path: Path | None) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServerStartError(f"reaas-server exited with {process.returncode}; log: {log_path}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise ServerStartError(f"reaas-server at {address} not SERVING within {timeout_s:.0f} s; log: {log_path}")
