"""A replica SIGKILLed mid-job costs no result: two real server processes, a round_robin client over both.

The kill lands mid-call by construction, never after a fixed sleep: for unary calls the victim is frozen
(SIGSTOP) first, so round_robin's next call to it stays in flight until its bytes are observed unread in the
victim's socket, and only then is it killed; for streams the batch generator kills the replica that answered the
first batch before it hands over the second. Every job must equal the undisturbed in-process computation bit for
bit, record each input once in the ledger, and be billed once, by the replica that answered it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from reaas_client import EncoderClient, ServiceError, StreamedImageSamples
from reaas_server import ServedEncoder
from reaas_server.ledger import UsageLedger

pytestmark = pytest.mark.skipif(
    not Path("/proc/net/tcp6").exists(), reason="observes unread socket bytes in /proc/net (Linux)"
)

IN_FLIGHT_BYTES = 32 * 1024  # unread in the frozen victim's sockets: a request is in flight to it


@dataclass
class Replica:
    process: subprocess.Popen
    address: str

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def served(self, api_key: str, rpc: str) -> int:
        """Queries this replica answered for ``api_key`` on ``rpc`` (its own usage book)."""
        with EncoderClient(self.address, api_key=api_key, timeout_s=10) as client:
            usage = client.usage().rpcs.get(rpc)
        return usage.queries if usage else 0


class ReplicaPool:
    """Server processes kept across the module's tests: each test asks for two live ones, kills one."""

    # per-key usage needs issued keys (open access bills everyone as "anonymous"): every replica starts from a
    # copy of one ledger that issued a key per test, so a key works on both and each replica bills its own answers
    KEY_NAMES = ("unary-256", "unary-8192", "stream", "seaas")

    def __init__(self, directory: Path) -> None:
        self.replicas: list[Replica] = []
        self.directory = directory
        template = UsageLedger(directory / "template.sqlite3")
        self.secrets = {name: template.add_key(name) for name in self.KEY_NAMES}
        template.close()
        self.started = 0

    def _ledger_copy(self) -> Path:
        self.started += 1
        copy = self.directory / f"replica-{self.started}.sqlite3"
        shutil.copyfile(self.directory / "template.sqlite3", copy)
        return copy

    def pair(self) -> tuple[Replica, Replica]:
        self.replicas = [r for r in self.replicas if r.process.poll() is None]
        # the same thread count as the in-process reference, so the same float kernels run
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
        command = [sys.executable, "-m", "reaas_server.cli", "--port", "0", "--log-level", "WARNING",
                   "--bound-cost-budget", "0"]
        starting = [subprocess.Popen([*command, "--ledger", str(self._ledger_copy())], stdout=subprocess.PIPE,
                                     text=True, env=env)
                    for _ in range(2 - len(self.replicas))]
        for process in starting:
            line = process.stdout.readline()
            assert "listening on" in line, f"reaas-server did not start: {line!r}"
            self.replicas.append(Replica(process, line.split("listening on ")[1].split()[0]))
        return self.replicas[0], self.replicas[1]

    def close(self) -> None:
        for replica in self.replicas:
            if replica.process.poll() is None:
                replica.kill()


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Iterator[ReplicaPool]:
    replicas = ReplicaPool(tmp_path_factory.mktemp("replica-ledgers"))
    try:
        yield replicas
    finally:
        replicas.close()


@pytest.fixture(scope="module")
def encoder() -> ServedEncoder:
    return ServedEncoder.load(None, "cpu")


def reference_features(encoder: ServedEncoder, calls: list[np.ndarray]) -> np.ndarray:
    """The undisturbed computation, batch by batch as the client sends them (a batch's size may change roundings)."""
    return np.concatenate([encoder.features(torch.from_numpy(batch)).numpy() for batch in calls])


def connect_both(client: EncoderClient, replicas: tuple[Replica, Replica], api_key: str) -> None:
    """1-image calls until each replica answered one: both connections are up, so round_robin alternates."""
    probe = np.zeros((1, *client.info().input_shape), np.float32)
    for _ in range(100):
        if all(replica.served(api_key, "Feature") for replica in replicas):
            return
        client.features(probe)
    pytest.fail("round_robin sent no call to one of the two replicas in 100 calls")


def unread_bytes(port: int) -> int:
    """Bytes received and not yet read by the process listening on ``port`` (all its connections)."""
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            established = fields[3] == "01"
            if established and int(fields[1].rsplit(":", 1)[1], 16) == port:
                total += int(fields[4].split(":")[1], 16)
    return total


class KillWhenCallInFlight(threading.Thread):
    """SIGKILL a frozen replica as soon as a request sits unread in its sockets: a call is in flight to it."""

    def __init__(self, victim: Replica) -> None:
        super().__init__(daemon=True)
        self.victim = victim
        self.killed_mid_call = False
        self.job_done = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 60
        while not self.job_done.is_set() and time.monotonic() < deadline:
            if unread_bytes(self.victim.port) >= IN_FLIGHT_BYTES:
                self.victim.kill()
                self.killed_mid_call = True
                return
            self.job_done.wait(0.005)  # polling an observable state


