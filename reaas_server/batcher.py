"""Coalescing batchers: concurrent calls' work merged into shared passes (forward passes, F2I bound searches).

Many clients each sending a few images is how an encoder service is used; one pass per call leaves the encoder
(and a GPU most of all) running tiny batches. Requests queue here, and one worker thread runs a single pass over
as many queued requests as fit in ``max_images`` — opportunistically: with ``max_delay_s = 0`` it never waits for
company, so an idle server answers a lone request as fast as before and batches form only while the previous pass
runs (Triton's dynamic batcher with a zero queue delay). Results are split back in request order. Callers on the
serving loop (``submit_async``) await their part: the worker settles every awaiting caller of a pass with one
wake-up of the loop, so a pass of 15 small calls costs two thread hand-offs, not 30. A synchronous caller
(``submit``) that finds the batcher idle runs its pass in its own thread, without a hand-off. Only requests of the same *key* share
a pass (F2I's key is the bound: a CROWN search and an IBP search are different computations). Per-call semantics
stay exact: a caller who gives up is dropped before the pass (or stops it when every caller in it gave up), and
accounting happens per call outside.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from reaas_client.wire import as_numpy
from reaas_server.compute import lower_thread_priority
from reaas_server.encoder_host import ImageRadii

R = TypeVar("R")
StillWanted = Callable[[], bool]
# one pass: (key, the merged inputs, "does anyone still want it") -> the merged result, None when all gave up
RunPass = Callable[[Hashable, tuple[torch.Tensor, ...], StillWanted], Any]
Split = Callable[[Any, list[int]], Sequence[Any]]  # a merged result -> one part per request, in order
Forward = Callable[[torch.Tensor, StillWanted], torch.Tensor | None]
ImageRadiiPass = Callable[[torch.Tensor, torch.Tensor, str, StillWanted], ImageRadii | None]


def _held_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


Prepare = Callable[[], tuple[torch.Tensor, ...]]  # a request's inputs, decoded (may raise: that caller's error)
Finish = Callable[[Any], Any]  # a request's part of the result -> what the caller gets (its reply)


@dataclass
class _Job(Generic[R]):
    key: Hashable
    inputs: tuple[torch.Tensor, ...] | None  # each [batch, ...]; inputs[0] holds the images (None: not prepared)
    still_wanted: StillWanted
    size: int  # images
    prepare: Prepare | None = None
    finish: Finish | None = None
    # released by the worker when the result (or error) is in: a bare lock is the cheapest one-shot signal (an
    # Event is a Condition over a lock, three allocations and a notify per job); None for a job awaited on a loop
    done: threading.Lock | None = field(default_factory=_held_lock)
    settled: asyncio.Future | None = None  # instead of `done`: resolved on its loop when the result is in
    result: R | None = None
    error: BaseException | None = None
    abandoned: bool = False

    def prepared(self) -> bool:
        """Decode the inputs if the caller left that to the worker; False (and ``error`` set) if they are bad."""
        if self.inputs is None:
            try:
                self.inputs = self.prepare()
            except Exception as error:  # noqa: BLE001 - the caller's own error (an invalid request), handed back
                self.error = error
                return False
        return True


class CoalescingBatcher(Generic[R]):
    """One worker thread; ``submit`` may be called from any number of threads."""

    def __init__(self, run_pass: RunPass, split: Split, *, max_images: int, max_delay_s: float = 0.0,
                 device: torch.device | None = None, name: str = "reaas-batcher",
                 lone_pass_in_caller: bool = True, torch_threads: int | None = None,
                 pass_scope: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        """``device``: where a shared pass gathers its requests' images (the serving device: a text encoder's
        token requests arrive embedded there, its image requests on the CPU); None: where they are. The other
        inputs (F2I's feature radii) stay where they are. ``lone_pass_in_caller``: a request that finds the
        batcher idle runs its pass in the calling thread; False in the server, whose callers are on the serving
        loop: every pass runs on the lowered worker (compute.py). ``torch_threads``:
        the worker's intra-op threads (compute.set_torch_threads). ``pass_scope``: entered around the replies of each
        pass (the server's: ``SqlLedger.deferred_commits``, so the pass's ledger rows commit together)."""
        if max_images < 1 or max_delay_s < 0:
            raise ValueError("max_images must be >= 1 and max_delay_s >= 0")
        self._run_pass = run_pass
        self._split = split
        self._device = device
        self._lone_pass_in_caller = lone_pass_in_caller
        self._torch_threads = torch_threads
        self._pass_scope = pass_scope
        self.max_images = max_images
        self.max_delay_s = max_delay_s
        self._queue: collections.deque[_Job[R]] = collections.deque()
        self._wakeup = threading.Condition()
        self._closed = False
        self._pass = threading.Lock()  # held while a pass runs, by the worker or a lone caller
        self.passes = 0  # passes run (tests and benchmarks read how much coalescing happened)
        self._worker = threading.Thread(target=self._run, name=name, daemon=True)
        self._worker.start()

    def submit(self, key: Hashable, inputs: tuple[torch.Tensor, ...] | Prepare, still_wanted: StillWanted = lambda: True,
               *, size: int | None = None, finish: Finish | None = None) -> R | None:
        """The pass's result for `inputs`, computed in a pass shared with other callers of the same `key`; None if
        the caller gave up (``still_wanted()`` false) before its result was ready.

        `inputs` may be a callable that decodes them, with their number of images as `size`, and `finish` may turn
        the caller's part of the result into its reply: both then run on the worker, beside the pass. Handler
        threads then only wait: tensor work in many of them at once made each torch call a GIL hand-over among
        dozens of threads (a handler's CPU per call tripled under 64 clients).
        """
        job = self._job(key, inputs, still_wanted, size, finish)
        with self._wakeup:
            if self._closed:
                raise RuntimeError("the batcher is closed (the server is stopping)")
            # nothing queued and no pass running: run this pass right here, sparing a lone request the two
            # thread hand-offs of the queue (the idle server answers as fast as without a batcher)
            alone = self._lone_pass_in_caller and not self._queue and self._pass.acquire(blocking=False)
            if not alone:
                self._queue.append(job)
                self._wakeup.notify()
        if alone:
            try:
                if not job.prepared():
                    raise job.error
                self.passes += 1
                out = self._run_pass(key, job.inputs, still_wanted)
                if out is None:
                    return None
                (part,) = self._split(out, [job.size])
                return part if finish is None else finish(part)
            finally:
                self._pass.release()
        while not job.done.acquire(timeout=0.05):
            if not still_wanted():
                job.abandoned = True
                return None
        if job.error is not None:
            raise job.error
        return job.result

    async def submit_async(self, key: Hashable, inputs: tuple[torch.Tensor, ...] | Prepare,
                           still_wanted: StillWanted = lambda: True, *, size: int | None = None,
                           finish: Finish | None = None) -> R | None:
        """``submit`` for a coroutine on an event loop: the pass (and `inputs` and `finish` when they are callables)
        runs on the worker while the caller is suspended. Cancelling the caller (its client went away) drops its
        request from a pass not yet run; a pass already running finishes for the others."""
        job = self._job(key, inputs, still_wanted, size, finish)
        job.done = None
        job.settled = asyncio.get_running_loop().create_future()
        self._enqueue(job)
        try:
            await job.settled
        except asyncio.CancelledError:
            job.abandoned = True
            raise
        if job.error is not None:
            raise job.error
        return job.result

    @staticmethod
    def _job(key: Hashable, inputs: tuple[torch.Tensor, ...] | Prepare, still_wanted: StillWanted,
             size: int | None, finish: Finish | None) -> _Job[R]:
        if callable(inputs):
            return _Job(key, None, still_wanted, size, prepare=inputs, finish=finish)
        return _Job(key, inputs, still_wanted, inputs[0].shape[0], finish=finish)

    def _enqueue(self, job: _Job[R]) -> None:
        with self._wakeup:
            if self._closed:
                raise RuntimeError("the batcher is closed (the server is stopping)")
            self._queue.append(job)
            self._wakeup.notify()

    def close(self) -> None:
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        self._worker.join(timeout=10)

    def _merged(self, jobs: list[_Job[R]]) -> tuple[torch.Tensor, ...]:
        if len(jobs) == 1:
            return jobs[0].inputs
        images = torch.cat([job.inputs[0] if self._device is None else
                            job.inputs[0].to(self._device, non_blocking=True) for job in jobs])
        rest = (torch.cat([job.inputs[i] for job in jobs]) for i in range(1, len(jobs[0].inputs)))
        return (images, *rest)

    def _take_fitting(self, key: Hashable, total: int) -> _Job[R] | None:
        """The oldest queued job of `key`, removed from the queue, if it fits beside `total` images."""
        for index, job in enumerate(self._queue):
            if job.key == key:
                if total + job.size > self.max_images:
                    return None  # no overtaking within a key: requests of one key keep their order
                del self._queue[index]
                return job
        return None

    def _next_batch(self) -> list[_Job[R]] | None:
        """The oldest job, then more of its key in arrival order while they fit in max_images (waiting up to
        max_delay_s for them); a job larger than max_images runs alone. Returns with the pass lock held (None:
        closed)."""
        with self._wakeup:
            while not self._queue and not self._closed:
                self._wakeup.wait()
            if self._closed and not self._queue:
                return None
        self._pass.acquire()  # a lone caller's pass may still run: queued jobs wait for it, then go together
        with self._wakeup:
            jobs = [self._queue.popleft()]
            total = jobs[0].size
            deadline = time.monotonic() + self.max_delay_s
            while total < self.max_images:
                if (job := self._take_fitting(jobs[0].key, total)) is not None:
                    jobs.append(job)
                    total += job.size
                elif (left := deadline - time.monotonic()) > 0:
                    self._wakeup.wait(left)
                else:
                    break
            return jobs

    def _run(self) -> None:
        # the pass is compute, below the serving loop's thread (compute.py says why)
        lower_thread_priority(torch_threads=self._torch_threads)
        while (jobs := self._next_batch()) is not None:
            wanted = [job for job in jobs if not job.abandoned and job.still_wanted() and job.prepared()]
            try:
                if wanted:
                    self.passes += 1
                    out = self._run_pass(wanted[0].key, self._merged(wanted),
                                         lambda wanted=wanted: any(j.still_wanted() for j in wanted))
                    if out is not None:
                        self._finish(wanted, self._split(out, [job.size for job in wanted]))
            except BaseException as error:  # noqa: BLE001 - handed to every caller of the pass
                for job in wanted:
                    job.error = error
            finally:
                self._pass.release()
                _settle(jobs)


    def _finish(self, jobs: list[_Job[R]], parts: Sequence[Any]) -> None:
        """Each caller's part (or its reply, when it gave a ``finish``), all inside one ``pass_scope``: a reply that
        fails is its own caller's error; a scope that fails on leaving (the pass's one ledger commit) is everyone's."""
        with self._pass_scope():
            for job, part in zip(jobs, parts, strict=True):
                try:
                    job.result = part if job.finish is None else job.finish(part)
                except Exception as error:  # noqa: BLE001 - that caller's own (its charge was refused, say)
                    job.error = error


def _settle(jobs: list[_Job]) -> None:
    """Tell every caller of a pass that its result (or error) is in: a thread's lock released, and each loop's
    awaiting callers resolved in one callback on that loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = {}
    for job in jobs:
        if job.settled is None:
            job.done.release()
        else:
            by_loop.setdefault(job.settled.get_loop(), []).append(job.settled)
    for loop, futures in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a loop closed under its callers (the process exits): nobody waits
            loop.call_soon_threadsafe(_resolve, futures)


def _resolve(futures: list[asyncio.Future]) -> None:
    for future in futures:
        if not future.done():  # a cancelled caller's future is done already
            future.set_result(None)


def feature_rows(features: torch.Tensor, sizes: list[int]) -> list[np.ndarray]:
    """A pass's features as numpy row blocks, one per request: one conversion for the whole pass, then slicing.

    Why not torch.split and a conversion per request: every torch call lets go of the GIL and takes it back, and
    beside 64 busy handler threads (the thread-pool server's) each take-back waited; the worker's pass took 4-5x its CPU time in wall time."""
    rows = as_numpy(features)
    starts = itertools.accumulate(sizes[:-1], initial=0)
    return [rows[start:start + size] for start, size in zip(starts, sizes, strict=True)]


class ForwardBatcher(CoalescingBatcher[np.ndarray]):
    """Feature and StreamFeatures: concurrent requests' images share forward passes."""

    def __init__(self, forward: Forward, *, max_images: int, max_delay_s: float = 0.0,
                 device: torch.device | None = None, lone_pass_in_caller: bool = True,
                 torch_threads: int | None = None,
                 pass_scope: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        super().__init__(lambda _key, inputs, wanted: forward(inputs[0], wanted), feature_rows,
                         max_images=max_images, max_delay_s=max_delay_s, device=device, name="reaas-batcher",
                         lone_pass_in_caller=lone_pass_in_caller, torch_threads=torch_threads, pass_scope=pass_scope)

    def features(self, images: torch.Tensor, still_wanted: StillWanted = lambda: True) -> torch.Tensor | None:
        """f(images) [batch, feature_dim] on the CPU; None if the caller gave up before its result was ready."""
        rows = self.submit(None, (images,), still_wanted)
        return None if rows is None else torch.from_numpy(rows)

    async def answer(self, decode: Prepare, size: int, reply: Finish, still_wanted: StillWanted = lambda: True
                     ) -> Any:
        """``reply(rows)`` for the features (numpy rows, feature_rows) of the `size` images ``decode()`` gives, both
        run on the worker (see ``submit``); None if the caller gave up first. What ``decode`` or ``reply`` raises
        (an invalid request, a ledger error) is raised here."""
        return await self.submit_async(None, decode, still_wanted, size=size, finish=reply)


class RadiusBatcher(CoalescingBatcher[ImageRadii]):
    """F2IPerturb: concurrent requests for the same bound share one batched binary search. The search treats every
    image on its own (each has its own bracket and bound evaluations), so a merged pass gives each caller the
    radii its own pass would, sooner when many small calls arrive together."""

    def __init__(self, image_radii: ImageRadiiPass, *, max_images: int, max_delay_s: float = 0.0,
                 device: torch.device | None = None, torch_threads: int | None = None) -> None:
        super().__init__(lambda bound, inputs, wanted: image_radii(inputs[0], inputs[1], bound, wanted),
                         lambda radii, sizes: radii.split(sizes),
                         max_images=max_images, max_delay_s=max_delay_s, device=device, name="reaas-f2i-batcher",
                         torch_threads=torch_threads)

    def image_radii(self, images: torch.Tensor, feature_radii: torch.Tensor, bound: str,
                    still_wanted: StillWanted = lambda: True) -> ImageRadii | None:
        """Certified image radii for `images` under `bound`; None if the caller gave up before they were ready."""
        return self.submit(bound, (images, feature_radii), still_wanted)
