"""Metrics and the access log: exact counts scraped over HTTP, refusals seen, streams per message, no key logged."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from reaas.v1 import encoder_service_pb2 as pb
from reaas.v1 import encoder_service_pb2_grpc as pb_grpc
from reaas_client.wire import encode_tensor
from reaas_server import ServerConfig, metrics, start_server
from reaas_server.access_log import access_line, key_label
from reaas_server.cli import parse_args
from reaas_server.ledger import UsageLedger

KEY = "s3cret-api-key-0123456789"  # for key_label alone; servers get keys their ledger issued


@pytest.fixture()
def secret(tmp_path) -> str:
    """A key issued to the account "metrics" in the ledger the server uses (so calls need a key)."""
    ledger = UsageLedger(tmp_path / "ledger.sqlite3")
    issued = ledger.add_key("metrics")
    ledger.close()
    return issued


@pytest.fixture()
def auth(secret) -> tuple:
    return (("x-api-key", secret),)


@pytest.fixture()
def running(demo_encoder, secret, tmp_path):
    config = ServerConfig(port=0, metrics_port=0, ledger_path=tmp_path / "ledger.sqlite3", max_batch_size=64,
                          bound_cost_budget_s=0.0)
    server = start_server(config, demo_encoder)
    try:
        yield server
    finally:
        server.stop(grace_s=0)


@pytest.fixture()
def channel(running):
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield channel


def scrape(running) -> dict[tuple[str, frozenset], float]:
    """Every sample on the HTTP endpoint, by (name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{running.metrics.http_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape_when(running, ready, timeout_s: float = 60.0) -> dict[tuple[str, frozenset], float]:
    """The first scrape for which ``ready(samples)`` holds: a stream is counted when gRPC terminates it, which can
    come just after its client has read the status."""
    deadline = time.monotonic() + timeout_s
    samples = scrape(running)
    while not ready(samples) and time.monotonic() < deadline:
        time.sleep(0.02)
        samples = scrape(running)
    return samples


def sample(samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def feature_request(make_images, count: int, scale: float = 1.0) -> pb.FeatureRequest:
    return pb.FeatureRequest(images=encode_tensor(make_images(count).numpy() * scale))


def test_every_call_counted_with_the_status_its_client_got(auth, running, channel, make_images):
    before = scrape(running)  # EncoderService series start at 0, so rate() works from the first scrape
    assert ("reaas_rpc_calls_total", frozenset({"rpc": "StreamF2IPerturb", "code": "OK"}.items())) in before
    assert ("reaas_rpc_queries_total", frozenset({"rpc": "Feature"}.items())) in before
    assert sample(before, "reaas_admission_refusals_total", pool="f2i") == 0
    assert ("reaas_admission_waiting", frozenset({"pool": "feature"}.items())) in before
    assert ("reaas_admission_in_use", frozenset({"pool": "f2i"}.items())) in before
    stub = pb_grpc.EncoderServiceStub(channel)
    answered = feature_request(make_images, 5)
    reply = stub.Feature(answered, metadata=auth)
    invalid = feature_request(make_images, 3, scale=10.0)  # pixels out of range
    with pytest.raises(grpc.RpcError) as refused:
        stub.Feature(invalid, metadata=auth)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    anonymous = feature_request(make_images, 2)
    with pytest.raises(grpc.RpcError) as unauthenticated:
        stub.Feature(anonymous)
    assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
    f2i = pb.F2IPerturbRequest(images=encode_tensor(make_images(4).numpy()),
                               feature_radii=[0.5] * 4, bound="best_ibp")
    f2i_reply = stub.F2IPerturb(f2i, metadata=auth)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING

    samples = scrape(running)
    calls = {(dict(labels)["rpc"], dict(labels)["code"]): value
             for (name, labels), value in samples.items() if name == "reaas_rpc_calls_total" and value}
    assert calls == {("Feature", "OK"): 1, ("Feature", "INVALID_ARGUMENT"): 1, ("Feature", "UNAUTHENTICATED"): 1,
                     ("F2IPerturb", "OK"): 1, ("grpc.health.v1.Health/Check", "OK"): 1}
    assert sample(samples, "reaas_rpc_queries_total", rpc="Feature") == 5  # answered images only
    assert sample(samples, "reaas_rpc_queries_total", rpc="F2IPerturb") == 4
    assert sample(samples, "reaas_rpc_request_bytes_total", rpc="Feature") == (
        answered.ByteSize() + invalid.ByteSize() + anonymous.ByteSize())  # every request received
    assert sample(samples, "reaas_rpc_response_bytes_total", rpc="Feature") == reply.ByteSize()
    assert sample(samples, "reaas_rpc_request_bytes_total", rpc="F2IPerturb") == f2i.ByteSize()
    assert sample(samples, "reaas_rpc_response_bytes_total", rpc="F2IPerturb") == f2i_reply.ByteSize()
    assert sample(samples, "reaas_rpc_latency_seconds_count", rpc="Feature") == 3
    assert sample(samples, "reaas_rpc_latency_seconds_bucket", rpc="Feature", le="+Inf") == 3
    assert sample(samples, "reaas_rpc_in_flight", rpc="Feature") == 0
    for bound in {r.bound for r in f2i_reply.radii}:  # one observation per image, by the bound that decided it
        steps = [r.search_steps for r in f2i_reply.radii if r.bound == bound]
        assert sample(samples, "reaas_f2i_search_steps_count", bound=bound) == len(steps)
        assert sample(samples, "reaas_f2i_search_steps_sum", bound=bound) == sum(steps)
    assert sum(v for (name, _), v in samples.items() if name == "reaas_f2i_search_steps_count") == 4


def test_streams_are_counted_per_message(auth, running, channel, make_images):
    stub = pb_grpc.EncoderServiceStub(channel)
    batches = [feature_request(make_images, count) for count in (3, 2, 4)]
    replies = list(stub.StreamFeatures(iter(batches), metadata=auth))
    samples = scrape_when(running, lambda s: sample(s, "reaas_rpc_in_flight", rpc="StreamFeatures") == 0)
    assert sample(samples, "reaas_rpc_calls_total", rpc="StreamFeatures", code="OK") == 1
    assert sample(samples, "reaas_rpc_msg_received_total", rpc="StreamFeatures") == 3
    assert sample(samples, "reaas_rpc_msg_sent_total", rpc="StreamFeatures") == 3
    assert sample(samples, "reaas_rpc_queries_total", rpc="StreamFeatures") == 9
    assert sample(samples, "reaas_rpc_request_bytes_total", rpc="StreamFeatures") == sum(b.ByteSize() for b in batches)
    assert sample(samples, "reaas_rpc_response_bytes_total", rpc="StreamFeatures") == sum(r.ByteSize() for r in replies)


def test_a_stream_its_client_cancels_ends_cancelled(demo_encoder, secret, tmp_path, make_images, monkeypatch):
    """Cancelled while its message is computed, a stream counts CANCELLED, as its client saw it, and its answer is
    not billed. (Cancelled while the servicer waits for its next message, grpc.aio may hand the servicer EOF first:
    see the metrics docstring; that case cannot be told from a half-close, so it is not what this test pins.) A
    message larger than one forward chunk is computed before the next is read, so no read is outstanding when the
    cancel arrives."""
    computing, release = threading.Event(), threading.Event()
    features = demo_encoder.features

    def held_features(*args, **kwargs):
        computing.set()
        assert release.wait(60), "the test never released the forward pass"
        return features(*args, **kwargs)

    monkeypatch.setattr(demo_encoder, "features", held_features)
    config = ServerConfig(port=0, metrics_port=0, ledger_path=tmp_path / "ledger.sqlite3", max_batch_size=64,
                          forward_chunk_size=8, bound_cost_budget_s=0.0)
    running = start_server(config, demo_encoder)
    more = threading.Event()
    try:
        def batches():
            yield feature_request(make_images, 16)  # two forward chunks: computed alone
            more.wait(60)  # the client holds the stream open, then cancels it

        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            call = pb_grpc.EncoderServiceStub(channel).StreamFeatures(batches(), metadata=(("x-api-key", secret),))
            assert computing.wait(60), "the message never reached the forward pass"
            call.cancel()
            samples = scrape_when(running, lambda s: sample(s, "reaas_rpc_in_flight", rpc="StreamFeatures") == 0)
    finally:
        release.set()
        more.set()
        running.stop(grace_s=0)
    assert sample(samples, "reaas_rpc_calls_total", rpc="StreamFeatures", code="CANCELLED") == 1, {
        k: v for k, v in samples.items() if k[0] == "reaas_rpc_calls_total" and v and ("rpc", "StreamFeatures") in k[1]}
    assert sample(samples, "reaas_rpc_in_flight", rpc="StreamFeatures") == 0
    # and nothing is billed: the held pass, released after the cancel, finds the call no longer wanted before its
    # first chunk (stop() has joined the compute threads, so the ledger is final)
    assert sample(samples, "reaas_rpc_queries_total", rpc="StreamFeatures") == 0
    ledger = UsageLedger(tmp_path / "ledger.sqlite3")
    try:
        assert [t for t in ledger.totals("metrics") if t.rpc == "StreamFeatures"] == []
    finally:
        ledger.close()


def test_admission_refusals_are_seen(auth, running, channel, make_images):
    running.admission.start_draining()
    with pytest.raises(grpc.RpcError) as refused:
        pb_grpc.EncoderServiceStub(channel).Feature(feature_request(make_images, 1), metadata=auth)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    samples = scrape(running)
    assert sample(samples, "reaas_rpc_calls_total", rpc="Feature", code="UNAVAILABLE") == 1
    assert sample(samples, "reaas_admission_refusals_total", pool="feature") == 1


def test_one_access_log_line_per_call_and_never_the_key(auth, running, channel, make_images, caplog):
    stub = pb_grpc.EncoderServiceStub(channel)
    wrong_key = "wrong-key-abcdefgh"
    with caplog.at_level(logging.INFO, logger="reaas.access"):
        stub.Feature(feature_request(make_images, 5), metadata=auth)
        with pytest.raises(grpc.RpcError):
            stub.Feature(feature_request(make_images, 1), metadata=(("x-api-key", wrong_key),))
        list(stub.StreamFeatures(iter([feature_request(make_images, 1)] * 2), metadata=auth))
        scrape_when(running, lambda s: sample(s, "reaas_rpc_in_flight", rpc="StreamFeatures") == 0)
    lines = [r.getMessage() for r in caplog.records if r.name == "reaas.access"]
    fields = [dict(pair.split("=", 1) for pair in line.split(" ")) for line in lines]
    assert [(f["rpc"], f["code"], f["images"], f["answered"]) for f in fields] == [
        ("Feature", "OK", "5", "5"), ("Feature", "UNAUTHENTICATED", "1", "0"), ("StreamFeatures", "OK", "2", "2")]
    # the account's name once the key is checked; a refused key only by a label that does not reveal it
    assert [f["key"] for f in fields] == ["metrics", key_label((("x-api-key", wrong_key),)), "metrics"]
    for f in fields:
        assert set(f) == {"rpc", "key", "code", "ms", "images", "answered", "request_bytes", "response_bytes",
                          "peer"}
        assert float(f["ms"]) >= 0 and int(f["request_bytes"]) > 0 and f["peer"].startswith("ipv4:127.0.0.1:")
    assert auth[0][1] not in caplog.text and wrong_key not in caplog.text


def test_key_label_names_callers_without_their_key():
    assert key_label(()) == "anonymous"
    assert key_label((("x-api-key", KEY),)) == "key:" + hashlib.sha256(KEY.encode()).hexdigest()[:8]


def test_access_line_values_cannot_break_the_line_or_forge_a_field():
    assert access_line(rpc="Feature", images=3) == "rpc=Feature images=3"
    assert access_line(key='eve\ncode=OK "x"', peer="") == 'key="eve\\ncode=OK \\"x\\"" peer=""'


def test_no_metrics_http_server_unless_asked(demo_encoder):
    assert parse_args([]).metrics_port is None
    assert parse_args(["--metrics-port", "0"]).metrics_port == 0
    server = start_server(ServerConfig(port=0, mode="seaas"), demo_encoder)
    try:
        assert server.metrics.http_port is None
    finally:
        server.stop(grace_s=0)


def test_a_scrape_reads_in_flight_before_what_calls_record():
    """A call records its counts, then leaves in_flight: read in that order's reverse, a scrape that sees a call
    gone has seen everything it recorded (the cancelled-stream test above waits on that)."""
    from reaas_server.metrics import ServerMetrics

    names = [family.name for family in ServerMetrics().registry.collect()]
    assert names[0] == "reaas_rpc_in_flight" and "reaas_rpc_calls" in names[1:]


def test_metrics_bound_beyond_loopback_warn_and_metrics_host_keeps_them_local(demo_encoder, caplog):
    from reaas_server import run_server

    with caplog.at_level(logging.WARNING, logger="reaas_server.app"):
        with run_server(ServerConfig(port=0, host="0.0.0.0", metrics_port=0), demo_encoder):
            pass
        assert any("metrics on 0.0.0.0 without TLS" in r.getMessage() for r in caplog.records)
        caplog.clear()
        with run_server(ServerConfig(port=0, host="0.0.0.0", metrics_port=0, metrics_host="127.0.0.1"),
                        demo_encoder):
            pass
        assert not any("metrics on" in r.getMessage() for r in caplog.records)


class _EndedContext:
    """What final_code reads of a call's context: how it was aborted, and the time its deadline had left."""

    def __init__(self, aborted, remaining_s) -> None:
        self.aborted, self._remaining = aborted, remaining_s

    def cancelled(self) -> bool:
        return False

    def time_remaining(self):
        return self._remaining


@pytest.mark.parametrize(("aborted", "remaining_s", "expected"), [
    # the servicer saw the deadline pass before the client's cancel arrived (make stress counted 1 of 4 CANCELLED)
    (grpc.StatusCode.CANCELLED, 0.0, grpc.StatusCode.DEADLINE_EXCEEDED),
    (grpc.StatusCode.CANCELLED, None, grpc.StatusCode.CANCELLED),  # no deadline: the client cancelled
    (grpc.StatusCode.CANCELLED, 30.0, grpc.StatusCode.CANCELLED),
    (grpc.StatusCode.INVALID_ARGUMENT, 0.0, grpc.StatusCode.INVALID_ARGUMENT),  # a refusal keeps its own code
    (None, 30.0, grpc.StatusCode.OK),
])
def test_a_call_the_server_gave_up_on_is_counted_as_what_its_client_saw(aborted, remaining_s, expected):
    error = None if aborted is None else grpc.aio.AbortError("aborted")  # what an aborted behaviour raises
    assert metrics.final_code(_EndedContext(aborted, remaining_s), error) == expected
