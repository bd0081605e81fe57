"""The transport-ceiling benchmark's parts (issue 22): the bare server answers like the real one in shape and size,
and the client swarm counts refusals apart from answers."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import numpy as np
import pytest

from benchmarks.bare_server import SERVICE, bare_server_process
from benchmarks.client_swarm import swarm
from reaas.v1 import encoder_service_pb2 as pb
from reaas_client import encode_tensor


def _request(batch: int) -> pb.FeatureRequest:
    return pb.FeatureRequest(images=encode_tensor(np.zeros((batch, 1, 28, 28), np.float32)))


@pytest.mark.parametrize("aio", [False, True], ids=["thread_pool", "grpc_aio"])
def test_bare_server_answers_feature_with_real_sized_features(aio: bool) -> None:
    with bare_server_process(feature_dim=7, aio=aio) as (process, address), grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(f"/{SERVICE}/Feature", request_serializer=pb.FeatureRequest.SerializeToString,
                                   response_deserializer=pb.FeatureResponse.FromString)
        reply = call(_request(3), timeout=30)
        streamed = list(channel.stream_stream(
            f"/{SERVICE}/StreamFeatures", request_serializer=pb.FeatureRequest.SerializeToString,
            response_deserializer=pb.FeatureResponse.FromString)(iter([_request(2), _request(5)]), timeout=30))
    assert list(reply.features.shape) == [3, 7]
    assert reply.features.dtype == pb.FLOAT32 and len(reply.features.raw_data) == 3 * 7 * 4
    assert [list(r.features.shape) for r in streamed] == [[2, 7], [5, 7]]
    assert process.returncode == 0  # it stopped itself when its stdin closed


class _RefuseEveryOther:
    """A Feature handler that answers odd-numbered calls and refuses even-numbered ones, counting both."""

    def __init__(self) -> None:
        self.answered = self.refused = 0
        self._lock = threading.Lock()

    def __call__(self, request: pb.FeatureRequest, context: grpc.ServicerContext) -> pb.FeatureResponse:
        with self._lock:
            refuse = (self.answered + self.refused) % 2 == 1
            if refuse:
                self.refused += 1
            else:
                self.answered += 1
        if refuse:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")
        return pb.FeatureResponse(features=pb.Tensor(dtype=pb.FLOAT32, shape=[1, 1], raw_data=bytes(4)))


def test_swarm_counts_refusals_apart_from_answers() -> None:
    handler = _RefuseEveryOther()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Feature": grpc.unary_unary_rpc_method_handler(
            handler, request_deserializer=pb.FeatureRequest.FromString,
            response_serializer=pb.FeatureResponse.SerializeToString)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    clients = 4
    try:
        outcome = swarm(f"127.0.0.1:{port}", "Feature", _request(1).SerializeToString(), clients, 0.3,
                        processes=2, timeout_s=30)
    finally:
        server.stop(grace=None)
    assert outcome.other_errors == {}
    assert outcome.answered > 0 and outcome.refused > 0
    # every warm-up call (one per client, before the clock) reached the server but is in neither count
    assert handler.answered - clients <= outcome.answered <= handler.answered
    assert handler.refused - clients <= outcome.refused <= handler.refused
