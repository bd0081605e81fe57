"""Choose the downstream head (kind x margin eps) on held-out *training* features, never on test inputs.

The client's training features are split (stratified, seeded) into a fit part and a validation part; every
candidate TrainConfig is trained on the fit part and scored on the validation part by its BC ACR in feature
space (the certified feature radius of bounds.certify_feature_radius, 0 where h is wrong). The best candidate
(optionally among those reaching a minimum validation accuracy) is retrained on all training features. The
features were fetched once, so selection sends no query; test features are not a parameter of anything here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from bounds import certify_feature_radius
from reaas_client.downstream import TrainConfig, train_classifier, training_rows
from reaas_client.heads import MARGIN_HEADS
from reaas_client.progress import bar


@dataclass(frozen=True)
class HeadSearch:
    """What to select over: head kinds x margins (the mlp ignores the margin, so it is one candidate), the
    validation fraction of the training features, and the least validation accuracy a candidate must reach.

    The margins reach past where the held-out frontier turns on PCA-64 digit features (held-out ACR rises to eps
    5-6 while accuracy falls, benchmarks/results/heads.md). The distance-unit loss no longer collapses a head at a
    large eps; a head no better than the majority class is still never chosen (select_head)."""

    heads: tuple[str, ...] = ("linear", "lipschitz")
    margins: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    validation_fraction: float = 0.2
    min_accuracy: float = 0.0
    method: str = "auto"

    def candidates(self, base: TrainConfig) -> list[TrainConfig]:
        """Every (head, margin) pair as a TrainConfig on top of `base` (its epochs, widths, noise, seed)."""
        grid: list[TrainConfig] = []
        for head in self.heads:
            margins = self.margins if head in MARGIN_HEADS else (base.margin,)
            grid += [replace(base, head=head, margin=margin) for margin in margins]
        return grid


@dataclass(frozen=True)
class CandidateScore:
    """One candidate's score on the validation features: clean accuracy and ACR of the feature radius."""

    config: TrainConfig
    validation_accuracy: float
    validation_acr: float


@dataclass(frozen=True)
class HeadSelection:
    """The chosen config, every candidate's score (in the order tried), and h: the chosen config retrained on
    all training features. `validation_indices` index the training features the scores were measured on."""

    chosen: TrainConfig
    scores: tuple[CandidateScore, ...]
    model: nn.Sequential = field(repr=False)
    validation_indices: torch.Tensor = field(repr=False)

    def table(self) -> str:
        """One line per candidate, the chosen one marked."""
        return "\n".join(
            f"{'*' if s.config == self.chosen else ' '} head={s.config.head:<9} eps={s.config.margin:<6g} "
            f"val_acc={s.validation_accuracy:.3f} val_ACR={s.validation_acr:.3f}" for s in self.scores)


def stratified_split(labels: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, validation) indices: round(fraction · n_c) of each class's n_c inputs, drawn by a seeded permutation,
    go to validation (at least one where the class has two or more)."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    fit, validation = [], []
    for label in labels.unique():
        members = (labels == label).nonzero().squeeze(1)
        members = members[torch.randperm(members.shape[0], generator=generator)]
        count = min(max(round(fraction * members.shape[0]), 1), members.shape[0] - 1) if members.shape[0] > 1 else 0
        validation.append(members[:count])
        fit.append(members[count:])
    return torch.cat(fit).sort().values, torch.cat(validation).sort().values


def score_head(model: nn.Module, features: torch.Tensor, labels: torch.Tensor, method: str = "auto"
               ) -> tuple[float, float]:
    """(clean accuracy, ACR) of h on features [N, dim]: the certified feature radius, 0 where h is wrong."""
    certificate = certify_feature_radius(model, features, method=method)
    correct = certificate.prediction == labels
    return float(correct.float().mean()), float(torch.where(correct, certificate.feature_radius, 0.0).mean())


def select_head(train_features: torch.Tensor, train_labels: torch.Tensor, num_classes: int,
                candidates: Sequence[TrainConfig], *, validation_fraction: float = 0.2, min_accuracy: float = 0.0,
                method: str = "auto", seed: int = 0, views: torch.Tensor | None = None) -> HeadSelection:
    """Train each candidate on the fit part of the *training* features [N, dim], score it on the held-out part,
    and retrain the best on all of them. `views` [N, K, dim]: features of augmented copies of each training input
    (FeatureSet.views); a fit input's copies train with it, a held-out input's are never used (scores are on
    clean held-out features only).

    Best: the highest validation ACR among candidates whose validation accuracy is >= `min_accuracy` and beats
    always answering the validation part's most common class (when none does, the most accurate candidate): a head
    no better than a constant one certifies huge, worthless radii (every input of its class, far out). Ties go to
    the earlier candidate. No test input is involved."""
    if not candidates:
        raise ValueError("no candidate head to select from")
    fit, validation = stratified_split(train_labels, validation_fraction, seed)
    scores = []
    for config in bar(candidates, desc="head selection", unit="head"):
        model = train_classifier(*training_rows(train_features, train_labels, views, fit), num_classes, config)
        scores.append(CandidateScore(config, *score_head(model, train_features[validation],
                                                        train_labels[validation], method)))
    majority = float(torch.bincount(train_labels[validation]).max()) / len(validation)
    eligible = [s for s in scores if s.validation_accuracy >= min_accuracy and s.validation_accuracy > majority]
    best = (max(eligible, key=lambda s: s.validation_acr) if eligible
            else max(scores, key=lambda s: s.validation_accuracy))
    model = train_classifier(*training_rows(train_features, train_labels, views), num_classes, best.config)
    return HeadSelection(best.config, tuple(scores), model, validation)
