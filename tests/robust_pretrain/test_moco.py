import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_pretrain.adversarial import instance_adversary
from robust_pretrain.moco import MoCo, contrastive_loss


def _moco(queue_size=6, momentum=0.9):
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    return MoCo(encoder, (1, 4, 4), 4, queue_size=queue_size, momentum=momentum, temperature=0.5)


def test_logits_are_cosines_over_temperature_with_the_positive_first():
    moco = _moco()
    queries, keys = torch.randn(3, 4), torch.randn(3, 4)
    logits = moco.logits(queries, keys)
    assert logits.shape == (3, 1 + 6)
    expected_positive = F.cosine_similarity(queries, keys) / 0.5
    assert torch.allclose(logits[:, 0], expected_positive, atol=1e-6)
    assert torch.allclose(logits[:, 1:], F.normalize(queries, dim=1) @ moco.queue / 0.5, atol=1e-6)


def test_momentum_update_moves_key_encoder_towards_query_encoder():
    moco = _moco(momentum=0.9)
    with torch.no_grad():
        for parameter in moco.encoder_q.parameters():
            parameter.add_(1.0)
    before = [p.clone() for p in moco.encoder_k.parameters()]
    moco.encode_keys(torch.rand(2, 1, 4, 4))
    for old, key, query in zip(before, moco.encoder_k.parameters(), moco.encoder_q.parameters(), strict=True):
        assert torch.allclose(key, 0.9 * old + 0.1 * query)
        assert not key.requires_grad


def test_queue_is_a_ring_buffer_of_normalised_keys():
    moco = _moco(queue_size=5)
    first, second = torch.randn(3, 4), torch.randn(3, 4)
    moco.enqueue(first)
    moco.enqueue(second)
    assert int(moco.queue_ptr) == 1
    assert torch.allclose(moco.queue[:, 3:5].T, F.normalize(second[:2], dim=1))
    assert torch.allclose(moco.queue[:, 0], F.normalize(second[2], dim=0))
    assert torch.allclose(moco.queue[:, 1:3].T, F.normalize(first[1:], dim=1))


def test_forward_repeats_keys_for_extra_query_views():
    moco = _moco()
    view = torch.rand(4, 1, 4, 4)
    keys = moco.encode_keys(view[:2])
    logits, labels, queries, product = moco(view, keys)
    assert logits.shape == (4, 7) and labels.tolist() == [0, 0, 0, 0] and queries.shape == (4, 4)
    assert torch.allclose(logits[2:, 0], F.cosine_similarity(queries[2:], keys) / 0.5, atol=1e-6)
    assert product.requires_grad and product.item() > 0


@pytest.mark.parametrize("epsilon", [0.3, 1.0])
def test_instance_adversary_stays_in_the_ball_and_raises_the_loss(epsilon):
    moco = _moco()
    views = torch.rand(16, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    keys = moco.encode_keys(views)
    attacked = instance_adversary(
        moco,
        views,
        keys,
        epsilon=epsilon,
        step_size=epsilon / 2,
        steps=10,
        generator=torch.Generator().manual_seed(2),
    )
    assert (attacked - views).flatten(1).norm(dim=1).max() <= epsilon + 1e-5
    assert attacked.min() >= 0.0 and attacked.max() <= 1.0
    labels = torch.zeros(16, dtype=torch.long)
    clean = contrastive_loss(moco.logits(moco.encoder_q(views), keys), labels)
    adversarial = contrastive_loss(moco.logits(moco.encoder_q(attacked), keys), labels)
    assert adversarial > clean
    assert all(p.grad is None for p in moco.encoder_q.parameters())
