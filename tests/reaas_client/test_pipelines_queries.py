"""Each path costs exactly what the paper says, per input, on an in-process server (small N):
training 1 (REaaS) or 25 (SEaaS) queries per input; test 2 (REaaS-BC, REaaS-SC) or n0 + n (SEaaS-SC).
And the radii the pipelines return are sound end to end on random perturbations inside them."""

from __future__ import annotations

import pytest
import torch

from reaas_client.client import EncoderClient
from reaas_client.downstream import TrainConfig, fetch_features, input_ids
from reaas_client.head_selection import HeadSearch
from reaas_client.pipelines import (
    SEAAS_TRAIN_COPIES,
    PathConfig,
    SmoothingConfig,
    certify_features,
    certify_reaas_bc,
    certify_reaas_sc,
    certify_seaas_sc,
    train_downstream,
)
from reaas_server import ServerConfig, run_server

TRAIN, TEST, CLASSES = 12, 4, 3
SMALL = SmoothingConfig(sigma=0.25, n0=10, n=90, alpha=0.01, batch_size=40)
FAST_BOUND = "lipschitz"  # sound and instant; CROWN F2I takes seconds per image on CPU


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(TRAIN + TEST, 1, 28, 28, generator=generator)
    labels = torch.arange(TRAIN + TEST) % CLASSES
    return images[:TRAIN], labels[:TRAIN], images[TRAIN:], labels[TRAIN:]


@pytest.fixture(scope="module")
def reaas_address():
    with run_server(ServerConfig(port=0, mode="reaas", max_batch_size=64)) as (_, port):
        yield f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def seaas_address():
    with run_server(ServerConfig(port=0, mode="seaas", max_batch_size=64)) as (_, port):
        yield f"127.0.0.1:{port}"


def quick(path: str, client: EncoderClient, data, sigma: float = 0.25):
    train_images, train_labels, _, _ = data
    return train_downstream(path, client, train_images, train_labels, CLASSES, dataset="toy", sigma=sigma,
                            config=TrainConfig(hidden=(16,), epochs=2), cache_dir=None)


def test_reaas_training_costs_one_query_per_input_and_the_cache_none(reaas_address, data, tmp_path) -> None:
    train_images, train_labels, _, _ = data
    with EncoderClient(reaas_address) as client:
        first = fetch_features(client, train_images, train_labels, dataset="toy", cache_dir=tmp_path)
        assert [client.ledger.queries(i) for i in input_ids("train", TRAIN)] == [1] * TRAIN
        second = fetch_features(client, train_images, train_labels, dataset="toy", cache_dir=tmp_path)
        assert [client.ledger.queries(i) for i in input_ids("train", TRAIN)] == [1] * TRAIN
        assert client.usage().total_queries == TRAIN  # the server agrees: the cache hit sent nothing
    assert not first.from_cache and second.from_cache and second.queries_per_input == 1
    assert torch.equal(first.features, second.features)


def test_seaas_training_costs_25_queries_per_input(seaas_address, data) -> None:
    with EncoderClient(seaas_address) as client:
        trained = quick("seaas-sc", client, data)
        assert [client.ledger.queries(i) for i in input_ids("train", TRAIN)] == [SEAAS_TRAIN_COPIES] * TRAIN
    assert trained.queries_per_input == SEAAS_TRAIN_COPIES
    assert trained.features.features.shape[0] == SEAAS_TRAIN_COPIES * TRAIN


def test_reaas_bc_costs_two_queries_and_its_radius_holds(reaas_address, data) -> None:
    _, _, test_images, test_labels = data
    with EncoderClient(reaas_address) as client:
        h = quick("reaas-bc", client, data).model
        records = certify_reaas_bc(client, h, test_images, test_labels, bound=FAST_BOUND, batch_size=3)
        assert all(dict(r.queries) == {"Feature": 1, "F2IPerturb": 1} for r in records)
        assert all(r.bytes_up > 0 and r.bytes_down > 0 for r in records)
        assert any(r.image_radius > 0 for r in records)  # else the check below would be vacuous
        # End to end: random perturbations strictly inside R never change h(f(x)).
        generator = torch.Generator().manual_seed(1)
        for image, record in zip(test_images, records, strict=True):
            direction = torch.randn(16, *image.shape, generator=generator)
            direction /= direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            # clipping to [0, 1] is a projection onto a convex set holding x: it only shrinks ||delta||
            perturbed = (image + 0.999 * record.image_radius * direction).clamp(0, 1)
            with torch.no_grad():
                predictions = h(torch.from_numpy(client.features(perturbed))).argmax(1)
            assert (predictions == record.prediction).all()


