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
from ..ingest import lead_title
from ..types import Article, ArticleInfo, Filters

# The articles table's columns in the order of ``Article``'s fields, and of ``ArticleInfo``'s (no text; the lead
# title, computed when indexing, instead). Both backends store the same columns.
ARTICLE_COLUMNS = "id, source, title, date, text, content_hash, source_url, outlet, author, story, title_from"
INFO_COLUMNS = "id, source, title, date, source_url, outlet, author, story, title_from, lead_title"


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


def stored_lead_title(article: Article) -> str | None:
    """What the articles table keeps as ``lead_title``: the shortened lead of an article without a headline.

    The headline itself stays None, so what passages and sentences are embedded with (headline, else lead) is
    the same as before titles were shown for every article.
    """
    return None if article.title else (lead_title(article.text) or None)


def article_row(article: Article) -> tuple:
    """An article as a row of ``ARTICLE_COLUMNS`` followed by its lead title."""
    a = article
    return (a.id, a.source, a.title, a.date, a.text, a.content_hash, a.source_url, a.outlet, a.author, a.story,
            a.title_from, stored_lead_title(a))


def info_of(article: Article) -> ArticleInfo:
    """The ``ArticleInfo`` of an article read whole."""
    a = article
    return ArticleInfo(a.id, a.source, a.title, a.date, a.source_url, a.outlet, a.author, a.story, a.title_from,
                       stored_lead_title(a))


def unknown_sources(unknown: Sequence[str]) -> InvalidRequest:
    """The error for a source filter naming articles the index does not hold."""
    return InvalidRequest(f"Unknown source(s): {', '.join(map(repr, unknown[:5]))}. "
                          "Use article ids or file names from /api/articles.", code="unknown_source")
