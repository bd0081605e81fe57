"""One image = one query: the client's ledger and the server's usage ledger agree exactly, per key and RPC; and
nobody reads or adds to a bill that is not theirs, in either mode."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from reaas_client import EncoderClient, ServiceError
from reaas_server import ServerConfig, run_server
from reaas_server.ledger import UsageLedger


@pytest.fixture()
def fresh_address(demo_encoder):
    """An open-access server (no keys issued)."""
    with run_server(ServerConfig(port=0, max_batch_size=64), demo_encoder) as (_, port):
        yield f"127.0.0.1:{port}"


@pytest.fixture()
def keyed(demo_encoder, tmp_path):
    """A server whose ledger has issued keys alice, bob and carol (carol's revoked); yields (address, secrets)."""
    ledger = UsageLedger(tmp_path / "ledger.sqlite3")
    secrets = {name: ledger.add_key(name) for name in ("alice", "bob", "carol")}
    ledger.revoke_key("carol")
    ledger.close()
    config = ServerConfig(port=0, max_batch_size=64, ledger_path=tmp_path / "ledger.sqlite3")
    with run_server(config, demo_encoder) as (_, port):
        yield f"127.0.0.1:{port}", secrets


def test_ledger_and_server_usage_agree_exactly(fresh_address, make_images):
    with EncoderClient(fresh_address) as alice:
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
    assert usage.key_name == "anonymous"
    assert usage.total_queries == 5 + 6 + 2
    for rpc, expected_calls in (("Feature", 1), ("StreamFeatures", 2), ("F2IPerturb", 1)):
        served = usage.rpcs[rpc]
        assert served.calls == expected_calls
        assert served.queries == totals[rpc].queries
        assert served.request_bytes == totals[rpc].request_bytes > 0
        assert served.response_bytes == totals[rpc].response_bytes > 0


def test_usage_is_per_key_and_rejected_requests_are_free(keyed, make_images):
    address, secrets = keyed
    with EncoderClient(address, api_key=secrets["bob"]) as bob, EncoderClient(address, api_key=secrets["alice"]) as alice:
        bob.features(make_images(4))
        with pytest.raises(ServiceError):
            bob.features(np.full((2, *make_images(1).shape[1:]), 7.0, np.float32))  # out of range
        alice.features(make_images(1))
        assert bob.usage().key_name == "bob" and bob.usage().total_queries == 4
        assert alice.usage().key_name == "alice" and alice.usage().total_queries == 1


def test_open_access_bills_everyone_as_anonymous_whatever_key_they_name(fresh_address, make_images):
    """Rule (open mode): naming someone in x-api-key neither charges them nor shows their usage."""
    with EncoderClient(fresh_address, api_key="alice") as spoofer, EncoderClient(fresh_address) as plain:
        assert spoofer.info().open_access
        spoofer.features(make_images(3))
        report = plain.usage()
        assert spoofer.usage().key_name == "anonymous"
    assert report.key_name == "anonymous" and report.total_queries == 3


@pytest.mark.parametrize("who", ["no key", "unknown key", "revoked key", "a key's name instead of the key"])
def test_without_a_valid_key_nothing_is_read_or_charged(keyed, make_images, who):
    """Rule (keyed mode): every RPC, GetUsage included, needs a valid key; a refused call is charged to nobody."""
    address, secrets = keyed
    key = {"no key": None, "unknown key": "reaas_not-a-key", "revoked key": secrets["carol"],
           "a key's name instead of the key": "alice"}[who]
    with EncoderClient(address, api_key=key) as intruder:
        for call in (lambda: intruder.features(make_images(2)), intruder.usage,
                     lambda: list(intruder.stream_features([(make_images(2), None)]))):
            with pytest.raises(ServiceError) as refused:
                call()
            assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert "x-api-key" in refused.value.details
    with EncoderClient(address, api_key=secrets["alice"]) as alice:
        assert not alice.info().open_access
        assert alice.usage().total_queries == 0


def test_a_key_sees_only_its_own_usage(keyed, make_images):
    """Rule (keyed mode): GetUsage reports the caller's account and no other."""
    address, secrets = keyed
    with EncoderClient(address, api_key=secrets["alice"]) as alice, EncoderClient(address, api_key=secrets["bob"]) as bob:
        alice.features(make_images(5))
        bob.features(make_images(2))
        assert (alice.usage().key_name, alice.usage().total_queries) == ("alice", 5)
        assert (bob.usage().key_name, bob.usage().total_queries) == ("bob", 2)


def test_ledger_csv_lists_every_input(fresh_address, make_images, tmp_path):
    with EncoderClient(fresh_address) as client:
        client.features(make_images(3), input_ids=["a", "b", "a"])
        path = client.ledger.to_csv(tmp_path / "ledger.csv")
    lines = path.read_text().splitlines()
    assert lines[0] == "input_id,rpc,queries,request_bytes,response_bytes"
    assert [line.split(",")[:3] for line in lines[1:]] == [["a", "Feature", "2"], ["b", "Feature", "1"]]


def test_keys_are_stored_hashed_and_never_reported(keyed, make_images, tmp_path):
    address, secrets = keyed
    with EncoderClient(address, api_key=secrets["alice"]) as alice:
        alice.features(make_images(1))
        report = alice.usage()
    assert secrets["alice"] not in repr(report)
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("ledger.sqlite3*"))
    assert all(secret.encode() not in stored for secret in secrets.values())
    assert b"alice" in stored  # the names are there: the check above looks at the right file
