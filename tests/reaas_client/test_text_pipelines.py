"""The three paths on a text encoder: token ids in, the paper's query costs per input (plus SEaaS-SC's one Embed),
and REaaS-BC's embedding-space radius sound against random and PGD perturbations of the embedding matrix."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bounds.attack import pgd_margin_attack
from reaas_client.client import EncoderClient
from reaas_client.downstream import TrainConfig, fetch_features, input_ids
from reaas_client.downstream_data import load_downstream
from reaas_client.pipelines import (
    SEAAS_TRAIN_COPIES,
    SmoothingConfig,
    certify_reaas_bc,
    certify_reaas_sc,
    certify_seaas_sc,
    train_downstream,
)
from reaas_server import ServerConfig, run_server
from reaas_server.encoder_host import ServedEncoder
from tests.tiny_text_encoder import tiny_text_encoder

CLASSES = 2
SMALL = SmoothingConfig(sigma=0.25, n0=10, n=90, alpha=0.01, batch_size=40)
BOUND = "lipschitz"


@pytest.fixture(scope="module")
def encoder() -> ServedEncoder:
    return ServedEncoder(tiny_text_encoder(), torch.device("cpu"))


@pytest.fixture(scope="module")
def data(encoder) -> tuple[torch.Tensor, ...]:
    """Random token ids (pad included) with labels: 12 training and 4 test sequences."""
    generator = torch.Generator().manual_seed(0)
    vocabulary = encoder.text.vocabulary
    ids = torch.randint(0, vocabulary.size, (16, vocabulary.max_length), generator=generator)
    labels = torch.arange(16) % CLASSES
    return ids[:12], labels[:12], ids[12:], labels[12:]


@pytest.fixture(scope="module")
def addresses(encoder):
    with run_server(ServerConfig(port=0, mode="reaas", max_batch_size=64), encoder) as (_, reaas), \
            run_server(ServerConfig(port=0, mode="seaas", max_batch_size=64), encoder) as (_, seaas):
        yield {"reaas": f"127.0.0.1:{reaas}", "seaas": f"127.0.0.1:{seaas}"}


def quick(path: str, client: EncoderClient, data, sigma: float = 0.25):
    train_ids, train_labels, _, _ = data
    return train_downstream(path, client, train_ids, train_labels, CLASSES, dataset="toy-text", sigma=sigma,
                            config=TrainConfig(hidden=(16,), epochs=3, head="linear", margin=0.05), cache_dir=None)


def test_text_training_costs_one_query_per_input_for_reaas_and_26_for_seaas(addresses, data) -> None:
    train_ids, train_labels, _, _ = data
    with EncoderClient(addresses["reaas"]) as client:
        fetched = fetch_features(client, train_ids, train_labels, dataset="toy-text", cache_dir=None)
        assert [client.ledger.queries(i) for i in input_ids("train", len(train_ids))] == [1] * len(train_ids)
        # the ids went as ids: the features are the encoder's on their embedding matrices
        assert torch.allclose(fetched.features, torch.from_numpy(client.features(client.embed(train_ids))),
                              atol=1e-6)
    with EncoderClient(addresses["seaas"]) as client:
        trained = quick("seaas-sc", client, data)
        # one Embed for the matrix the noise is added to, then the 25 noisy copies
        assert [client.ledger.queries(i) for i in input_ids("train", len(train_ids))] == (
            [SEAAS_TRAIN_COPIES + 1] * len(train_ids))
    assert trained.queries_per_input == SEAAS_TRAIN_COPIES + 1


def test_text_reaas_bc_costs_two_queries_and_its_embedding_radius_holds(addresses, data, encoder) -> None:
    _, _, test_ids, test_labels = data
    with EncoderClient(addresses["reaas"]) as client:
        h = quick("reaas-bc", client, data).model
        records = certify_reaas_bc(client, h, test_ids, test_labels, bound=BOUND, method="margin", batch_size=3)
    assert all(dict(r.queries) == {"Feature": 1, "F2IPerturb": 1} for r in records)
    assert any(r.image_radius > 0 for r in records)  # else the checks below would be vacuous
    shape = encoder.text.input_shape
    # h(f(.)) on flattened embedding matrices, in float64, so the attack's l2 ball is the threat model's
    classifier = copy.deepcopy(nn.Sequential(nn.Unflatten(1, shape), encoder.model, h)).double()  # not the served one
    matrices = encoder.text.embed(test_ids).double().flatten(1)
    radii = 0.999 * torch.tensor([r.image_radius for r in records], dtype=torch.float64)
    predictions = torch.tensor([r.prediction for r in records])
    generator = torch.Generator().manual_seed(1)
    direction = torch.randn(32, *matrices.shape, generator=generator, dtype=torch.float64)
    direction /= direction.norm(dim=2, keepdim=True)
    with torch.no_grad():
        randomly = classifier((matrices + radii.view(-1, 1) * direction).flatten(0, 1)).argmax(1)
    assert (randomly.view(32, -1) == predictions).all()
    margin, _ = pgd_margin_attack(classifier, matrices, predictions, radii, steps=100, restarts=5,
                                  generator=generator)
    assert (margin > 0).all(), margin


def test_text_reaas_sc_costs_two_queries_and_seaas_sc_one_embed_plus_n0_plus_n(addresses, data) -> None:
    _, _, test_ids, test_labels = data
    with EncoderClient(addresses["reaas"]) as client:
        h = quick("reaas-sc", client, data).model
        records = certify_reaas_sc(client, h, test_ids, test_labels, SMALL, bound=BOUND, batch_size=3)
    assert all(dict(r.queries) == {"Feature": 1, "F2IPerturb": 1} for r in records)
    with EncoderClient(addresses["seaas"]) as client:
        h = quick("seaas-sc", client, data).model
        before = client.usage().total_queries
        records = certify_seaas_sc(client, h, test_ids, test_labels, SMALL, stream_batch_size=32)
        assert client.usage().total_queries - before == len(test_ids) * (1 + SMALL.n0 + SMALL.n)
    assert all(dict(r.queries) == {"Embed": 1, "StreamFeatures": SMALL.n0 + SMALL.n} for r in records)


def test_a_text_data_set_on_an_image_encoder_is_refused_before_any_query(addresses) -> None:
    with run_server(ServerConfig(port=0, mode="reaas")) as (_, port), \
            EncoderClient(f"127.0.0.1:{port}") as client:
        with pytest.raises(ValueError, match="reads image"):
            load_downstream("rt-embedded", None, client)
        assert client.usage().total_queries == 0
