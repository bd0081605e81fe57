"""REaaS-SC's (head, sigma) selection on held-out training features: it never picks a candidate no better than the
majority class, it picks by held-out ACR among the rest, and it refuses an empty grid."""

from __future__ import annotations

import pytest
import torch

from reaas_client.downstream import TrainConfig
from reaas_client.smoothing_selection import better_than_majority, select_smoothing


def blobs(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 3
    return 4.0 * torch.eye(3, 6)[labels] + 0.5 * torch.randn(count, 6, generator=generator), labels


def test_selection_scores_every_candidate_and_picks_the_best_accurate_one() -> None:
    features, labels = blobs(240, 0)
    heads = {"linear": TrainConfig(head="linear", margin=0.5, epochs=30, lr=1e-2),
             "mlp": TrainConfig(hidden=(16,), epochs=30, lr=1e-2)}
    # sigma 20 drowns the blobs (4 apart): its smoothed classifier is no better than a guess
    chosen = select_smoothing(features, labels, 3, heads, [0.5, 20.0], holdout=60, n=200)
    assert [(s.head, s.sigma) for s in chosen.scores] == [("linear", 0.5), ("linear", 20.0), ("mlp", 0.5),
                                                          ("mlp", 20.0)]
    assert chosen.sigma == 0.5
    best = max((s for s in chosen.scores if s.sigma == 0.5), key=lambda s: s.acr)
    assert (chosen.head, chosen.sigma) == (best.head, best.sigma)
    assert all(s.accuracy > 0.9 for s in chosen.scores if s.sigma == 0.5)
    assert "*" in chosen.table()


def test_a_head_no_better_than_the_majority_never_competes() -> None:
    labels = torch.tensor([0, 0, 1, 2])
    assert better_than_majority([0.5, 0.9], lambda a: a, labels) == [0.9]
    assert better_than_majority([0.2, 0.4], lambda a: a, labels) == [0.4]  # none does: the most accurate


def test_an_empty_grid_or_holdout_is_refused() -> None:
    features, labels = blobs(30, 0)
    with pytest.raises(ValueError, match="at least one"):
        select_smoothing(features, labels, 3, {}, [0.5])
    with pytest.raises(ValueError, match="holdout"):
        select_smoothing(features, labels, 3, {"mlp": TrainConfig()}, [0.5], holdout=30)


def test_candidates_name_their_training_and_refuse_unknown_suffixes() -> None:
    from reaas_client.smoothing_selection import CONSISTENCY_WEIGHT, smoothing_candidates

    chosen, mlp, margin = TrainConfig(head="lipschitz", margin=4.0), TrainConfig(), TrainConfig(margin=2.0)
    candidates = smoothing_candidates(["selected", "mlp", "mlp+cr", "linear"], selected=chosen, mlp=mlp,
                                      margin=margin)
    assert candidates["selected"] == chosen and candidates["mlp"] == mlp
    assert candidates["mlp+cr"].consistency == CONSISTENCY_WEIGHT and candidates["mlp+cr"].head == "mlp"
    assert candidates["linear"].head == "linear" and candidates["linear"].margin == 2.0
    with pytest.raises(ValueError, match="suffix"):
        smoothing_candidates(["mlp+tta"], selected=chosen, mlp=mlp, margin=margin)
