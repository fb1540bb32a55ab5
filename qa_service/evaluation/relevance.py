"""Relevance of a passage to a question-file question: from one of its sources and holding one of its answers."""

from __future__ import annotations

import re
import unicodedata

from .datasets import Question

_QUOTES = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'", "\u00b4": "'", "`": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2212": "-",
    "\u00ad": None, "\u200b": None, "\ufeff": None,
})
_SPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Fold Unicode compatibility forms, curly quotes, dashes and runs of whitespace; keep case."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).translate(_QUOTES)).strip()


def _matches_source(question: Question, article_id: str, source: str) -> bool:
    return source in question.sources or article_id in question.sources


def passage_is_relevant(question: Question, article_id: str, source: str, text: str,
                        _normalized: tuple[str, ...] | None = None) -> bool:
    """True when the passage comes from one of the question's sources and contains one of its answers."""
    if not question.answers or not _matches_source(question, article_id, source):
        return False
    answers = _normalized if _normalized is not None else tuple(normalize_text(a) for a in question.answers)
    folded = normalize_text(text)
    return any(a and a in folded for a in answers)


def passage_docno(article_id: str, start: int, end: int) -> str:
    return f"{article_id}@{start}-{end}"

