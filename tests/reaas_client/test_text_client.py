"""EncoderClient on a text encoder: token ids, embed and vocabulary typed and accounted like images (client ledger
equal to the server's bill), refused locally when they cannot travel, and re-sent after a lost replica."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import numpy as np
import pytest
import torch
from tiny_text_encoder import SENTENCES, tiny_text_encoder

from reaas.v1 import encoder_service_pb2 as pb
from reaas.v1 import encoder_service_pb2_grpc as pb_grpc
from reaas_client import EncoderClient, TextInputInfo, encode_tensor
from reaas_client.wire import decode_tensor
from reaas_server import ServedEncoder, ServerConfig, run_server


@pytest.fixture(scope="module")
def text_encoder() -> ServedEncoder:
    return ServedEncoder(tiny_text_encoder(), torch.device("cpu"))


@pytest.fixture()
def text_address(text_encoder):
    """A fresh open-access server per test, so its bill holds this test's calls only."""
    with run_server(ServerConfig(port=0, max_batch_size=3, bound_cost_budget_s=0.0), text_encoder) as (_, port):
        yield f"127.0.0.1:{port}"


def test_client_ledger_and_server_bill_agree_for_token_rpcs(text_encoder, text_address):
    ids = text_encoder.text.vocabulary.encode(list(SENTENCES))  # 4 sequences: two requests of max_batch_size 3
    names = [f"text-{i}" for i in range(len(ids))]
    with EncoderClient(text_address) as client:
        client.embed(ids, input_ids=names)
        client.features(token_ids=ids, input_ids=names)
        client.f2i_perturb(token_ids=ids[:2], feature_radii=[0.2, 0.4], input_ids=names[:2], bound="lipschitz")
        assert len(list(client.stream_features([(ids[:2], names[:2])], inputs="token_ids"))) == 1
        client.vocabulary()
        usage = client.usage()
        ledger = client.ledger
    assert ledger.queries("text-0") == 4 and ledger.queries("text-3") == 2
    assert ledger.queries("text-1", "Embed") == 1
    totals = ledger.totals_by_rpc()
    assert "GetVocabulary" not in totals  # free, and not an input's cost
    assert usage.total_queries == 4 + 4 + 2 + 2
    for rpc, calls in (("Embed", 2), ("Feature", 2), ("F2IPerturb", 1), ("StreamFeatures", 1)):
        served = usage.rpcs[rpc]
        assert served.calls == calls
        assert served.queries == totals[rpc].queries
        assert served.request_bytes == totals[rpc].request_bytes > 0
        assert served.response_bytes == totals[rpc].response_bytes > 0


def test_vocabulary_is_fetched_once_and_tokenizes_like_the_provider(text_encoder, text_address):
    with EncoderClient(text_address) as client:
        vocabulary = client.vocabulary()
        assert client.vocabulary() is vocabulary
        calls = client.usage().rpcs["GetVocabulary"].calls
        info = client.info()
    assert calls == 1
    assert vocabulary == text_encoder.text.vocabulary
    assert info.modality == "text" and isinstance(info.text_input, TextInputInfo)
    assert info.input_shape == (info.text_input.embed_dim, 1, vocabulary.max_length)


def test_inputs_that_cannot_travel_are_refused_before_sending(text_encoder, text_address):
    ids = text_encoder.text.vocabulary.encode(["the cat"])
    with EncoderClient(text_address) as client:
        with pytest.raises(TypeError, match="token ids must be integers"):
            client.features(token_ids=ids.float())
        with pytest.raises(ValueError, match="outside int32"):
            client.embed(np.array([[2**31]], dtype=np.int64))
        with pytest.raises(ValueError, match="exactly one of images and token_ids"):
            client.features(text_encoder.text.embed(ids), token_ids=ids)
        with pytest.raises(ValueError, match="exactly one of images and token_ids"):
            client.f2i_perturb(feature_radii=[0.1])
        with pytest.raises(ValueError, match="give feature_radii"):
            client.f2i_perturb(token_ids=ids)
        with pytest.raises(ValueError, match="inputs must be"):
            list(client.stream_features([(ids, None)], inputs="tokens"))
        assert client.ledger.totals_by_rpc() == {}


class _LosingReplica(pb_grpc.EncoderServiceServicer):
    """Answers like a text encoder with features = the token-id sums, but fails the first Embed call and the first
    stream after its first reply with UNAVAILABLE, as a replica lost mid-call does."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.embed_calls = self.stream_calls = 0
        self.streamed: list[list[int]] = []  # first ids of every stream message received

    def GetEncoderInfo(self, request, context):
        return pb.EncoderInfo(input_shape=[2, 1, 3], feature_dim=1, max_batch_size=8, max_message_bytes=2**20,
                              modality="text")

    def Embed(self, request, context):
        with self.lock:
            self.embed_calls += 1
            if self.embed_calls == 1:
                context.abort(grpc.StatusCode.UNAVAILABLE, "lost by the test")
        ids = decode_tensor(request.token_ids)
        embeddings = np.zeros((len(ids), 2, 1, 3), np.float32)
        embeddings[:, 0, 0, 0] = ids[:, 0]
        return pb.EmbedResponse(embeddings=encode_tensor(embeddings))

    def StreamFeatures(self, request_iterator, context):
        with self.lock:
            self.stream_calls += 1
            first_call = self.stream_calls == 1
        for answered, request in enumerate(request_iterator):
            ids = decode_tensor(request.token_ids, name="token_ids")
            self.streamed.append(ids[:, 0].tolist())
            if first_call and answered == 1:
                context.abort(grpc.StatusCode.UNAVAILABLE, "lost by the test")
            yield pb.FeatureResponse(features=encode_tensor(ids.sum(axis=1, keepdims=True).astype(np.float32)))


def test_token_calls_are_resent_after_a_lost_replica_and_recorded_once():
    replica = _LosingReplica()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_EncoderServiceServicer_to_server(replica, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with EncoderClient(f"127.0.0.1:{port}", timeout_s=30) as client:
            embedded = client.embed(np.array([[5, 6], [7, 8]]), input_ids=["a", "b"])
            batches = [(np.array([[1, 2], [3, 4]]), ["s0", "s0"]), (np.array([[10, 1]]), ["s1"]),
                       (np.array([[20, 2, 2]]), ["s2"])]
            features = list(client.stream_features(iter(batches), inputs="token_ids"))
            ledger = client.ledger
    finally:
        server.stop(None)
    assert replica.embed_calls == 2 and embedded[:, 0, 0, 0].tolist() == [5.0, 7.0]
    assert [f[:, 0].tolist() for f in features] == [[3.0, 7.0], [11.0], [24.0]]
    assert replica.stream_calls == 2 and replica.streamed[2:] == [[10], [20]]  # the resumed call re-sent batch 2
    assert ledger.queries("a", "Embed") == 1 and ledger.queries("s1", "StreamFeatures") == 1
    assert ledger.totals_by_rpc()["StreamFeatures"].queries == 4
