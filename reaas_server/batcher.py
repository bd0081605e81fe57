"""ForwardBatcher: forward passes of concurrent Feature and StreamFeatures requests, coalesced.

Many clients each sending a few images is how an encoder service is used; one forward pass per call leaves
the encoder (and a GPU most of all) running tiny batches. Requests queue here, and one worker thread runs a
single forward pass over as many queued requests as fit in ``max_images`` — opportunistically: with
``max_delay_s = 0`` it never waits for company, so an idle server answers a lone request as fast as before and
batches form only while the previous pass runs (Triton's dynamic batcher with a zero queue delay). Results are
split back in request order; a request that finds the batcher idle runs its pass in its own thread, without a
hand-off. Per-call semantics stay exact: a caller who gives up is dropped before the pass
(or stops it between chunks when every caller in it gave up), and accounting happens per call outside.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from reaas_server.compute import lower_thread_priority

Forward = Callable[[torch.Tensor, Callable[[], bool]], torch.Tensor | None]


@dataclass
class _Job:
    images: torch.Tensor  # [batch, C, H, W]
    still_wanted: Callable[[], bool]
    done: threading.Event = field(default_factory=threading.Event)
    result: torch.Tensor | None = None
    error: BaseException | None = None
    abandoned: bool = False


class ForwardBatcher:
    """One worker thread; ``features`` may be called from any number of threads."""

    def __init__(self, forward: Forward, *, max_images: int, max_delay_s: float = 0.0,
                 device: torch.device | None = None) -> None:
        """``device``: where a shared pass gathers its requests' images (the serving device: a text encoder's
        token requests arrive embedded there, its image requests on the CPU); None: where they are."""
        if max_images < 1 or max_delay_s < 0:
            raise ValueError("max_images must be >= 1 and max_delay_s >= 0")
        self._forward = forward
        self._device = device
        self.max_images = max_images
        self.max_delay_s = max_delay_s
        self._queue: collections.deque[_Job] = collections.deque()
        self._wakeup = threading.Condition()
        self._closed = False
        self._pass = threading.Lock()  # held while a forward pass runs, by the worker or a lone caller
        self.passes = 0  # forward passes run (tests and benchmarks read how much coalescing happened)
        self._worker = threading.Thread(target=self._run, name="reaas-batcher", daemon=True)
        self._worker.start()

    def features(self, images: torch.Tensor, still_wanted: Callable[[], bool] = lambda: True
                 ) -> torch.Tensor | None:
        """f(images) [batch, feature_dim], computed in a pass shared with other callers; None if the caller gave
        up (``still_wanted()`` false) before its result was ready."""
        job = _Job(images, still_wanted)
        with self._wakeup:
            if self._closed:
                raise RuntimeError("the batcher is closed (the server is stopping)")
            # nothing queued and no pass running: run this pass right here, sparing a lone request the two
            # thread hand-offs of the queue (the idle server answers as fast as without a batcher)
            alone = not self._queue and self._pass.acquire(blocking=False)
            if not alone:
                self._queue.append(job)
                self._wakeup.notify()
        if alone:
            try:
                self.passes += 1
                return self._forward(images, still_wanted)
            finally:
                self._pass.release()
        while not job.done.wait(0.05):
            if not still_wanted():
                job.abandoned = True
                return None
        if job.error is not None:
            raise job.error
        return job.result

    def _gathered(self, images: torch.Tensor) -> torch.Tensor:
        return images if self._device is None else images.to(self._device, non_blocking=True)

    def close(self) -> None:
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        self._worker.join(timeout=10)

    def _next_batch(self) -> list[_Job] | None:
        """The oldest job, then more in arrival order while they fit in max_images (waiting up to max_delay_s
        for them); a job larger than max_images runs alone. Returns with the pass lock held (None: closed)."""
        with self._wakeup:
            while not self._queue and not self._closed:
                self._wakeup.wait()
            if self._closed and not self._queue:
                return None
        self._pass.acquire()  # a lone caller's pass may still run: queued jobs wait for it, then go together
        with self._wakeup:
            jobs = [self._queue.popleft()]
            total = jobs[0].images.shape[0]
            deadline = time.monotonic() + self.max_delay_s
            while total < self.max_images:
                if self._queue:
                    if total + self._queue[0].images.shape[0] > self.max_images:
                        break
                    jobs.append(self._queue.popleft())
                    total += jobs[-1].images.shape[0]
                elif (left := deadline - time.monotonic()) > 0:
                    self._wakeup.wait(left)
                else:
                    break
            return jobs

    def _run(self) -> None:
        lower_thread_priority()  # the pass is compute, below the handler threads (compute.py says why)
        while (jobs := self._next_batch()) is not None:
            wanted = [job for job in jobs if not job.abandoned and job.still_wanted()]
            try:
                if wanted:
                    self.passes += 1
                    merged = (torch.cat([self._gathered(job.images) for job in wanted]) if len(wanted) > 1
                              else wanted[0].images)
                    out = self._forward(merged, lambda wanted=wanted: any(j.still_wanted() for j in wanted))
                    if out is not None:
                        for job, part in zip(wanted, torch.split(out, [j.images.shape[0] for j in wanted]),
                                             strict=True):
                            job.result = part
            except BaseException as error:  # noqa: BLE001 - handed to every caller of the pass
                for job in wanted:
                    job.error = error
            finally:
                self._pass.release()
                for job in jobs:
                    job.done.set()
