"""Randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019): one core for both SC paths.

The smoothed classifier is g(x) = argmax_c P(b(x + e) = c), e ~ N(0, sigma^2 I), for a base classifier b.
`Smooth` runs the paper's PREDICT and CERTIFY on *any* base classifier and *any* source of noisy samples:

* REaaS-SC: the samples are f(x) + e in feature space, drawn locally (`GaussianFeatureSamples`); b = h.
* SEaaS-SC: the samples are features of noisy images x + e streamed through the encoder service
  (`reaas_client.seaas.StreamedImageSamples`); b = h, so the smoothing happens in image space.

The core does no I/O and knows nothing about gRPC; a sample source only yields base-classifier inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from scipy.stats import binomtest, norm
from statsmodels.stats.proportion import proportion_confint

ABSTAIN = -1
"""Prediction returned when the smoothed classifier abstains."""

BaseClassifier = Callable[[torch.Tensor], torch.Tensor]
"""Maps a batch of base-classifier inputs [batch, ...] to predicted labels [batch] int64."""

SampleSource = Callable[[int, torch.Generator], Iterable[torch.Tensor]]
"""`source(num, generator)` yields batches of noisy base-classifier inputs, `num` samples in all."""


@dataclass(frozen=True)
class SmoothPrediction:
    """PREDICT's answer: `prediction` is ABSTAIN or a class; `samples` noisy samples were classified."""

    prediction: int
    samples: int


@dataclass(frozen=True)
class SmoothCertificate:
    """CERTIFY's answer for one input.

    With probability at least 1 - alpha over the noise, if `prediction` != ABSTAIN then g(x') = prediction
    for every x' with ||x' - x||_2 < `radius` (in the space the noise was added in). `p_a_lower` is the
    Clopper-Pearson lower confidence bound of P(b(x + e) = prediction); `samples` = n0 + n.
    """

    prediction: int
    radius: float
    p_a_lower: float
    samples: int


class Smooth:
    """Cohen et al.'s smoothed classifier around `base_classifier` with noise level `sigma`."""

    def __init__(self, base_classifier: BaseClassifier, num_classes: int, sigma: float) -> None:
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.base_classifier = base_classifier
        self.num_classes = num_classes
        self.sigma = sigma

    def certify(
        self, source: SampleSource, n0: int, n: int, alpha: float, generator: torch.Generator
    ) -> SmoothCertificate:
        """Select the top class with `n0` samples, estimate its probability with `n` fresh ones.

        Guarantee (Cohen et al., Thm. 1 + Prop. 2): with probability at least 1 - alpha, a non-abstained
        prediction equals g(x) and g is constant on the l2 ball of radius sigma * Phi^-1(p_A_lower).
        Abstains (radius 0) when p_A_lower <= 1/2.
        """
        c_hat = int(self._count_votes(source, n0, generator).argmax())
        n_a = int(self._count_votes(source, n, generator)[c_hat])
        p_a_lower = self._lower_confidence_bound(n_a, n, alpha)
        if p_a_lower <= 0.5:
            return SmoothCertificate(ABSTAIN, 0.0, p_a_lower, n0 + n)
        return SmoothCertificate(c_hat, float(self.sigma * norm.ppf(p_a_lower)), p_a_lower, n0 + n)

    def predict(self, source: SampleSource, n: int, alpha: float, generator: torch.Generator) -> SmoothPrediction:
        """Return g(x), or ABSTAIN; the probability of returning a class other than g(x) is at most alpha."""
        counts = self._count_votes(source, n, generator)
        top2 = counts.topk(2)
        n_a, n_b = int(top2.values[0]), int(top2.values[1])
        if binomtest(n_a, n_a + n_b, p=0.5).pvalue > alpha:
            return SmoothPrediction(ABSTAIN, n)
        return SmoothPrediction(int(top2.indices[0]), n)

    def _count_votes(self, source: SampleSource, num: int, generator: torch.Generator) -> torch.Tensor:
        """Class counts [num_classes] of the base classifier on exactly `num` noisy samples."""
        counts = torch.zeros(self.num_classes, dtype=torch.int64)
        seen = 0
        with torch.no_grad():
            for batch in source(num, generator):
                labels = self.base_classifier(batch).cpu()
                counts += torch.bincount(labels, minlength=self.num_classes)[: self.num_classes]
                seen += labels.shape[0]
        if seen != num:
            raise RuntimeError(f"sample source yielded {seen} samples, {num} requested")
        return counts

    @staticmethod
    def _lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
        """One-sided (1 - alpha) Clopper-Pearson lower bound of a binomial proportion n_a / n."""
        return float(proportion_confint(n_a, n, alpha=2 * alpha, method="beta")[0])


def label_classifier(model: torch.nn.Module) -> BaseClassifier:
    """Wrap a logits model [batch, d] -> [batch, classes] as a base classifier returning argmax labels."""
    device = next(model.parameters()).device

    def classify(batch: torch.Tensor) -> torch.Tensor:
        return model(batch.to(device=device, dtype=torch.float32)).argmax(dim=1)

    return classify


@dataclass(frozen=True)
class GaussianFeatureSamples:
    """REaaS-SC sample source: f(x) + e, e ~ N(0, sigma^2 I), drawn locally in `batch_size` chunks.

    `features` is f(x) [feature_dim]. No query is sent: the whole point of REaaS-SC. The noise is drawn where the
    generator lives (a CUDA generator draws it on the GPU: 10^5 noisy 784-pixel copies cost 0.4 s of one CPU core),
    so the samples stay on that device for h.
    """

    features: torch.Tensor
    sigma: float
    batch_size: int = 10_000

    def __call__(self, num: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        center = self.features.detach().to(generator.device, torch.float32).reshape(1, -1)
        remaining = num
        while remaining > 0:
            size = min(self.batch_size, remaining)
            noise = torch.randn((size, center.shape[1]), generator=generator, dtype=torch.float32,
                                device=generator.device)
            yield center + self.sigma * noise
            remaining -= size
