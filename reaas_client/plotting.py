"""Certified accuracy versus input-space radius, one curve per certification path (PNG, Agg backend).

The radius lives where the encoder's input does: pixels for an image encoder, the embedding matrix for a text
encoder (README, "Text"), so the axis says which.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the demo and benchmarks run on machines without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from reaas_client.metrics import InputRecord, certified_accuracy  # noqa: E402

#: x-axis label per EncoderInfo.modality: a text encoder is certified on its embedding matrix, not on its tokens.
RADIUS_LABELS = {"image": "image-space l2 radius", "text": "embedding-space l2 radius"}


def plot_certified_accuracy(curves: Mapping[str, Sequence[InputRecord]], path: str | Path,
                            *, title: str = "", modality: str = "image") -> Path:
    """Write the certified-accuracy-vs-radius plot of every path in `curves` (label -> records); `modality`
    ("image" or "text", EncoderInfo.modality) names the space the radii are in."""
    largest = max((r.certified_radius for records in curves.values() for r in records), default=0.0)
    radii = np.linspace(0.0, max(largest * 1.05, 0.1), 200)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, records in curves.items():
        ax.plot(radii, [certified_accuracy(records, float(r)) for r in radii], label=label)
    ax.set_xlabel(RADIUS_LABELS.get(modality, f"{modality} l2 radius"))
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
