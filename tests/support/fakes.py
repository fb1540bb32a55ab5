"""A deterministic fake embedder for unit tests: hashed bag of words, no model, no torch."""

from __future__ import annotations

import hashlib
import re
from typing import Sequence

import numpy as np

from qa_service.embedding import normalize_rows

_WORD = re.compile(r"\w+", re.UNICODE)


class FakeEmbedder:
    """Each lower-cased word hashes to a fixed random unit vector; a text is their normalised sum."""

    name = "fake-hash-64"
    dimension = 64
    max_seq_length = 256

    def __init__(self):
        self.calls = 0

    def _word_vector(self, word: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "little")
        return np.random.default_rng(seed).standard_normal(self.dimension).astype(np.float32)

    def encode(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in _WORD.findall(text.lower()):
                out[i] += self._word_vector(word)
        return normalize_rows(out)

    def count_tokens(self, text: str) -> int:
        # roughly like WordPiece: words plus punctuation marks
        return len(re.findall(r"\w+|[^\w\s]", text))
