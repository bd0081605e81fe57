"""The event loop every server of this process runs on: one asyncio loop on a thread of its own.

The server is built on grpc.aio (issue 22): a call waiting for admission, a forward pass or the ledger is a
suspended coroutine, not a parked handler thread, so 64 small clients cost no thread switch per waiting call (the
thread-pool server made 43-45 context switches per 4-image call against the bare server's 16, and answered 0.41-0.47
of its images/s; benchmarks/results/service_profile.md). Starting, stopping and draining stay synchronous calls
(the CLI, tests and embedding programs call them from ordinary threads): they run their coroutines here and wait.
One loop for the whole process, however many servers it starts (tests start several): grpc.aio serves them all on
it, and a server's work never waits behind another loop's thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def serving_loop() -> asyncio.AbstractEventLoop:
    """The process's serving loop, started on first use (a daemon thread: it never keeps a process alive)."""
    global _loop
    with _lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            started = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(started.set)
                loop.run_forever()

            threading.Thread(target=run, name="reaas-loop", daemon=True).start()
            started.wait()
            _loop = loop
        return _loop


def run_on_loop(coroutine: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
    """Run `coroutine` on the serving loop from another thread and return its result (or raise its error)."""
    loop = serving_loop()
    if _on_loop_thread(loop):
        coroutine.close()
        raise RuntimeError("run_on_loop was called from the serving loop itself: await the coroutine instead")
    return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout_s)


def _on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
