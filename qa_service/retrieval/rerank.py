"""Optional cross-encoder reranking of the best fused candidates (``--reranker NAME_OR_PATH``).

Off by default: no reranker ships offline, and a cross-encoder costs a transformer pass per candidate.
When set, the model is loaded once (lazily, with torch) and scores (question, passage) pairs.
"""

from __future__ import annotations

import logging
import os
from functools import cached_property
from typing import Sequence

import numpy as np

from ..errors import ModelNotFound

logger = logging.getLogger(__name__)


class CrossEncoderReranker:
    """Scores (question, passage) pairs with a sentence-transformers ``CrossEncoder``."""

    def __init__(self, name_or_path: str, top_n: int = 20):
        self.name = name_or_path
        self.top_n = top_n

    @cached_property
    def model(self):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from sentence_transformers import CrossEncoder

            return CrossEncoder(self.name, device="cpu")
        except Exception as exc:
            raise ModelNotFound(f"Could not load the reranker {self.name!r} without a network "
                                f"({type(exc).__name__}); give --reranker a local cross-encoder folder.") from exc

    def scores(self, question: str, passages: Sequence[str]) -> np.ndarray:
        """Return one relevance score per passage (higher is better)."""
        if not passages:
            return np.zeros(0, dtype=np.float32)
        return np.asarray(self.model.predict([(question, p) for p in passages], show_progress_bar=False),
                          dtype=np.float32).reshape(len(passages))
