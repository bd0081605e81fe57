"""The grpc.aio evaluation prototype (issue 22) does the real work: the served encoder's features, per request and
in stream order, and a row per request in the project's usage ledger."""

from __future__ import annotations

import sys

import numpy as np
import torch

from benchmarks.aio_feature_server import PIPELINE_DEPTH
from benchmarks.bare_server import server_child
from reaas_client import EncoderClient
from reaas_server import ServedEncoder
from reaas_server.ledger import UsageLedger
from tests.numerics import assert_same_features


def test_the_prototype_answers_the_encoders_features_and_bills_every_request(tmp_path) -> None:
    ledger = tmp_path / "usage.db"
    rng = np.random.default_rng(3)
    batches = [rng.random((n, 1, 28, 28), dtype=np.float32) for n in (3, 1, 5, 2)]
    with server_child([sys.executable, "-m", "benchmarks.aio_feature_server", "--demo-kind", "pca",
                       "--ledger", str(ledger)]) as (process, address), EncoderClient(address, timeout_s=60) as client:
        unary = client.features(batches[0])
        streamed = list(client.stream_features((batch, None) for batch in batches))
    assert process.returncode == 0  # it stopped itself when its stdin closed
    encoder = ServedEncoder.load(None, "cpu", demo_kind="pca")
    expected = [encoder.features(torch.from_numpy(batch), chunk_size=256, still_wanted=lambda: True).numpy()
                for batch in batches]
    assert_same_features(unary, expected[0])
    assert len(streamed) == len(batches) > PIPELINE_DEPTH  # more messages than in work at once: order is kept
    for got, want in zip(streamed, expected, strict=True):
        assert_same_features(got, want)
    usage = UsageLedger(ledger)
    try:
        queries = [row[3] for row in usage.rows()]
    finally:
        usage.close()
    assert sorted(queries) == sorted([3] + [len(b) for b in batches])
