"""What makes an encoder a text encoder: the provider's vocabulary and token-embedding table E.

Threat model (README, "Text"): a text is a sequence of token ids; the encoder first looks each id up in E, whose
rows have unit l2 norm (the padding row is 0), and the rest of the encoder — the part the service bounds — reads
the sequence's embedding matrix. A perturbation is an l2 perturbation of that whole matrix (every position,
padding included), so R is in units of one token's embedding: substituting word a by word b moves the matrix by
||E[a] - E[b]|| <= 2. Insertions and deletions shift every later position and are not covered.

The embedding matrix is laid out as an "image" of shape [embed_dim, 1, max_length] (channels first, one row, one
column per position) so every image code path — validation, batching, bounds, F2I — serves text unchanged.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch

PAD, UNK = "<pad>", "<unk>"
#: lower-cased words (with an inner apostrophe: "don't") and single punctuation marks
TOKEN_PATTERN = r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]"


@dataclass(frozen=True)
class Vocabulary:
    """Token strings by id (0 is padding, 1 unknown), the fixed sequence length, and how text becomes tokens."""

    tokens: tuple[str, ...]
    max_length: int
    pattern: str = TOKEN_PATTERN
    lowercase: bool = True

    pad_id = 0
    unk_id = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", tuple(self.tokens))
        if self.tokens[:2] != (PAD, UNK):
            raise ValueError(f"a vocabulary starts with {PAD!r}, {UNK!r}; got {self.tokens[:2]}")
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("a vocabulary lists each token once")
        if self.max_length <= 0:
            raise ValueError(f"max_length must be positive, got {self.max_length}")
        object.__setattr__(self, "_ids", {token: index for index, token in enumerate(self.tokens)})
        object.__setattr__(self, "_regex", re.compile(self.pattern))

    @property
    def size(self) -> int:
        return len(self.tokens)

    def tokenize(self, text: str) -> list[str]:
        return self._regex.findall(text.lower() if self.lowercase else text)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids [len(texts), max_length] int64: cut after max_length tokens, padded with pad_id at the end."""
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.int64)
        for row, text in enumerate(texts):
            found = [self._ids.get(token, self.unk_id) for token in self.tokenize(text)[: self.max_length]]
            ids[row, : len(found)] = torch.tensor(found, dtype=torch.int64)
        return ids

    @classmethod
    def build(cls, texts: Iterable[str], size: int, max_length: int, *, min_count: int = 2,
              pattern: str = TOKEN_PATTERN) -> Vocabulary:
        """The `size - 2` most frequent tokens of `texts` seen at least `min_count` times (ties by token)."""
        regex = re.compile(pattern)
        counts = Counter(token for text in texts for token in regex.findall(text.lower()))
        ranked = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
        return cls(tokens=(PAD, UNK, *ranked[: size - 2]), max_length=max_length, pattern=pattern)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["tokens"] = list(self.tokens)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Vocabulary:
        return cls(**data)


@dataclass(frozen=True)
class TextInput:
    """A text encoder's front end: ``embedding`` [vocabulary size, embed_dim] float32, unit rows, zero pad row."""

    vocabulary: Vocabulary
    embedding: torch.Tensor

    def __post_init__(self) -> None:
        if self.embedding.shape[0] != self.vocabulary.size or self.embedding.dim() != 2:
            raise ValueError(f"embedding {tuple(self.embedding.shape)} does not fit {self.vocabulary.size} tokens")

    @property
    def embed_dim(self) -> int:
        return int(self.embedding.shape[1])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The encoder's continuous input: one sequence's embedding matrix as [embed_dim, 1, max_length]."""
        return (self.embed_dim, 1, self.vocabulary.max_length)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [batch, max_length] -> embedding matrices [batch, embed_dim, 1, max_length] (float32)."""
        table = self.embedding.to(token_ids.device)
        return table[token_ids].transpose(1, 2).unsqueeze(2).contiguous()