@pytest.mark.parametrize("per_call", [256, 8192], ids=["256-image-calls", "two-4096-image-chunks"])
def test_features_survive_a_replica_killed_mid_call(pool, encoder, per_call):
    victim, survivor = pool.pair()
    api_key = pool.secrets[f"unary-{per_call}"]
    images = np.random.default_rng(per_call).random((8192 if per_call > 4096 else 1024, 1, 28, 28),
                                                   dtype=np.float32)
    ids = [f"x{i}" for i in range(len(images))]
    calls = [images[start:start + per_call] for start in range(0, len(images), per_call)]
    with EncoderClient([victim.address, survivor.address], api_key=api_key) as client:
        connect_both(client, (victim, survivor), api_key)
        billed_before = survivor.served(api_key, "Feature")
        victim.process.send_signal(signal.SIGSTOP)
        killer = KillWhenCallInFlight(victim)
        killer.start()
        try:
            features = np.concatenate([
                client.features(batch, input_ids=ids[start:start + per_call])
                for start, batch in zip(range(0, len(images), per_call), calls, strict=True)
            ])
        finally:
            killer.job_done.set()
            killer.join()
        assert killer.killed_mid_call, "no call was ever in flight to the frozen replica"
        sent = [chunk for batch in calls for chunk in np.split(batch, range(4096, len(batch), 4096))]
        assert np.array_equal(features, reference_features(encoder, sent))
        assert {client.ledger.queries(i) for i in ids} == {1}  # recorded once, retried or not
        assert survivor.served(api_key, "Feature") - billed_before == len(images)  # billed once, by its answerer


def kill_serving_replica_before_second_batch(
    batches: Iterator[tuple[np.ndarray | torch.Tensor, list[str]]],
    replicas: tuple[Replica, Replica], api_key: str, first_reply: threading.Event, killed: list[Replica],
) -> Iterator[tuple[np.ndarray | torch.Tensor, list[str]]]:
    """Pass ``batches`` through; before the second, once the first is answered, SIGKILL the replica serving them."""
    for index, item in enumerate(batches):
        if index == 1:
            assert first_reply.wait(60), "the first batch was never answered"
            serving = [r for r in replicas if r.served(api_key, "StreamFeatures")]
            assert len(serving) == 1, "the stream's first batch was answered by both replicas or neither"
            serving[0].kill()
            killed.append(serving[0])
        yield item


def test_stream_resumes_from_the_first_unanswered_batch(pool, encoder):
    replicas = pool.pair()
    api_key = pool.secrets["stream"]
    rng = np.random.default_rng(1)
    batches = [rng.random((64, 1, 28, 28), dtype=np.float32) for _ in range(12)]
    ids = [[f"s{k}-{i}" for i in range(64)] for k in range(12)]
    first_reply, killed = threading.Event(), []
    with EncoderClient([r.address for r in replicas], api_key=api_key) as client:
        lazy = ((batch, batch_ids) for batch, batch_ids in zip(batches, ids, strict=True))
        streamed = []
        for features in client.stream_features(
            kill_serving_replica_before_second_batch(lazy, replicas, api_key, first_reply, killed)
        ):
            streamed.append(features)
            first_reply.set()
        assert len(killed) == 1
        survivor = next(r for r in replicas if r is not killed[0])
        assert np.array_equal(np.concatenate(streamed), reference_features(encoder, batches))
        assert {client.ledger.queries(i) for batch_ids in ids for i in batch_ids} == {1}
        # the new call started at the first unanswered batch: the survivor answered all but the first, once
        assert survivor.served(api_key, "StreamFeatures") == 64 * 11


class _KillOnSecondBatch(EncoderClient):
    """A client whose streams lose their replica after the first reply (the SEaaS sample source streams)."""

    def __init__(self, replicas: tuple[Replica, Replica], api_key: str) -> None:
        super().__init__([r.address for r in replicas], api_key=api_key)
        self.replicas, self.api_key, self.killed = replicas, api_key, []

    def stream_features(self, batches, **kwargs):
        first_reply = threading.Event()
        hooked = kill_serving_replica_before_second_batch(iter(batches), self.replicas, self.api_key,
                                                          first_reply, self.killed)
        for features in super().stream_features(hooked, **kwargs):
            first_reply.set()  # before handing it on: the consumer may not ask for more until it has all
            yield features


class _InProcess:
    """The undisturbed reference for a sample source: the same batches through the in-process encoder."""

    def __init__(self, encoder: ServedEncoder) -> None:
        self.encoder = encoder

    def stream_features(self, batches, feature_dtype="float32"):
        assert feature_dtype == "float32"  # the default stream, which this test resumes
        for images, _ in batches:
            yield self.encoder.features(torch.as_tensor(images)).numpy()


def test_seaas_noise_stream_survives_a_replica_loss(pool, encoder):
    """SEaaS-SC's noisy copies (seeded, generated lazily) give the same samples after a mid-stream resume."""
    image = torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(2))

    def samples(client) -> np.ndarray:
        source = StreamedImageSamples(client, image, "test-input", sigma=0.25, batch_size=100)
        return torch.cat(list(source(1000, torch.Generator().manual_seed(3)))).numpy()

    with _KillOnSecondBatch(pool.pair(), api_key=pool.secrets["seaas"]) as client:
        disturbed = samples(client)
        assert len(client.killed) == 1
        assert client.ledger.queries("test-input") == 1000
    assert np.array_equal(disturbed, samples(_InProcess(encoder)))


def test_with_every_replica_gone_calls_fail_after_bounded_tries():
    ports = []
    for _ in range(2):
        with socket.socket() as probe:  # a port nobody listens on once closed
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    with EncoderClient([f"127.0.0.1:{p}" for p in ports], max_attempts=3, timeout_s=30) as client:
        started = time.monotonic()
        with pytest.raises(ServiceError) as unary:
            client.features(np.zeros((1, 1, 28, 28), np.float32))
        with pytest.raises(ServiceError) as stream:
            list(client.stream_features(iter([(np.zeros((1, 1, 28, 28), np.float32), None)])))
        for raised in (unary, stream):
            assert raised.value.code == grpc.StatusCode.UNAVAILABLE
            assert "no replica answered: 3 tries" in raised.value.details
        assert time.monotonic() - started < 20, "gave up only at the deadline, not after its tries"
