"""The client's downstream task, image or text, as the tensors the certification paths take.

Images are what they are. Texts become token ids with the *provider's* tokenizer and vocabulary, fetched from the
service (GetVocabulary, no query): the client cannot embed on its own, because the embedding table is the
provider's, so the ids are what it sends (README, "Text").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from reaas_client.client import EncoderClient

#: Labelled text data sets (robust_pretrain.text_data.TEXT_DATASETS); kept here so --help needs no data import.
TEXT_DATASETS: tuple[str, ...] = ("rt-embedded", "sst2", "imdb")
#: Share of a user's single-file text data set (sst2, imdb) held out as its test set.
TEXT_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class DownstreamData:
    """Training and test inputs with labels: images [N, C, H, W] float, or token ids [N, max_length] int64."""

    name: str
    train_inputs: torch.Tensor
    train_labels: torch.Tensor
    test_inputs: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int

    @property
    def modality(self) -> str:
        return "image" if self.train_inputs.is_floating_point() else "text"


def is_text_dataset(name: str) -> bool:
    return name in TEXT_DATASETS


def load_downstream(name: str, path: Path | None, client: EncoderClient) -> DownstreamData:
    """Data set `name` (image: robust_pretrain.DATASETS; text: TEXT_DATASETS) ready for `client`'s encoder.

    rt-embedded uses the fixed seeded split robust_pretrain.text_data.REVIEW_SPLIT (10 000 / 2 808 reviews); a
    user's sst2 / imdb file is split seeded, TEXT_TEST_FRACTION held out. A text set on an image encoder (or the
    reverse) is refused here, before any query, with the encoder's modality in the message."""
    modality = client.info().modality or "image"
    wanted = "text" if is_text_dataset(name) else "image"
    if modality != wanted:
        raise ValueError(f"data set {name!r} is {wanted}, but the service's encoder reads {modality} "
                         f"(EncoderInfo.modality)")
    if wanted == "image":
        from robust_pretrain import load_dataset

        train, test = load_dataset(name, path, "train"), load_dataset(name, path, "test")
        return DownstreamData(name, train.images, train.labels, test.images, test.labels, train.num_classes)
    from robust_pretrain.text_data import REVIEW_SPLIT, load_text_dataset, split_text_set

    texts = load_text_dataset(name, path)
    if name == "rt-embedded":
        sizes = REVIEW_SPLIT
    else:
        held_out = max(1, round(len(texts) * TEXT_TEST_FRACTION))
        sizes = (len(texts) - held_out, held_out)
    train, test = split_text_set(texts, sizes)
    vocabulary = client.vocabulary()
    return DownstreamData(name, vocabulary.encode(train.texts), train.labels, vocabulary.encode(test.texts),
                          test.labels, len(texts.classes))
