"""Text over the wire: token ids in Feature / F2IPerturb / StreamFeatures, Embed, GetVocabulary, EncoderInfo's
modality, every bad token input refused with its code and a message, and the bill exact for sequences."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
import torch
from tiny_text_encoder import SENTENCES, tiny_text_encoder

from reaas.v1 import encoder_service_pb2 as pb
from reaas.v1 import encoder_service_pb2_grpc as pb_grpc
from reaas_client import EncoderClient, ServiceError, encode_tensor
from reaas_server import ServedEncoder, ServerConfig, run_server, start_server
from reaas_server.ledger import UsageLedger
from tests.numerics import assert_same_features


@pytest.fixture(scope="module")
def text_encoder() -> ServedEncoder:
    return ServedEncoder(tiny_text_encoder(), torch.device("cpu"))


@pytest.fixture(scope="module")
def text_address(text_encoder):
    config = ServerConfig(port=0, mode="reaas", max_batch_size=16, bound_cost_budget_s=0.0)
    with run_server(config, text_encoder) as (_, port):
        yield f"127.0.0.1:{port}"


@pytest.fixture()
def text_client(text_address):
    with EncoderClient(text_address, timeout_s=60) as client:
        yield client


@pytest.fixture()
def text_stub(text_address):
    with grpc.insecure_channel(text_address) as channel:
        yield pb_grpc.EncoderServiceStub(channel)


def token_ids(text_encoder, texts=SENTENCES) -> torch.Tensor:
    return text_encoder.text.vocabulary.encode(list(texts))


def ids_tensor(values, dtype=np.int32) -> pb.Tensor:
    return encode_tensor(np.asarray(values, dtype=dtype))


def test_features_of_token_ids_are_the_model_of_their_embedding_bit_for_bit(text_encoder, text_client):
    ids = token_ids(text_encoder)
    with torch.inference_mode():
        expected = text_encoder.model(text_encoder.text.embed(ids)).numpy()
    assert np.array_equal(text_client.features(token_ids=ids), expected)
    # the same matrices sent as images (what SEaaS-SC on text sends) give the same features
    assert np.array_equal(text_client.features(text_encoder.text.embed(ids)), expected)


def test_short_sequences_are_padded_like_vocabulary_encode(text_encoder, text_client):
    texts = ["the cat", "a dog sat", "mat"]
    full = token_ids(text_encoder, texts)  # [3, MAX_LENGTH], pad_id after each text's tokens
    short = full[:, :3]  # the longest text has 3 tokens: the rest is padding the server must restore
    assert np.array_equal(text_client.features(token_ids=short), text_client.features(token_ids=full))
    assert torch.equal(text_client.embed(short), text_encoder.text.embed(full))


def test_embed_is_the_text_front_end_and_is_billed_per_sequence(text_encoder, text_address):
    ids = token_ids(text_encoder)
    with EncoderClient(text_address, timeout_s=60) as client:
        before = client.usage().rpcs.get("Embed")
        embeddings = client.embed(ids, input_ids=[f"s{i}" for i in range(len(ids))])
        after = client.usage().rpcs["Embed"]
    assert embeddings.dtype == torch.float32 and embeddings.shape == (len(ids), 4, 1, 6)
    assert torch.equal(embeddings, text_encoder.text.embed(ids))
    assert after.queries - (before.queries if before else 0) == len(ids)
    assert client.ledger.queries("s0", "Embed") == 1
    assert client.ledger.totals_by_rpc()["Embed"].queries == len(ids)


def test_f2i_of_token_ids_equals_f2i_of_their_embedding(text_encoder, text_client):
    ids = token_ids(text_encoder)
    radii = np.linspace(0.1, 0.8, len(ids))
    embedded = text_client.embed(ids)
    for bound in ("ibp", ""):
        by_ids = text_client.f2i_perturb(token_ids=ids, feature_radii=radii, bound=bound)
        by_images = text_client.f2i_perturb(embedded, radii, bound=bound)
        assert np.array_equal(by_ids.image_radius, by_images.image_radius)
        assert by_ids.bound == by_images.bound
        assert (by_ids.image_radius > 0).all()


def test_stream_features_take_token_ids(text_encoder, text_client):
    ids = token_ids(text_encoder)
    short = token_ids(text_encoder, ["the cat", "dog"])[:, :2]  # a shorter length per message is fine
    batches = [(ids[:2], ["a", "b"]), (short, ["c", "d"]), (ids[2:], ["e", "f"])]
    streamed = list(text_client.stream_features(batches, inputs="token_ids"))
    # each message's answer is the unary answer of the same batch (up to summation order: pipelined messages may
    # share a batcher pass)
    for (batch, _), features in zip(batches, streamed, strict=True):
        assert_same_features(features, text_client.features(token_ids=batch))
    assert text_client.ledger.queries("c", "StreamFeatures") == 1


def test_stream_f2i_takes_token_ids(text_encoder, text_stub):
    ids = token_ids(text_encoder).numpy().astype(np.int32)
    requests = [pb.F2IPerturbRequest(token_ids=encode_tensor(ids[:2]), feature_radii=[0.3, 0.6], bound="ibp"),
                pb.F2IPerturbRequest(images=encode_tensor(text_encoder.text.embed(torch.from_numpy(ids[:2]).long())),
                                     feature_radii=[0.3, 0.6], bound="ibp")]
    by_ids, by_images = text_stub.StreamF2IPerturb(iter(requests), timeout=60)
    assert [r.image_radius for r in by_ids.radii] == [r.image_radius for r in by_images.radii]


def test_usage_and_quota_count_sequences(text_encoder, tmp_path):
    ledger = UsageLedger(tmp_path / "ledger.sqlite3")
    # a period whose window cannot roll over mid-test (3600 s windows start on the hour: a run at 18:00 UTC was
    # refused nothing after its first call was counted in the hour before)
    secret = ledger.add_key("texter", quota_queries=6, quota_period_s=100 * 365 * 86400)
    ledger.close()
    ids = token_ids(text_encoder)  # 4 sequences
    config = ServerConfig(port=0, ledger_path=tmp_path / "ledger.sqlite3", bound_cost_budget_s=0.0)
    with run_server(config, text_encoder) as (_, port), \
            EncoderClient(f"127.0.0.1:{port}", api_key=secret, timeout_s=30) as client:
        client.features(token_ids=ids)
        client.vocabulary()  # free
        with pytest.raises(ServiceError) as refused:
            client.embed(ids)  # 4 + 4 > 6
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        client.embed(ids[:2])
        usage = client.usage()
    assert usage.rpcs["Feature"].queries == 4 and usage.rpcs["Embed"].queries == 2
    assert usage.rpcs["GetVocabulary"].queries == 0 and usage.total_queries == 6 and usage.quota.remaining == 0


def test_metrics_count_sequences_as_queries(text_encoder):
    ids = token_ids(text_encoder)
    running = start_server(ServerConfig(port=0, bound_cost_budget_s=0.0), text_encoder)
    try:
        with EncoderClient(f"127.0.0.1:{running.port}", timeout_s=30) as client:
            client.features(token_ids=ids)
            client.embed(ids[:3])
            client.vocabulary()
        registry = running.metrics.registry
        deadline = time.monotonic() + 30  # a call is counted when gRPC ends it, which may follow its reply
        while registry.get_sample_value("reaas_rpc_calls_total", {"rpc": "GetVocabulary", "code": "OK"}) != 1:
            assert time.monotonic() < deadline, "GetVocabulary was never counted"
            time.sleep(0.01)
        queries = {rpc: registry.get_sample_value("reaas_rpc_queries_total", {"rpc": rpc})
                   for rpc in ("Feature", "Embed", "GetVocabulary")}
    finally:
        running.stop(grace_s=0)
    assert queries == {"Feature": 4, "Embed": 3, "GetVocabulary": 0}


def test_get_vocabulary_round_trips_the_providers_vocabulary(text_encoder, text_client):
    vocabulary = text_client.vocabulary()
    assert vocabulary == text_encoder.text.vocabulary
    texts = ["The CAT sat on the log, again!", "unknown words here"]
    assert torch.equal(vocabulary.encode(texts), text_encoder.text.vocabulary.encode(texts))


def test_encoder_info_says_text_and_its_threat_model(text_encoder, text_client):
    info = text_client.info()
    assert info.modality == "text" and info.input_shape == (4, 1, 6)
    assert (info.value_min, info.value_max) == (-1.0, 1.0)
    text = info.text_input
    assert (text.vocab_size, text.max_length, text.embed_dim, text.pad_id, text.unk_id) == (12, 6, 4, 0, 1)
    assert "embedding" in text.threat_model and "insertions and deletions are not" in text.threat_model


def test_image_encoder_info_is_unchanged_but_for_its_modality(raw_stub):
    info = raw_stub.GetEncoderInfo(pb.EncoderInfoRequest(), timeout=30)
    assert info.modality == "image" and not info.HasField("text_input")
    assert list(info.accepted_dtypes) == [pb.FLOAT32, pb.FLOAT16, pb.UINT8]


def test_seaas_text_deployment_embeds_and_serves_features_but_no_radii(text_encoder):
    ids = token_ids(text_encoder)
    config = ServerConfig(port=0, mode="seaas", bound_cost_budget_s=0.0)
    with run_server(config, text_encoder) as (_, port), EncoderClient(f"127.0.0.1:{port}", timeout_s=30) as client:
        assert torch.equal(client.embed(ids), text_encoder.text.embed(ids))
        assert client.features(token_ids=ids).shape == (len(ids), 8)
        with pytest.raises(ServiceError) as refused:
            client.f2i_perturb(token_ids=ids, feature_radii=[0.5] * len(ids))
        assert refused.value.code == grpc.StatusCode.UNIMPLEMENTED


# (request builder, expected code, a phrase the message must hold) for a text encoder
TEXT_REJECTIONS = {
    "uint8 ids": (lambda: pb.FeatureRequest(token_ids=ids_tensor([[2, 3]], np.uint8)),
                  grpc.StatusCode.INVALID_ARGUMENT, "token ids travel as INT32"),
    "float ids": (lambda: pb.FeatureRequest(token_ids=ids_tensor([[2.0, 3.0]], np.float32)),
                  grpc.StatusCode.INVALID_ARGUMENT, "dtype FLOAT32 is not supported"),
    "id == vocab_size": (lambda: pb.FeatureRequest(token_ids=ids_tensor([[2, 3], [4, 12]])),
                         grpc.StatusCode.INVALID_ARGUMENT, "token_ids[1, 1] = 12 is not a token id"),
    "negative id": (lambda: pb.EmbedRequest(token_ids=ids_tensor([[-1]])),
                    grpc.StatusCode.INVALID_ARGUMENT, "ids lie in [0, 12)"),
    "length 0": (lambda: pb.FeatureRequest(token_ids=ids_tensor(np.zeros((2, 0)))),
                 grpc.StatusCode.INVALID_ARGUMENT, "length 0; send 1 to 6 ids"),
    "length > max_length": (lambda: pb.F2IPerturbRequest(token_ids=ids_tensor(np.ones((1, 7))), feature_radii=[0.1]),
                            grpc.StatusCode.INVALID_ARGUMENT, "length 7; send 1 to 6 ids"),
    "rank 3": (lambda: pb.FeatureRequest(token_ids=ids_tensor(np.ones((1, 2, 3)))),
               grpc.StatusCode.INVALID_ARGUMENT, "[batch, length] (rank 2)"),
    "rank 1": (lambda: pb.EmbedRequest(token_ids=ids_tensor([2, 3])),
               grpc.StatusCode.INVALID_ARGUMENT, "(rank 2), got [2]"),
    "empty batch": (lambda: pb.FeatureRequest(token_ids=ids_tensor(np.zeros((0, 3)))),
                    grpc.StatusCode.INVALID_ARGUMENT, "empty batch"),
    "too many sequences": (lambda: pb.FeatureRequest(token_ids=ids_tensor(np.ones((17, 3)))),
                           grpc.StatusCode.RESOURCE_EXHAUSTED, "max_batch_size 16"),
    "bytes do not match shape": (lambda: pb.EmbedRequest(token_ids=pb.Tensor(dtype=pb.INT32, shape=[1, 2],
                                                                             raw_data=b"\0" * 7)),
                                 grpc.StatusCode.INVALID_ARGUMENT, "needs 8"),
    "both images and token_ids": (lambda: pb.FeatureRequest(token_ids=ids_tensor([[2]]),
                                                            images=encode_tensor(np.zeros((1, 4, 1, 6), np.float32))),
                                  grpc.StatusCode.INVALID_ARGUMENT, "send exactly one"),
    "both, to F2IPerturb": (lambda: pb.F2IPerturbRequest(token_ids=ids_tensor([[2]]), feature_radii=[0.1],
                                                         images=encode_tensor(np.zeros((1, 4, 1, 6), np.float32))),
                            grpc.StatusCode.INVALID_ARGUMENT, "has both `images` and `token_ids`"),
    "neither": (lambda: pb.FeatureRequest(), grpc.StatusCode.INVALID_ARGUMENT, "neither `token_ids` nor `images`"),
    "Embed without ids": (lambda: pb.EmbedRequest(), grpc.StatusCode.INVALID_ARGUMENT, "has no `token_ids`"),
    "int32 as images": (lambda: pb.FeatureRequest(images=ids_tensor(np.ones((1, 4, 1, 6)))),
                        grpc.StatusCode.INVALID_ARGUMENT, "images: dtype INT32 is for token ids, which travel in `token_ids`"),
    "embedding entry outside [-1, 1]": (
        lambda: pb.FeatureRequest(images=encode_tensor(np.full((1, 4, 1, 6), 1.5, np.float32))),
        grpc.StatusCode.INVALID_ARGUMENT, "[-1.0, 1.0]"),
}


def _call(stub, request, timeout=30):
    method = {pb.FeatureRequest: stub.Feature, pb.F2IPerturbRequest: stub.F2IPerturb,
              pb.EmbedRequest: stub.Embed}[type(request)]
    return method(request, timeout=timeout)


@pytest.mark.parametrize("case", list(TEXT_REJECTIONS))
def test_bad_token_inputs_are_refused_with_an_actionable_message(text_stub, case):
    build, code, phrase = TEXT_REJECTIONS[case]
    with pytest.raises(grpc.RpcError) as refused:
        _call(text_stub, build())
    assert refused.value.code() == code, refused.value.details()
    assert phrase in refused.value.details()
    # the server stays up
    assert text_stub.Feature(pb.FeatureRequest(token_ids=ids_tensor([[2, 4]])), timeout=30).features.shape == [1, 8]


def test_a_bad_message_in_a_stream_ends_it_with_its_status(text_stub):
    requests = [pb.FeatureRequest(token_ids=ids_tensor([[2, 4]])), pb.FeatureRequest(token_ids=ids_tensor([[99]]))]
    replies = text_stub.StreamFeatures(iter(requests), timeout=30)
    assert next(replies).features.shape == [1, 8]
    with pytest.raises(grpc.RpcError) as refused:
        next(replies)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "= 99" in refused.value.details()


IMAGE_REJECTIONS = {
    "token_ids to Feature": (lambda: pb.FeatureRequest(token_ids=ids_tensor([[2, 3]])),
                             grpc.StatusCode.INVALID_ARGUMENT, "this encoder reads images"),
    "token_ids to F2IPerturb": (lambda: pb.F2IPerturbRequest(token_ids=ids_tensor([[2, 3]]), feature_radii=[0.1]),
                                grpc.StatusCode.INVALID_ARGUMENT, "not token ids"),
    "Embed": (lambda: pb.EmbedRequest(token_ids=ids_tensor([[2, 3]])),
              grpc.StatusCode.FAILED_PRECONDITION, "Embed is for text encoders; this one reads images"),
    "neither (as before text)": (lambda: pb.FeatureRequest(), grpc.StatusCode.INVALID_ARGUMENT,
                                 "reaas.v1.FeatureRequest has no `images`"),
}


@pytest.mark.parametrize("case", list(IMAGE_REJECTIONS))
def test_text_requests_to_an_image_encoder_are_refused(raw_stub, make_images, case):
    build, code, phrase = IMAGE_REJECTIONS[case]
    with pytest.raises(grpc.RpcError) as refused:
        _call(raw_stub, build())
    assert refused.value.code() == code and phrase in refused.value.details(), refused.value.details()
    assert raw_stub.Feature(pb.FeatureRequest(images=encode_tensor(make_images(1).numpy())), timeout=30).features


def test_get_vocabulary_on_an_image_encoder_is_a_failed_precondition(client):
    with pytest.raises(ServiceError) as refused:
        client.vocabulary()
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "GetVocabulary is for text encoders" in refused.value.details
