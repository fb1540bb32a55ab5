"""The interface every index backend implements, and the pieces they share.

The ``Searcher`` (``retrieval/searcher.py``) holds the question encoder and does everything that is the same
whatever the storage (spelling variants, fusion, dates, reranking, answer sentences, grouping); a backend does
the storage's part. ``candidates`` is the heart of it: for one question, the union of the best dense and the best
lexical candidates with every piece of evidence fusion needs, so fusion stays one piece of code above.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from ..errors import InvalidRequest
from ..types import Article, ArticleInfo, Filters

ARTICLE_COLUMNS = "id, source, title, date, text, content_hash"  # in the order of ``Article``'s fields


@dataclass
class Evidence:
    """What a backend knows about candidate passages for one question (parallel arrays over ``pids``)."""

    pids: np.ndarray  # int64 passage ids
    passage_cosine: np.ndarray  # float32 cosine of the question and the passage vector
    sentence_cosines: list[np.ndarray]  # per passage, the cosine of each of its sentences, in order
    lexical: np.ndarray  # float32 raw lexical score of the passage (0 when no term matches)
    lexical_mix: np.ndarray | None  # float32 0..1 lexical evidence for convex fusion (None unless asked)
    dates: list[str | None]  # the date of each passage's article

    @classmethod
    def empty(cls) -> "Evidence":
        z = np.zeros(0, dtype=np.float32)
        return cls(np.zeros(0, dtype=np.int64), z, [], z, z, [])


class IndexBackend(Protocol):
    """The storage side of a ``Searcher`` (see the module docstring)."""

    manifest: dict  # model, dimension, build_id, encoder ... (what was indexed and how)

    def describe(self) -> str: ...  # where the index lives, for messages (never a password)

    def rebuild_hint(self) -> str: ...  # the command that (re)builds it

    @property
    def passage_count(self) -> int: ...

    @property
    def vocabulary(self): ...  # lexical.Vocabulary of the indexed words (spelling variants, answerability)

    def load_encoder(self): ...  # the index's torch-free question encoder, or None

    def snapshot(self) -> AbstractContextManager: ...  # one consistent view for the queries inside it

    @property
    def article_count(self) -> int: ...

    def articles(self) -> list[Article]: ...  # every article, with its text (read on demand: may be slow)

    def catalog(self) -> list[ArticleInfo]: ...  # every article's id, source, title and date (no text), by id

    def article(self, article_id: str) -> Article: ...  # raises ArticleNotFound

    def article_info(self, article_id: str) -> ArticleInfo: ...  # the same without the text (citations)

    def passage_count_for(self, article_id: str) -> int: ...

    def lead(self, article_id: str) -> str: ...  # its first sentence (BM25's context when it has no headline)

    def selection(self, filters: Filters | None): ...  # opaque; None: everything (raises unknown_source)

    def candidates(self, qvec: np.ndarray, lexical_text: str, pool: int, mode: str, selection,
                   lexical_mix: bool, weights: tuple[float, float],
                   background_docs: float = 0.0) -> Evidence: ...  # hybrid's idf blend (lexical.blended_idf)

    def passages(self, ids: Sequence[int]) -> dict[int, tuple[str, int, int, str]]: ...

    # (sentence id, start, end) of each sentence of passage ``pid``, in order; offsets into the article's text
    def passage_sentences(self, pid: int) -> list[tuple[int, int, int]]: ...

    def sentence_vectors(self, sids: Sequence[int]) -> np.ndarray: ...  # float32 [len(sids), d]

    def close(self) -> None: ...


def unknown_sources(unknown: Sequence[str]) -> InvalidRequest:
    """The error for a source filter naming articles the index does not hold."""
    return InvalidRequest(f"Unknown source(s): {', '.join(map(repr, unknown[:5]))}. "
                          "Use article ids or file names from /api/articles.", code="unknown_source")
