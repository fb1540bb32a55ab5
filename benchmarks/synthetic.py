"""Synthetic benchmark data made from real MiniLM vectors, so large indexes cluster like real ones: vectors for
the ``scale`` section, and articles with their embedder for ``scale`` and ``postgres``. No model, no torch."""

from __future__ import annotations

import hashlib
import re

import numpy as np


class SyntheticEmbedder:
    """Deterministic vectors near real ones: a text is the normalised sum of its words' vectors, each word's
    vector being one of ``basis`` (real sentence vectors) picked by the word's hash. No model, no torch."""

    backend = "synthetic"

    def __init__(self, basis: np.ndarray, name: str, max_seq_length: int = 256):
        self.basis = np.asarray(basis, dtype=np.float32)
        self.name = name
        self.dimension = self.basis.shape[1]
        self.max_seq_length = max_seq_length
        self._ids: dict[str, int] = {}

    def _word(self, word: str) -> int:
        i = self._ids.get(word)
        if i is None:
            i = self._ids[word] = (int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little")
                                   % len(self.basis))
        return i

    def encode(self, texts, batch_size: int = 32, progress: bool = False) -> np.ndarray:
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            ids = [self._word(w) for w in re.findall(r"\w+", text.lower())] or [0]
            out[row] = self.basis[ids].sum(axis=0)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def count_tokens(self, text: str) -> int:
        return len(re.findall(r"\w+|[^\w\s]", text))


def seed_vocabulary(searcher) -> list[str]:
    """The alphabetic words of the indexed articles, sorted: what ``synthetic_articles`` draws from."""
    from qa_service.retrieval.lexical import words

    return sorted({w for a in searcher.articles() for w in words(a.text) if w.isalpha()})


def synthetic_articles(words: list[str], passages: int, per_article: int = 10, seed: int = 7):
    """``passages`` one-sentence paragraphs in articles of ``per_article``, Zipf-distributed words."""
    from qa_service.types import Article

    rng = np.random.default_rng(seed)
    words = [words[i] for i in rng.permutation(len(words))]  # frequency rank unrelated to spelling
    weights = 1.0 / np.arange(1, len(words) + 1)
    weights /= weights.sum()
    out = []
    for a in range(0, passages, per_article):
        paragraphs = []
        for _ in range(min(per_article, passages - a)):
            picked = rng.choice(len(words), size=int(rng.integers(12, 24)), p=weights)
            sentence = " ".join(words[i] for i in picked)
            paragraphs.append(sentence[:1].upper() + sentence[1:] + ".")
        text = "\n\n".join(paragraphs)
        day = 1 + a // per_article % 28
        out.append(Article(f"syn-{a // per_article:06d}", f"syn-{a // per_article:06d}.txt", f"Synthetic {a}",
                           f"2025-01-{day:02d}", text, hashlib.sha256(text.encode()).hexdigest()))
    return out


def synthetic_vectors(basis: np.ndarray, n: int, seed: int = 0, noise: float = 0.6) -> np.ndarray:
    """Return ``n`` unit vectors near the span of real ones: a point on a segment between two basis vectors,
    plus isotropic noise (norm ~``noise``), normalised. Clustered like real embeddings; uniform noise is not."""
    rng = np.random.default_rng(seed)
    d = basis.shape[1]
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        i, j = rng.integers(0, len(basis), m), rng.integers(0, len(basis), m)
        t = rng.random((m, 1), dtype=np.float32) * 0.5
        x = basis[i] + t * (basis[j] - basis[i]) + noise * rng.standard_normal((m, d), dtype=np.float32) / np.sqrt(d)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out
