"""Many concurrent clients against one server (issues 13 and 22): answers and refusals counted apart.

Clients are threads spread over spawned processes (one GIL each, so the clients are not the bottleneck), each on
its own connection, calling one method for a fixed time once all are connected. Two paths: raw stubs, which see
every RESOURCE_EXHAUSTED refusal, and ``EncoderClient``, which retries a refusal that carries a retry hint until
its deadline, as a real client does (its refusals show as slower answers, not as errors). This module imports no
torch, so the spawned processes start fast.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections import Counter
from dataclasses import dataclass

import grpc

from reaas.v1 import encoder_service_pb2 as pb
from reaas_client import EncoderClient, ServiceError, decode_tensor

_METHOD = "/reaas.v1.EncoderService/"


@dataclass(frozen=True)
class SwarmOutcome:
    """What a swarm's calls got: answered calls, RESOURCE_EXHAUSTED refusals, other errors (by status name)."""

    answered: int
    refused: int
    other_errors: dict[str, int]
    elapsed_s: float  # from the start signal until the last call returned

    @property
    def answered_per_second(self) -> float:
        return self.answered / self.elapsed_s

    @property
    def refused_per_second(self) -> float:
        return self.refused / self.elapsed_s


def _status_of(error: Exception) -> str:
    code = error.code() if isinstance(error, grpc.RpcError) else error.code
    return code.name


def _client_process(address: str, method: str, request: bytes, threads: int, seconds: float, typed: bool,
                    ready, go, results, timeout_s: float) -> None:
    """`threads` clients, each on its own connection, calling `method` for `seconds` once `go` is set; reports
    (answered, status counts of the failed calls, seconds from `go` until the last call returned)."""
    answered = [0] * threads
    statuses: Counter[str] = Counter()
    lock = threading.Lock()
    started: list[float] = []

    def client(index: int, connected: threading.Barrier) -> None:
        if typed:
            images = decode_tensor(pb.FeatureRequest.FromString(request).images)
            owner = EncoderClient(address, timeout_s=timeout_s)
            channel = None

            def call() -> None:
                owner.features(images)
        else:
            owner = channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
            stub = channel.unary_unary(_METHOD + method)

            def call() -> None:
                stub(request, timeout=timeout_s)
        with owner:
            try:
                call()  # connected and warm before the clock starts
            except (grpc.RpcError, ServiceError) as error:
                if _status_of(error) != grpc.StatusCode.RESOURCE_EXHAUSTED.name:
                    raise
            connected.wait()
            go.wait()
            if not started:
                started.append(time.monotonic())
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                try:
                    call()
                    answered[index] += 1
                except (grpc.RpcError, ServiceError) as error:
                    with lock:
                        statuses[_status_of(error)] += 1

    connected = threading.Barrier(threads + 1)
    workers = [threading.Thread(target=client, args=(i, connected)) for i in range(threads)]
    for worker in workers:
        worker.start()
    connected.wait()
    ready.put(1)
    for worker in workers:
        worker.join()
    results.put((sum(answered), dict(statuses), time.monotonic() - started[0]))


def swarm(address: str, method: str, request: bytes, clients: int, seconds: float, *, processes: int = 4,
          typed: bool = False, timeout_s: float = 60.0) -> SwarmOutcome:
    """`clients` concurrent callers of `method` (serialized `request`) for `seconds`, spread over `processes`
    processes. Calls started in the window count, over the time until the last one returned (a call of many
    seconds, as an F2I search is, must not count as if it fitted in the window). ``typed``: call through
    EncoderClient.features (Feature only) instead of a raw stub."""
    if typed and method != "Feature":
        raise ValueError(f"the typed path calls Feature only, not {method}")
    if clients % processes:
        raise ValueError(f"{clients} clients do not split evenly over {processes} processes")
    spawn = multiprocessing.get_context("spawn")
    ready, go, results = spawn.Queue(), spawn.Event(), spawn.Queue()
    workers = [spawn.Process(target=_client_process, args=(address, method, request, clients // processes,
                                                           seconds, typed, ready, go, results, timeout_s))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    try:
        for _ in workers:
            ready.get(timeout=300)
        go.set()
        outcomes = [results.get(timeout=seconds + 2 * timeout_s + 300) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
    statuses: Counter[str] = Counter()
    for _, counts, _ in outcomes:
        statuses.update(counts)
    refused = statuses.pop(grpc.StatusCode.RESOURCE_EXHAUSTED.name, 0)
    return SwarmOutcome(answered=sum(n for n, _, _ in outcomes), refused=refused, other_errors=dict(statuses),
                        elapsed_s=max(elapsed for _, _, elapsed in outcomes))
