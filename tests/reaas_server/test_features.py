"""Feature RPCs: what travels over gRPC equals a local forward pass, whatever the path or dtype."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from reaas.v1 import encoder_service_pb2 as pb
from reaas.v1 import encoder_service_pb2_grpc as pb_grpc
from reaas_client import EncoderClient, encode_tensor
from reaas_server import ServerConfig, run_server
from tests.numerics import assert_same_features


def local_features(demo_encoder, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return demo_encoder.model(images).numpy()


def test_info_describes_the_served_encoder(client, demo_encoder):
    info = client.info()
    meta = demo_encoder.metadata
    assert info.input_shape == tuple(meta.input_shape)
    assert info.feature_dim == meta.feature_dim
    assert info.model_sha256 == meta.sha256 and len(info.model_sha256) == 64
    assert info.lipschitz_upper == meta.lipschitz_upper > 0
    assert info.f2i_perturb_offered and info.mode == "reaas"
    assert set(info.accepted_dtypes) == {"FLOAT32", "FLOAT16", "UINT8"}
    assert info.default_bound in info.bounds_offered
    assert (info.value_min, info.value_max) == (0.0, 1.0)


def test_unary_features_equal_local_forward(client, demo_encoder, make_images):
    images = make_images(10)
    remote = client.features(images)
    assert remote.shape == (10, demo_encoder.metadata.feature_dim) and remote.dtype == np.float32
    assert_same_features(remote, local_features(demo_encoder, images))


def test_batches_over_the_server_limit_are_split_by_the_client(client, demo_encoder, make_images):
    images = make_images(150)  # the test server's max_batch_size is 64
    remote = client.features(images, input_ids=[f"x{i}" for i in range(150)])
    assert_same_features(remote, local_features(demo_encoder, images))
    assert client.ledger.queries("x149", "Feature") == 1


def test_streaming_equals_unary(client, make_images):
    batches = [make_images(n, seed=n) for n in (1, 7, 32)]
    streamed = list(client.stream_features((b, None) for b in batches))
    assert len(streamed) == 3
    for batch, features in zip(batches, streamed, strict=True):
        assert_same_features(features, client.features(batch))


def test_a_stream_window_larger_than_its_messages_serves_the_same_features(demo_encoder, make_images):
    batches = [make_images(n, seed=n) for n in (256, 3, 300)]  # 803 KB, 9 KB, 941 KB: one window holds any
    with run_server(ServerConfig(port=0, stream_window_bytes=1024 * 1024, bound_cost_budget_s=0.0),
                    demo_encoder) as (_, port), EncoderClient(f"127.0.0.1:{port}") as client:
        streamed = list(client.stream_features((b, None) for b in batches))
    for batch, features in zip(batches, streamed, strict=True):
        assert_same_features(features, local_features(demo_encoder, batch))


def test_a_stream_window_out_of_range_is_a_usage_error(capsys):
    from reaas_server.cli import parse_args

    with pytest.raises(SystemExit) as refused:
        parse_args(["--stream-window-kib", "0"])
    assert refused.value.code == 2 and "--stream-window-kib 1 to 2097151" in capsys.readouterr().err


def test_uint8_and_float16_decode_onto_the_declared_range(client, make_images):
    pixels = (make_images(4) * 255).round().to(torch.uint8)
    as_float = pixels.float() / 255
    assert_same_features(client.features(pixels), client.features(as_float))
    half = as_float.half()
    assert_same_features(client.features(half), client.features(half.float()))


def test_round_robin_spreads_calls_over_replicas(demo_encoder, make_images):
    from reaas_server import ServerConfig, start_server

    replicas = [start_server(ServerConfig(port=0), demo_encoder) for _ in range(2)]
    try:
        addresses = [f"127.0.0.1:{r.port}" for r in replicas]
        with EncoderClient(addresses) as spread:
            for _ in range(8):
                spread.features(make_images(1))
        served = [sum(t.queries for t in r.ledger.totals("anonymous")) for r in replicas]
        assert sum(served) == 8 and min(served) >= 1, served
    finally:
        for replica in replicas:
            replica.stop(grace_s=0)


def test_features_may_travel_as_float16_and_never_as_uint8(client, raw_stub, make_images):
    from reaas.v1 import encoder_service_pb2 as pb

    images = make_images(5).numpy()
    exact = client.features(images)
    lean = client.features(images, feature_dtype="float16")
    assert lean.dtype == np.float32
    np.testing.assert_array_equal(lean, exact.astype(np.float16).astype(np.float32))
    with pytest.raises(grpc.RpcError) as refused:
        raw_stub.Feature(pb.FeatureRequest(images=encode_tensor(images), feature_dtype=pb.UINT8), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "FLOAT16" in refused.value.details()


def test_a_stream_keeps_the_order_and_ends_at_a_bad_message(demo_encoder, make_images):
    """Replies keep the requests' order, batched small messages and large ones on the compute pool mixed, and a
    message that does not decode ends the stream with its status after the good ones."""
    sizes = [10, 2, 12, 1, 9]  # forward_chunk_size 8: 10, 12 and 9 images run on the compute pool, 2 and 1 batched
    batches = [make_images(n, seed=n) for n in sizes]
    requests = [pb.FeatureRequest(images=encode_tensor(b)) for b in batches]
    bad = pb.FeatureRequest(images=encode_tensor(np.full((3, *batches[0].shape[1:]), 9.0, np.float32)))
    with run_server(ServerConfig(port=0, forward_chunk_size=8, bound_cost_budget_s=0.0), demo_encoder) as (_, port), \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        replies = pb_grpc.EncoderServiceStub(channel).StreamFeatures(iter([*requests, bad, requests[0]]), timeout=60)
        received = []
        with pytest.raises(grpc.RpcError) as ended:
            for reply in replies:
                received.append(reply)
        assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [list(r.features.shape) for r in received] == [[n, demo_encoder.metadata.feature_dim] for n in sizes]
    with torch.inference_mode():
        for reply, images in zip(received, batches, strict=True):
            expected = demo_encoder.features(images).numpy()
            got = np.frombuffer(reply.features.raw_data, dtype=np.float32).reshape(expected.shape)
            assert_same_features(got, expected)
