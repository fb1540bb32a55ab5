"""Fuse ranked lists: reciprocal rank fusion and a score-normalised convex combination.

Small free functions over arrays; scores in, one fused score per candidate out.
"""

from __future__ import annotations

import numpy as np


def ranks_of(scores: np.ndarray) -> np.ndarray:
    """Return 1-based ranks of ``scores`` (highest first; ties share the better rank order of appearance)."""
    order = np.argsort(-scores, kind="stable")
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.arange(1, len(scores) + 1)
    return ranks


def reciprocal_rank_fusion(score_lists: list[np.ndarray], weights: list[float], k: float = 60.0,
                           present: list[np.ndarray] | None = None) -> np.ndarray:
    """Return ``sum_i w_i / (k + rank_i)`` per candidate.

    Args:
        score_lists: one score array per retriever, aligned over the same candidates.
        present: per retriever, a boolean mask of candidates it actually retrieved; absent ones add 0.
    """
    fused = np.zeros(len(score_lists[0]), dtype=np.float64)
    for i, (scores, w) in enumerate(zip(score_lists, weights)):
        contrib = w / (k + ranks_of(scores))
        if present is not None:
            contrib = np.where(present[i], contrib, 0.0)
        fused += contrib
    return fused


def convex_fusion(dense: np.ndarray, lexical: np.ndarray, alpha: float) -> np.ndarray:
    """Return ``alpha * dense + (1 - alpha) * lexical`` per candidate.

    Both must be on a fixed scale: cosines are; the backends bring BM25 to 0..1 by dividing by the question's
    best BM25 score over the whole index (``Evidence.lexical_mix``).
    """
    return alpha * dense.astype(np.float64) + (1.0 - alpha) * lexical.astype(np.float64)
