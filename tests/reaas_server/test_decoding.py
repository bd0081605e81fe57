"""Request bytes that are not a valid message: INVALID_ARGUMENT with one warning line, never INTERNAL."""

from __future__ import annotations

import logging

import grpc
import numpy as np
import pytest

from reaas.v1 import encoder_service_pb2 as pb
from reaas.v1 import encoder_service_pb2_grpc as pb_grpc
from reaas_client import encode_tensor
from reaas_server import ServerConfig, run_server
from reaas_server.ledger import UsageLedger

# Field 1 (images) announced as 127 length-delimited bytes, then the message ends: truncated.
UNDECODABLE = b"\x0a\x7f\x00"
METHOD = "/reaas.v1.EncoderService/"


def good_request(shape) -> bytes:
    images = np.full((1, *shape), 0.5, dtype=np.float32)
    return pb.FeatureRequest(images=encode_tensor(images)).SerializeToString()


def server_lines(caplog) -> list[logging.LogRecord]:
    """What the server logged at INFO or above (gRPC's own deserialization traceback is an ERROR)."""
    return [record for record in caplog.records
            if record.levelno >= logging.INFO and record.name != "reaas.access"]  # the access log has its own line


@pytest.fixture()
def raw_channel(reaas_address):
    with grpc.insecure_channel(reaas_address) as channel:
        yield channel


@pytest.mark.parametrize("rpc", ["Feature", "F2IPerturb"])
def test_undecodable_unary_request_is_invalid_argument_with_one_log_line(raw_channel, raw_stub, caplog, rpc):
    call = raw_channel.unary_unary(METHOD + rpc)  # no serializers: the bytes go out as they are
    caplog.clear()
    with caplog.at_level(logging.DEBUG), pytest.raises(grpc.RpcError) as raised:
        call(UNDECODABLE, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith(f"request is not a valid reaas.v1.{rpc}Request: ")
    lines = server_lines(caplog)
    assert len(lines) == 1, [record.getMessage() for record in lines]
    assert lines[0].levelno == logging.WARNING and lines[0].exc_info is None
    assert f"{rpc}Request" in lines[0].getMessage()
    assert raw_stub.GetEncoderInfo(pb.EncoderInfoRequest(), timeout=30).feature_dim > 0


@pytest.mark.parametrize("good_before", [0, 2])
def test_undecodable_message_in_a_stream_ends_it_after_the_good_ones(
    raw_channel, raw_stub, demo_encoder, caplog, good_before
):
    good = good_request(demo_encoder.metadata.input_shape)
    call = raw_channel.stream_stream(METHOD + "StreamFeatures")
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        replies = call(iter([good] * good_before + [UNDECODABLE, good]), timeout=30)
        answered = []
        with pytest.raises(grpc.RpcError) as raised:
            for reply in replies:
                answered.append(pb.FeatureResponse.FromString(reply))
    assert len(answered) == good_before
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request is not a valid reaas.v1.FeatureRequest" in raised.value.details()
    lines = server_lines(caplog)
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING and lines[0].exc_info is None
    assert raw_stub.Feature(pb.FeatureRequest.FromString(good), timeout=30).features.shape[0] == 1


def test_undecodable_requests_are_refused_before_anything_reads_them_and_not_charged(demo_encoder, tmp_path):
    ledger = UsageLedger(tmp_path / "ledger.sqlite3")
    secret = ledger.add_key("fuzzer")
    ledger.close()
    config = ServerConfig(port=0, mode="seaas", ledger_path=tmp_path / "ledger.sqlite3")
    good = good_request(demo_encoder.metadata.input_shape)
    with run_server(config, demo_encoder) as (_, port), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        feature = channel.unary_unary(METHOD + "Feature")
        stream = channel.stream_stream(METHOD + "StreamFeatures")
        # bytes that are no request are refused as such, key or not: nothing (the ledger included) reads them
        with pytest.raises(grpc.RpcError) as raised:
            feature(UNDECODABLE, timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as raised:
            feature(good, timeout=30)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED

        keyed = (("x-api-key", secret),)
        with pytest.raises(grpc.RpcError) as raised:
            feature(UNDECODABLE, timeout=30, metadata=keyed)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as raised:
            list(stream(iter([good, UNDECODABLE]), timeout=30, metadata=keyed))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        usage = pb_grpc.EncoderServiceStub(channel).GetUsage(pb.UsageRequest(), timeout=30, metadata=keyed)
        charged = {u.rpc: (u.calls, u.queries) for u in usage.rpcs}
        assert charged == {"StreamFeatures": (1, 1)}  # the good message only


def test_undecodable_health_check_is_invalid_argument_too(raw_channel, caplog):
    check = raw_channel.unary_unary("/grpc.health.v1.Health/Check")
    caplog.clear()
    with caplog.at_level(logging.DEBUG), pytest.raises(grpc.RpcError) as raised:
        check(UNDECODABLE, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "grpc.health.v1.HealthCheckRequest" in raised.value.details()
    assert len(server_lines(caplog)) == 1
