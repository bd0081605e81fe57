"""Where the encoder's heavy work runs: threads the OS schedules *below* the gRPC handler threads.

On a saturated host, health checks and refusals must not queue for CPU behind forward passes and bound
searches (a load balancer that waits 100 ms for a health answer marks the replica dead). Handler threads
hand each forward pass or F2I search to this pool, whose threads (and the OpenMP workers torch creates from
them, which inherit their priority) run at a higher niceness, then wait for the result without holding the
GIL. Raising niceness needs no privilege; where the OS refuses, the work simply runs at normal priority.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_NICENESS = 10  # CFS gives a nice-0 thread ~9x the CPU share of a nice-10 one


def lower_thread_priority(niceness: int = DEFAULT_NICENESS) -> None:
    """Raise the calling thread's niceness (the threads it starts inherit it)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (OSError, AttributeError) as error:  # not Linux, or a sandbox that forbids it
        log.debug("compute threads keep normal priority: %s", error)


class BackgroundCompute:
    """A thread pool of lowered priority; ``run`` blocks the calling handler until the work is done."""

    def __init__(self, threads: int, niceness: int = DEFAULT_NICENESS) -> None:
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="reaas-compute",
                                            initializer=lower_thread_priority, initargs=(niceness,))

    def run(self, work: Callable[..., T], /, *args, **kwargs) -> T:
        return self._executor.submit(work, *args, **kwargs).result()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
