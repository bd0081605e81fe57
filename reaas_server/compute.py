"""Where the encoder's heavy work runs: threads the OS schedules *below* the serving loop's thread.

On a saturated host, health checks and refusals must not queue for CPU behind forward passes and bound
searches (a load balancer that waits 100 ms for a health answer marks the replica dead). Handlers on the serving
loop hand each forward pass or F2I search to this pool, whose threads (and the OpenMP workers torch creates from
them, which inherit their priority) run at a higher niceness, and await the result. Raising niceness needs no
privilege; where the OS refuses, the work simply runs at normal priority. The same pool at niceness 0 runs the
ledger's database calls (``BackgroundCompute(..., niceness=0)``): they block on I/O, never on the loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_NICENESS = 10  # CFS gives a nice-0 thread ~9x the CPU share of a nice-10 one


def set_torch_threads(threads: int | None) -> None:
    """Give the calling thread `threads` intra-op threads for torch (None: leave torch's setting).

    Set in every thread the server makes that runs torch work (compute and batcher threads): OpenMP keeps
    the team size per thread, and a thread that never set it was measured using a two-thread team under a
    one-thread process setting, its idle team member spinning: 6.8 ms of CPU per 4-image Feature call against
    0.6 ms."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def lower_thread_priority(niceness: int = DEFAULT_NICENESS, torch_threads: int | None = None) -> None:
    """Raise the calling thread's niceness (the threads it starts inherit it); see set_torch_threads."""
    set_torch_threads(torch_threads)
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (OSError, AttributeError) as error:  # not Linux, or a sandbox that forbids it
        log.debug("compute threads keep normal priority: %s", error)


class BackgroundCompute:
    """A thread pool of lowered priority: ``await run(...)`` from the serving loop, ``submit`` from anywhere."""

    def __init__(self, threads: int, niceness: int = DEFAULT_NICENESS, torch_threads: int | None = None,
                 name: str = "reaas-compute") -> None:
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name,
                                            initializer=lower_thread_priority, initargs=(niceness, torch_threads))

    async def run(self, work: Callable[..., T], /, *args, **kwargs) -> T:
        """`work(*args, **kwargs)` on a pool thread; the awaiting coroutine is suspended meanwhile. Cancelling it
        (the client went away) drops work not yet started; started work notices through its own still_wanted."""
        return await asyncio.wrap_future(self._executor.submit(functools.partial(work, *args, **kwargs)))

    def submit(self, work: Callable[..., T], /, *args, **kwargs) -> Future[T]:
        """Start `work` and return at once (a stream computes one message while it receives the next)."""
        return self._executor.submit(work, *args, **kwargs)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