def test_reaas_sc_costs_two_queries_per_test_input(reaas_address, data) -> None:
    _, _, test_images, test_labels = data
    with EncoderClient(reaas_address) as client:
        h = quick("reaas-sc", client, data).model
        features = client.features(test_images)
        records = certify_reaas_sc(client, h, test_images, test_labels, SMALL, bound=FAST_BOUND,
                                   batch_size=3)
    assert all(dict(r.queries) == {"Feature": 1, "F2IPerturb": 1} for r in records)
    # The same certificates as the local feature-space half computes on its own: batching changes nothing.
    local = certify_features(h, torch.from_numpy(features), SMALL)
    assert [r.feature_radius for r in records] == [c.radius for c in local]
    assert [r.prediction for r in records] == [c.prediction for c in local]


def test_seaas_sc_costs_n0_plus_n_streamed_queries(seaas_address, data) -> None:
    _, _, test_images, test_labels = data
    with EncoderClient(seaas_address) as client:
        h = quick("seaas-sc", client, data).model
        before = client.usage().total_queries
        records = certify_seaas_sc(client, h, test_images, test_labels, SMALL, stream_batch_size=32)
        assert client.usage().total_queries - before == TEST * (SMALL.n0 + SMALL.n)
    assert all(dict(r.queries) == {"StreamFeatures": SMALL.n0 + SMALL.n} for r in records)


def test_rerunning_a_path_on_one_client_does_not_mix_costs(reaas_address, data) -> None:
    _, _, test_images, test_labels = data
    with EncoderClient(reaas_address) as client:
        h = quick("reaas-bc", client, data).model
        certify_reaas_bc(client, h, test_images, test_labels, bound=FAST_BOUND)
        again = certify_reaas_bc(client, h, test_images, test_labels, bound=FAST_BOUND)
    assert all(r.total_queries == 2 for r in again)


def test_head_selection_costs_no_extra_query_and_its_lipschitz_head_certifies(reaas_address, data) -> None:
    train_images, train_labels, test_images, test_labels = data
    search = HeadSearch(heads=("linear", "lipschitz"), margins=(0.1,), validation_fraction=0.25)
    with EncoderClient(reaas_address) as client:
        trained = train_downstream("reaas-bc", client, train_images, train_labels, CLASSES, dataset="toy",
                                   config=TrainConfig(hidden=(16,), epochs=2), cache_dir=None, search=search)
        assert [client.ledger.queries(i) for i in input_ids("train", TRAIN)] == [1] * TRAIN
        assert len(trained.selection.scores) == 2
        assert trained.selection.validation_indices.max() < TRAIN
        records = certify_reaas_bc(client, trained.model, test_images, test_labels, bound=FAST_BOUND)
    assert all(dict(r.queries) == {"Feature": 1, "F2IPerturb": 1} for r in records)
    with pytest.raises(ValueError, match="reaas-bc only"):
        PathConfig("reaas-sc", search=search)


def test_augmented_training_costs_one_plus_k_queries_per_input(reaas_address, data, tmp_path) -> None:
    train_images, train_labels, _, _ = data
    copies = 2
    with EncoderClient(reaas_address) as client:
        before = client.usage().total_queries
        trained = train_downstream("reaas-bc", client, train_images, train_labels, CLASSES, dataset="toy",
                                   config=TrainConfig(hidden=(16,), epochs=2), cache_dir=tmp_path, augment=copies)
        assert [client.ledger.queries(i) for i in input_ids("train", TRAIN)] == [1 + copies] * TRAIN
        assert client.usage().total_queries - before == (1 + copies) * TRAIN  # the server billed the same
        clean = torch.from_numpy(client.features(train_images))
        cached = fetch_features(client, train_images, train_labels, dataset="toy", cache_dir=tmp_path,
                                augment=copies)
        assert client.usage().total_queries - before == (2 + copies) * TRAIN  # + the clean call; the cache sent 0
    fetched = trained.features
    assert trained.queries_per_input == 1 + copies and cached.from_cache and cached.queries_per_input == 1 + copies
    assert fetched.features.shape == clean.shape and fetched.views.shape == (TRAIN, copies, clean.shape[1])
    # each input's own clean features come first, then its copies (ordering bug: mismatched rows)
    assert torch.allclose(fetched.features, clean, atol=1e-5)
    assert (fetched.views - clean.unsqueeze(1)).norm(dim=-1).min() > 1e-3
    assert torch.equal(cached.views, fetched.views)
    with pytest.raises(ValueError, match="REaaS paths"):
        PathConfig("seaas-sc", augment=1)
