"""Split an article into sentence-aware, overlapping passages with exact character offsets.

Sentences come from pysbd (rule-based, handles "Oct. 7", "U.S.", decimals and quotes); a few
news-specific merges are applied on top ("Jan.19" style dates). Offsets are located in the
article text by search from a moving cursor, so ``article.text[start:end] == passage.text``
holds by construction, whatever the segmenter does with whitespace.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Callable, Sequence

from .types import Article, Passage

TokenCounter = Callable[[str], int]

# A "sentence" ending in one of these is not a sentence end (pysbd misses a few news forms).
_NO_BREAK_AFTER = re.compile(
    r"(?:\b(?:Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec|Mr|Mrs|Ms|Dr|Gen|Lt|Col|Sen|Rep|Gov|St|No|Vol|vs)\.|\b[A-Z]\.)$"
)


@lru_cache(maxsize=1)
def _segmenter():
    import pysbd

    return pysbd.Segmenter(language="en", clean=False, char_span=False)


def split_sentences(text: str, offset: int = 0) -> list[tuple[int, int]]:
    """Return ``(start, end)`` spans of the sentences of ``text`` (shifted by ``offset``).

    Spans exclude surrounding whitespace; paragraphs (blank-line separated) never share a sentence.
    """
    spans: list[tuple[int, int]] = []
    for para in re.finditer(r"[^\n]+(?:\n(?!\s*\n)[^\n]+)*", text):
        pstart = para.start()
        cursor = 0
        ptext = para.group()
        pieces: list[tuple[int, int]] = []
        for sent in _segmenter().segment(ptext):
            stripped = sent.strip()
            if not stripped:
                continue
            idx = ptext.find(stripped, cursor)
            if idx < 0:  # segmenter changed the text: fall back to the rest of the paragraph
                rest = ptext[cursor:].strip()
                if rest:
                    idx = ptext.index(rest, cursor)
                    pieces.append((idx, idx + len(rest)))
                cursor = len(ptext)
                break
            pieces.append((idx, idx + len(stripped)))
            cursor = idx + len(stripped)
        # Merge pieces that were split after an abbreviation the segmenter did not know.
        merged: list[tuple[int, int]] = []
        for start, end in pieces:
            if merged and _NO_BREAK_AFTER.search(ptext[merged[-1][0]:merged[-1][1]]):
                merged[-1] = (merged[-1][0], end)
            else:
                merged.append((start, end))
        spans.extend((offset + pstart + s, offset + pstart + e) for s, e in merged)
    return spans


def _split_long(text: str, start: int, end: int, max_tokens: int, count: TokenCounter) -> list[tuple[int, int]]:
    """Cut one over-long sentence into word-boundary pieces that fit ``max_tokens``."""
    words = [(m.start() + start, m.end() + start) for m in re.finditer(r"\S+", text[start:end])]
    pieces: list[tuple[int, int]] = []
    i = 0
    while i < len(words):
        j = i + 1
        while j < len(words) and count(text[words[i][0]:words[j][1]]) <= max_tokens:
            j += 1
        pieces.append((words[i][0], words[j - 1][1]))
        i = j
    return pieces


def sentence_units(article: Article, count_tokens: TokenCounter, max_tokens: int = 128) -> list[tuple[int, int]]:
    """Return the sentence spans passages are built from (over-long sentences cut to fit ``max_tokens``)."""
    text = article.text
    units: list[tuple[int, int]] = []
    for start, end in split_sentences(text):
        if count_tokens(text[start:end]) > max_tokens:
            units.extend(_split_long(text, start, end, max_tokens, count_tokens))
        else:
            units.append((start, end))
    return units


def split_article(
    article: Article,
    count_tokens: TokenCounter,
    max_tokens: int = 128,
    overlap_sentences: int = 1,
) -> list[Passage]:
    """Split ``article`` into passages of whole sentences, each at most ``max_tokens`` tokens.

    Args:
        count_tokens: the embedding model's tokenizer, as text -> number of tokens (no specials).
        overlap_sentences: how many trailing sentences of a passage start the next one.
    """
    units = sentence_units(article, count_tokens, max_tokens)
    text = article.text
    return [Passage(article.id, units[i][0], units[j][1], text[units[i][0]:units[j][1]])
            for i, j in pack_sentences(text, units, count_tokens, max_tokens, overlap_sentences)]


def pack_sentences(
    text: str,
    sentences: Sequence[tuple[int, int]],
    count_tokens: TokenCounter,
    max_tokens: int,
    overlap_sentences: int,
) -> list[tuple[int, int]]:
    """Group consecutive sentence spans into windows that fit ``max_tokens``.

    Returns ``(first, last)`` sentence indices (inclusive) of each window.
    """
    windows: list[tuple[int, int]] = []
    i = 0
    n = len(sentences)
    while i < n:
        j = i + 1
        while j < n and count_tokens(text[sentences[i][0]:sentences[j][1]]) <= max_tokens:
            j += 1
        windows.append((i, j - 1))
        if j >= n:
            break
        # Step forward, keeping up to `overlap_sentences` of context, but always advancing.
        i = max(i + 1, j - overlap_sentences)
    return windows
