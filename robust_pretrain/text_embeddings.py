"""Token embeddings without labels: PPMI co-occurrence + truncated SVD on the provider's text (Levy, Goldberg &
Dagan, TACL 2015), a classic word embedding that takes seconds on a CPU.

Counts of (token, context) pairs within ``window`` positions, PPMI(w, c) = max(0, log P(w, c) / (P(w) P_a(c)))
with the context distribution smoothed by ``context_power`` (0.75), then the top ``embed_dim`` singular triplets
of the sparse PPMI matrix; a token's row is U·S^p (``eigen_power`` p, 0.5 by default), scaled to unit l2 norm
(the threat model's unit: a word substitution moves the embedding matrix by at most 2). Measured on the first 500
Rotten Tomatoes test reviews (linear margin head, eps 0): p = 0 and p = 0.5 give the mean-pooled floor the same
accuracy / ACR (0.648 / 0.082 vs 0.652 / 0.079); p = 0 lifts random word features (text_bag_features) from 0.664
to 0.690 standardised-logistic accuracy and spreads the rows (median nearest-neighbour distance 0.72 vs 0.66).
The padding row is 0. The unknown token's row is the unit direction of the mean of all token rows: a generic word,
close to no particular one. Tokens never seen in a context keep a seeded random unit row.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch

from robust_pretrain.text_input import Vocabulary

DEFAULT_WINDOW = 4
CONTEXT_POWER = 0.75
EIGEN_POWER = 0.5


def cooccurrence_counts(token_ids: torch.Tensor, vocabulary_size: int, window: int = DEFAULT_WINDOW
                        ) -> scipy.sparse.csr_matrix:
    """Symmetric counts [V, V] of token pairs at most ``window`` positions apart in each row of ``token_ids``
    [N, length]; pad and unk ids take part in no pair."""
    ids = token_ids.numpy()
    rows, cols = [], []
    for offset in range(1, window + 1):
        left, right = ids[:, :-offset].ravel(), ids[:, offset:].ravel()
        keep = (left > Vocabulary.unk_id) & (right > Vocabulary.unk_id)
        rows += [left[keep], right[keep]]
        cols += [right[keep], left[keep]]
    rows_all, cols_all = np.concatenate(rows), np.concatenate(cols)
    counts = scipy.sparse.coo_matrix((np.ones(len(rows_all)), (rows_all, cols_all)),
                                     shape=(vocabulary_size, vocabulary_size))
    return counts.tocsr()


def ppmi(counts: scipy.sparse.csr_matrix, context_power: float = CONTEXT_POWER) -> scipy.sparse.csr_matrix:
    """Positive pointwise mutual information of a co-occurrence count matrix (context distribution smoothed)."""
    counts = counts.tocoo()
    total = counts.sum()
    word = np.asarray(counts.sum(axis=1)).ravel() / total
    context = np.asarray(counts.sum(axis=0)).ravel() ** context_power
    context = context / context.sum()
    values = np.log(counts.data / total / (word[counts.row] * context[counts.col]))
    keep = values > 0
    return scipy.sparse.csr_matrix((values[keep], (counts.row[keep], counts.col[keep])), shape=counts.shape)


def ppmi_svd_embedding(texts: list[str] | tuple[str, ...], vocabulary: Vocabulary, embed_dim: int, *,
                       window: int = DEFAULT_WINDOW, eigen_power: float = EIGEN_POWER, seed: int = 0
                       ) -> torch.Tensor:
    """The embedding table E [V, embed_dim] float32 of ``vocabulary`` fitted on ``texts`` (no labels):
    unit rows, zero pad row, unk row the unit mean direction (see the module docstring)."""
    token_ids = Vocabulary(vocabulary.tokens, max_length=max(len(vocabulary.tokenize(t)) for t in texts),
                           pattern=vocabulary.pattern, lowercase=vocabulary.lowercase).encode(texts)
    matrix = ppmi(cooccurrence_counts(token_ids, vocabulary.size, window))
    start = np.random.default_rng(seed).standard_normal(vocabulary.size)  # svds' start vector: deterministic
    left, singular, _ = scipy.sparse.linalg.svds(matrix, k=embed_dim, v0=start)
    order = np.argsort(-singular)
    rows = torch.from_numpy(left[:, order] * singular[order] ** eigen_power)
    norms = rows.norm(dim=1, keepdim=True)
    unseen = (norms.squeeze(1) == 0).nonzero().squeeze(1)
    rows[unseen] = torch.randn(len(unseen), embed_dim, generator=torch.Generator().manual_seed(seed),
                               dtype=rows.dtype)
    rows = rows / rows.norm(dim=1, keepdim=True)
    rows[Vocabulary.pad_id] = 0.0
    mean = rows[Vocabulary.unk_id + 1:].mean(dim=0)
    rows[Vocabulary.unk_id] = mean / mean.norm()
    return rows.to(torch.float32).contiguous()


def nearest_neighbour_distances(embedding: torch.Tensor) -> torch.Tensor:
    """[V - 1] for every non-pad token: the l2 distance from its row to the nearest other non-pad row (the size of
    the smallest one-word substitution for that token)."""
    rows = embedding[1:].to(torch.float64)
    distances = torch.cdist(rows, rows)
    distances.fill_diagonal_(float("inf"))
    return distances.min(dim=1).values.to(torch.float32)
