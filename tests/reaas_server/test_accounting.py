"""One image = one query: the client's ledger and the server's usage book agree exactly, per key and RPC."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from reaas_client import EncoderClient, ServiceError
from reaas_server import ServerConfig, run_server


@pytest.fixture()
def fresh_address(demo_encoder):
    with run_server(ServerConfig(port=0, max_batch_size=64), demo_encoder) as (_, port):
        yield f"127.0.0.1:{port}"


def test_ledger_and_server_usage_agree_exactly(fresh_address, make_images):
    with EncoderClient(fresh_address, api_key="alice") as alice:
        alice.features(make_images(5), input_ids=[f"train-{i}" for i in range(5)])
        batches = [(make_images(3, seed=s), ["test-0"] * 3) for s in range(2)]
        assert len(list(alice.stream_features(batches))) == 2
        alice.f2i_perturb(make_images(2), [0.5, 0.5], input_ids=["test-0", "test-1"], bound="lipschitz")
        usage = alice.usage()
        ledger = alice.ledger

    assert ledger.queries("train-3") == 1
    assert ledger.queries("test-0") == 7 and ledger.queries("test-0", "StreamFeatures") == 6
    assert ledger.queries("test-1") == 1
    totals = ledger.totals_by_rpc()
    assert usage.api_key == "alice"
    assert usage.total_queries == 5 + 6 + 2
    for rpc, expected_calls in (("Feature", 1), ("StreamFeatures", 2), ("F2IPerturb", 1)):
        served = usage.rpcs[rpc]
        assert served.calls == expected_calls
        assert served.queries == totals[rpc].queries
        assert served.request_bytes == totals[rpc].request_bytes > 0
        assert served.response_bytes == totals[rpc].response_bytes > 0


def test_usage_is_per_api_key_and_rejected_requests_are_free(fresh_address, make_images):
    with EncoderClient(fresh_address, api_key="bob") as bob, EncoderClient(fresh_address) as anonymous:
        bob.features(make_images(4))
        with pytest.raises(ServiceError):
            bob.features(np.full((2, *make_images(1).shape[1:]), 7.0, np.float32))  # out of range
        anonymous.features(make_images(1))
        assert bob.usage().total_queries == 4
        assert anonymous.usage().api_key == "anonymous" and anonymous.usage().total_queries == 1


def test_ledger_csv_lists_every_input(fresh_address, make_images, tmp_path):
    with EncoderClient(fresh_address) as client:
        client.features(make_images(3), input_ids=["a", "b", "a"])
        path = client.ledger.to_csv(tmp_path / "ledger.csv")
    lines = path.read_text().splitlines()
    assert lines[0] == "input_id,rpc,queries,request_bytes,response_bytes"
    assert [line.split(",")[:3] for line in lines[1:]] == [["a", "Feature", "2"], ["b", "Feature", "1"]]


def test_api_keys_are_enforced_when_configured(demo_encoder, make_images):
    config = ServerConfig(port=0, api_keys=frozenset({"secret-key"}))
    with run_server(config, demo_encoder) as (_, port):
        address = f"127.0.0.1:{port}"
        for key in (None, "wrong-key"):
            with EncoderClient(address, api_key=key) as client, pytest.raises(ServiceError) as raised:
                client.features(make_images(1))
            assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert "x-api-key" in raised.value.details
        with EncoderClient(address, api_key="secret-key") as client:
            assert client.features(make_images(1)).shape[0] == 1
            assert list(client.stream_features([(make_images(2), None)]))[0].shape[0] == 2
