"""Unit-length rows and mean pooling of token vectors over character ranges, shared by both encoders."""

from __future__ import annotations

from typing import Sequence

import numpy as np

# A group of character ranges of one text; pooling a group means the mean of the token vectors inside any of
# its ranges, plus the special tokens ([CLS], [SEP]) a mean-pooling model always averages in.
Group = Sequence[tuple[int, int]]


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Return ``vectors`` (float32 ``[n, d]``) scaled to unit L2 norm; zero rows stay zero."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"expected a 2-d array, got shape {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return np.ascontiguousarray(vectors / norms, dtype=np.float32)


def pool_groups(tokens: np.ndarray, offsets: np.ndarray, special: np.ndarray, groups: Sequence[Group]) -> np.ndarray:
    """Return one unit vector per group, mean-pooled from one text's token vectors (NaN rows: no token inside).

    Sentence vectors are pooled this way from their passage's pass (docs/decisions/pooled-sentence-vectors.md).

    Args:
        tokens: ``[T, d]`` the transformer's token vectors of the text (no padding).
        offsets: ``[T, 2]`` each token's character span in the text.
        special: ``[T]`` True for special tokens, which every group includes (as the model's own mean does).
    """
    out = np.full((len(groups), tokens.shape[1]), np.nan, dtype=np.float32)
    starts, ends = offsets[:, 0], offsets[:, 1]
    real = (ends > starts) & ~special
    for g, ranges in enumerate(groups):
        inside = np.zeros(len(tokens), dtype=bool)
        for a, b in ranges:
            inside |= (starts >= a) & (ends <= b)
        inside &= real
        if inside.any():
            vector = tokens[inside | special].mean(axis=0)
            out[g] = vector / max(float(np.linalg.norm(vector)), 1e-12)
    return out
