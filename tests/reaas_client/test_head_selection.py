"""Head selection: on a seeded stratified split of the training features only, every candidate scored, the best
retrained on all training features."""

from __future__ import annotations

import torch

from reaas_client import head_selection
from reaas_client.downstream import TrainConfig, train_classifier
from reaas_client.head_selection import HeadSearch, select_head, stratified_split


def blobs(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 3
    return 3.0 * torch.eye(3, 8)[labels] + torch.randn(count, 8, generator=generator), labels


def test_stratified_split_is_disjoint_seeded_and_class_balanced() -> None:
    labels = torch.arange(5).repeat_interleave(20)  # sorted by class
    fit, validation = stratified_split(labels, 0.2, seed=3)
    assert sorted(torch.cat([fit, validation]).tolist()) == list(range(100))
    assert torch.bincount(labels[validation], minlength=5).tolist() == [4] * 5
    assert torch.equal(validation, stratified_split(labels, 0.2, seed=3)[1])
    assert not torch.equal(validation, stratified_split(labels, 0.2, seed=4)[1])


def test_grid_gives_one_mlp_and_every_margin_of_a_margin_head() -> None:
    grid = HeadSearch(heads=("mlp", "linear"), margins=(0.5, 2.0)).candidates(TrainConfig(epochs=3))
    assert [(c.head, c.margin) for c in grid] == [("mlp", 1.0), ("linear", 0.5), ("linear", 2.0)]
    assert all(c.epochs == 3 for c in grid)


def test_selection_scores_only_held_out_training_features(monkeypatch) -> None:
    train, labels = blobs(150, 0)
    seen: list[torch.Tensor] = []
    certify = head_selection.certify_feature_radius

    def spy(model, features, **kwargs):
        seen.append(features.clone())
        return certify(model, features, **kwargs)

    monkeypatch.setattr(head_selection, "certify_feature_radius", spy)
    candidates = HeadSearch(heads=("linear",), margins=(0.0, 1.0, 3.0)).candidates(
        TrainConfig(epochs=15, lr=1e-2))
    selection = select_head(train, labels, 3, candidates, validation_fraction=0.2, seed=1)
    assert len(seen) == len(candidates) == len(selection.scores)
    validation = train[selection.validation_indices]
    assert all(torch.equal(features, validation) for features in seen)  # nothing but held-out training rows
    assert selection.validation_indices.shape[0] == 30
    best = max(selection.scores, key=lambda s: s.validation_acr)
    assert selection.chosen == best.config
    assert "*" in selection.table()
    # the returned h is the chosen config retrained on all the training features
    retrained = train_classifier(train, labels, 3, selection.chosen)
    assert all(torch.equal(a, b) for a, b in zip(retrained.state_dict().values(),
                                                 selection.model.state_dict().values(), strict=True))


def test_minimum_validation_accuracy_excludes_candidates() -> None:
    train, labels = blobs(150, 0)
    candidates = HeadSearch(heads=("linear",), margins=(0.5, 50.0)).candidates(TrainConfig(epochs=15, lr=1e-2))
    free = select_head(train, labels, 3, candidates, seed=1)
    strict = select_head(train, labels, 3, candidates, seed=1, min_accuracy=1.01)  # nobody qualifies
    assert strict.chosen == max(strict.scores, key=lambda s: s.validation_accuracy).config
    accurate = select_head(train, labels, 3, candidates, seed=1,
                           min_accuracy=max(s.validation_accuracy for s in free.scores))
    assert accurate.scores == free.scores
    assert all(s.validation_accuracy >= max(t.validation_accuracy for t in free.scores)
               for s in accurate.scores if s.config == accurate.chosen)


def test_a_head_no_better_than_the_majority_class_is_never_chosen_for_its_radius(monkeypatch) -> None:
    """A constant head certifies every input of its class far out; its ACR must not win it the selection."""
    train, labels = blobs(150, 0)
    candidates = HeadSearch(heads=("linear",), margins=(0.5, 1.0)).candidates(TrainConfig(epochs=15, lr=1e-2))
    constant_wins = {0.5: (10 / 30, 1e6), 1.0: (0.9, 1.0)}  # margin -> (validation accuracy, ACR); 10 of 30 per class
    monkeypatch.setattr(head_selection, "score_head",
                        lambda model, features, labels, method: constant_wins[model.margin_for_test])
    real_train = head_selection.train_classifier

    def tagged(features, labels, num_classes, config):
        model = real_train(features, labels, num_classes, config)
        model.margin_for_test = config.margin
        return model

    monkeypatch.setattr(head_selection, "train_classifier", tagged)
    chosen = select_head(train, labels, 3, candidates, seed=1)
    assert chosen.chosen.margin == 1.0


def test_a_prototype_head_competes_in_the_selection_at_every_margin() -> None:
    train, labels = blobs(150, 0)
    candidates = HeadSearch(heads=("linear", "prototype"), margins=(0.5, 1.5)).candidates(
        TrainConfig(epochs=15, prototypes=3))
    assert [(c.head, c.margin) for c in candidates] == [("linear", 0.5), ("linear", 1.5), ("prototype", 0.5),
                                                         ("prototype", 1.5)]
    selection = select_head(train, labels, 3, candidates, seed=1)
    assert all(s.validation_accuracy > 0.8 for s in selection.scores if s.config.head == "prototype")
    assert all(s.validation_acr > 0 for s in selection.scores)
