"""background_server: the server child never outlives its parent, even one killed by SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reaas_client.background_server import background_server_process

PARENT = """
import sys, threading
from reaas_client.background_server import background_server_process
with background_server_process("reaas", extra_args=("--demo-kind", "pca")) as server:
    print(server.process.pid, flush=True)
    threading.Event().wait()
"""


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for a reaper (a container's init may never reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _wait_until_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signal is Linux's prctl")
def test_server_child_dies_with_a_killed_parent() -> None:
    repo = Path(__file__).resolve().parents[2]
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, cwd=repo,
                              env={**os.environ, "PYTHONPATH": str(repo)})
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _wait_until_gone(child, timeout_s=60), f"server {child} outlived its SIGKILLed parent"
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()


def test_server_child_is_stopped_when_the_block_ends() -> None:
    with background_server_process("reaas", extra_args=("--demo-kind", "pca")) as server:
        pid = server.process.pid
        assert _alive(pid)
    assert server.process.returncode is not None
