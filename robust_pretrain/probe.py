"""Linear-probe evaluation of an encoder: the standard measure of what contrastive features are worth.

A multinomial logistic regression (one ``nn.Linear``) is fitted by L-BFGS on the frozen features of a
labelled training set and scored on a disjoint test set. Deterministic given the features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bounds.layers import module_device
from robust_pretrain.datasets import ImageSet


@dataclass(frozen=True)
class LinearProbe:
    """``classifier``: raw features [batch, dim] -> logits [batch, classes]; ``accuracy``: on the test set."""

    classifier: nn.Linear
    accuracy: float


@torch.no_grad()
def encode(model: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Features of ``images`` [N, C, H, W] -> [N, dim] on CPU; runs on the model's device, in eval mode."""
    device = module_device(model)
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(chunk.to(device)).cpu() for chunk in images.split(batch_size)])
    finally:
        model.train(was_training)


def linear_probe(
    model: nn.Module, train: ImageSet, test: ImageSet, *, l2: float = 1e-4, max_iterations: int = 200
) -> LinearProbe:
    """Fit a linear classifier on ``model``'s features of ``train``; report its accuracy on ``test``.

    Features are standardised with the training mean and std (folded back into the returned layer, so the
    classifier takes raw features), which makes L-BFGS converge alike for encoders of any feature scale.
    """
    train_features, test_features = encode(model, train.images).double(), encode(model, test.images).double()
    mean, std = train_features.mean(dim=0), train_features.std(dim=0).clamp_min(1e-8)
    standard = (train_features - mean) / std
    layer = nn.Linear(standard.shape[1], train.num_classes).double()
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    optimizer = torch.optim.LBFGS(layer.parameters(), max_iter=max_iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(layer(standard), train.labels) + l2 * layer.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    classifier = nn.Linear(standard.shape[1], train.num_classes)
    with torch.no_grad():
        classifier.weight.copy_(layer.weight / std)
        classifier.bias.copy_(layer.bias - (layer.weight / std) @ mean)
        accuracy = (classifier(test_features.float()).argmax(dim=1) == test.labels).float().mean().item()
    return LinearProbe(classifier=classifier, accuracy=accuracy)
