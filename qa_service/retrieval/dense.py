"""Dense retrieval over a FAISS inner-product index of L2-normalised vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class DenseIndex:
    """A loaded FAISS index answering top-k inner-product queries, optionally restricted to some ids."""

    def __init__(self, path: Path):
        import faiss

        self._faiss = faiss
        faiss.omp_set_num_threads(1)  # single queries are faster on one thread than two here
        self.index = faiss.read_index(str(path))

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(scores, ids)``, each ``[n_queries, k]``; missing slots have id -1.

        Args:
            queries: float32 ``[n, d]`` unit vectors.
            allowed: int64 passage ids the results must come from (None: all).
        """
        k = max(1, min(k, self.size)) if self.size else 1
        if self.size == 0 or (allowed is not None and len(allowed) == 0):
            n = len(queries)
            return np.zeros((n, k), dtype=np.float32), -np.ones((n, k), dtype=np.int64)
        params = None
        if allowed is not None:
            params = self._faiss.SearchParameters(sel=self._faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64)))
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)
        return scores, ids

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """Return the stored vectors of passages ``ids`` (float32 ``[len(ids), d]``)."""
        if len(ids) == 0:
            return np.zeros((0, self.index.d), dtype=np.float32)
        return self.index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))
