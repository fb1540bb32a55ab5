"""Split articles into sentence-aware, overlapping passages with exact character offsets.

``split_article`` (one article) and ``split_articles`` (many, on forked workers when there are many) are the
one way to cut an article; both give a ``Layout``: the article's sentence units and its passage windows.

Sentences come from sentencex (a compiled rule-based segmenter that handles "Oct. 7", "U.S.", decimals and
quotes), with a few news-specific merges on top ("Jan.19" style dates) (docs/decisions/sentence-splitting.md).
Offsets are located in the article text by search from a moving cursor, so ``article.text[start:end] ==
passage.text`` holds by construction, whatever the segmenter does with whitespace. Token counting is most of
cutting, so for tokenizers whose counts add up a window is measured by summing its sentences' counts
(``pack_sentences``, ``additive``) (docs/decisions/chunking-token-counts.md).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import re
import signal
import threading
from typing import Callable, NamedTuple, Sequence

from sentencex import segment

from .types import Article, Passage

TokenCounter = Callable[[str], int]

# A "sentence" ending in one of these is not a sentence end (segmenters miss a few news forms).
_NO_BREAK_AFTER = re.compile(
    r"(?:\b(?:Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec|Mr|Mrs|Ms|Dr|Gen|Lt|Col|Sen|Rep|Gov|St|No|Vol|vs)\.|\b[A-Z]\.)$"
)


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
        for sent in segment("en", ptext):
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


# What may stand between two sentences for a whitespace-splitting tokenizer to count them apart and joined alike:
# ASCII whitespace, which Python, tokenizers' BertNormalizer (whitespace -> " ") and BertPreTokenizer all treat as
# a word break (Python's str.isspace also takes control characters that BertNormalizer deletes instead).
_PLAIN_GAP = re.compile(r"[ \t\n\r]+")

PARALLEL_MIN_TEXTS = 32  # fewer texts than this are cut in this process: a pool would cost more than it saves
_JOB: tuple | None = None  # (count_tokens, max_tokens, overlap, additive) for forked workers: inherited, never pickled
_JOB_LOCK = threading.Lock()
_FORKS_FORBIDDEN = False  # set by ``forbid_forks``: this process answers questions and never forks


class Layout(NamedTuple):
    """How one article is cut: its sentence units (character spans) and its passages, each a ``(first, last)``
    pair of unit indices (inclusive)."""

    sentences: list[tuple[int, int]]
    windows: list[tuple[int, int]]

    def passages(self, article: Article) -> list[Passage]:
        """The passages of ``article`` (the article this layout was cut from)."""
        units, text = self.sentences, article.text
        return [Passage(article.id, units[i][0], units[j][1], text[units[i][0]:units[j][1]]) for i, j in self.windows]


def split_article(article: Article, count_tokens: TokenCounter, max_tokens: int = 128, overlap_sentences: int = 1,
                  additive: bool = False) -> Layout:
    """Cut ``article`` into passages of whole sentences, each at most ``max_tokens`` tokens (``Layout.passages``
    gives them as ``Passage`` records).

    Args:
        count_tokens: the embedding model's tokenizer, as text -> number of tokens (no specials).
        overlap_sentences: how many trailing sentences of a passage start the next one.
        additive: see ``pack_sentences``.
    """
    return _layout(article.text, count_tokens, max_tokens, overlap_sentences, additive)


def split_articles(articles: Sequence[Article], count_tokens: TokenCounter, max_tokens: int = 128,
                   overlap_sentences: int = 1, *, additive: bool = False, processes: int | None = None
                   ) -> list[Layout]:
    """``split_article`` each of ``articles``: on ``processes`` forked workers (default: one per core) when there
    are at least ``PARALLEL_MIN_TEXTS`` of them and this process may fork (``can_fork``), else here, one after
    another. Either way the result is the same.

    Cutting is a build's slowest step after embedding and runs before it, so a large build cuts on every core.
    Forked workers start in milliseconds, inherit the token counter (it is not pickled) and run only the splitter
    and the tokenizer (docs/decisions/chunking-token-counts.md).
    """
    global _JOB
    texts = [a.text for a in articles]
    n = min(processes or cores(), len(texts) // max(1, PARALLEL_MIN_TEXTS // 2) or 1)
    if n < 2 or len(texts) < PARALLEL_MIN_TEXTS or not can_fork():
        return [_layout(t, count_tokens, max_tokens, overlap_sentences, additive) for t in texts]
    with _JOB_LOCK:
        _JOB = (count_tokens, max_tokens, overlap_sentences, additive)
        pool = fork_pool(n)
        try:
            layouts = pool.map(_layout_in_worker, texts, chunksize=max(1, len(texts) // (n * 8)))
            pool.close()  # the workers finish and exit by themselves
            pool.join()
            return layouts
        finally:
            pool.terminate()  # after an error or Ctrl-C: stop them
            _JOB = None


def _layout(text: str, count_tokens: TokenCounter, max_tokens: int, overlap_sentences: int, additive: bool
            ) -> Layout:
    """A text's sentence units (``counted_units``) and its passage windows over them (``pack_sentences``)."""
    units, counts = counted_units(text, count_tokens, max_tokens, additive)
    return Layout(units, pack_sentences(text, units, count_tokens, max_tokens, overlap_sentences, counts, additive))


def _layout_in_worker(text: str) -> Layout:
    count_tokens, max_tokens, overlap_sentences, additive = _JOB
    return _layout(text, count_tokens, max_tokens, overlap_sentences, additive)


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def forbid_forks() -> None:
    """Mark this process as one that answers questions (every ``Searcher`` does this): it never forks from now on.

    Such a process (a web worker) has started the encoder's thread pools and may have other threads inside the
    encoder, the tokenizer or FAISS at any moment. A forked child keeps only the forking thread: every lock the
    others held stays held and their thread pools are gone, and a cut needs the tokenizer. So an upload there
    cuts and writes its lexical files in this process, serially (docs/decisions/fork-after-model.md).
    """
    global _FORKS_FORBIDDEN
    _FORKS_FORBIDDEN = True


def can_fork() -> bool:
    """Whether this process may start forked workers: fork exists here, this is not a pool's (daemonic) worker,
    and it does not answer questions (``forbid_forks``)."""
    return (not _FORKS_FORBIDDEN and not multiprocessing.current_process().daemon
            and "fork" in multiprocessing.get_all_start_methods())


def fork_pool(n: int):
    """A pool of ``n`` forked workers that inherit this process's memory (what they need is never pickled).

    Callers check ``can_fork`` first, close and join the pool when done, and terminate it after an error.
    """
    if not can_fork():
        raise RuntimeError("this process may not fork (it answers questions, or is a pool's worker); check can_fork()")
    return multiprocessing.get_context("fork").Pool(n, initializer=_worker_signals)


def _worker_signals() -> None:
    """In a forked worker: Ctrl-C is left to the parent, which stops the pool (no traceback from every worker),
    and SIGTERM stops the worker even where the parent only notes it (a gunicorn worker's handler)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _split_long(text: str, start: int, end: int, max_tokens: int, count: TokenCounter, additive: bool = False
                ) -> tuple[list[tuple[int, int]], list[int]]:
    """Cut one over-long sentence into word-boundary pieces that fit ``max_tokens``; return them and their counts.

    ``additive`` (see ``pack_sentences``): each word is counted once and a piece is measured by their sum, instead
    of counting the growing piece's text after every word it takes (about one count per word of the sentence)."""
    words = [(m.start() + start, m.end() + start) for m in re.finditer(r"\S+", text[start:end])]
    joined = _joined_counter(text, words, count, [count(text[s:e]) for s, e in words] if additive else None)
    pieces: list[tuple[int, int]] = []
    counts: list[int] = []
    i = 0
    while i < len(words):
        j = i + 1
        while j < len(words) and joined(i, j) <= max_tokens:
            j += 1
        pieces.append((words[i][0], words[j - 1][1]))
        counts.append(joined(i, j - 1))
        i = j
    return pieces, counts


def _joined_counter(text: str, spans: Sequence[tuple[int, int]], count_tokens: TokenCounter,
                    own: Sequence[int] | None) -> Callable[[int, int], int]:
    """Return ``joined(i, j)``: the token count of ``text`` from span ``i``'s start to span ``j``'s end.

    ``own``: each span's own count when ``count_tokens`` adds up (``pack_sentences``'s ``additive``); then spans
    separated only by ``_PLAIN_GAP`` are measured by the sum of their counts, and anything else on the text."""
    if own is None:
        return lambda i, j: count_tokens(text[spans[i][0]:spans[j][1]])
    summed = list(itertools.accumulate(own, initial=0))  # summed[j + 1] - summed[i]: spans i..j
    odd = [0]  # odd[j] - odd[i]: gaps among spans i..j that are not plain whitespace
    for (_, end), (start, _) in zip(spans, spans[1:]):
        odd.append(odd[-1] + (_PLAIN_GAP.fullmatch(text, end, start) is None))

    def joined(i: int, j: int) -> int:
        if odd[j] == odd[i]:
            return summed[j + 1] - summed[i]
        return count_tokens(text[spans[i][0]:spans[j][1]])

    return joined


def counted_units(text: str, count_tokens: TokenCounter, max_tokens: int = 128, additive: bool = False
                  ) -> tuple[list[tuple[int, int]], list[int]]:
    """Return the sentence spans passages are built from (over-long sentences cut to fit ``max_tokens``), and each
    unit's token count (``pack_sentences`` starts from them). ``additive``: see ``pack_sentences``."""
    units: list[tuple[int, int]] = []
    counts: list[int] = []
    for start, end in split_sentences(text):
        n = count_tokens(text[start:end])
        if n > max_tokens:
            pieces, piece_counts = _split_long(text, start, end, max_tokens, count_tokens, additive)
            units.extend(pieces)
            counts.extend(piece_counts)
        else:
            units.append((start, end))
            counts.append(n)
    return units, counts


def pack_sentences(
    text: str,
    sentences: Sequence[tuple[int, int]],
    count_tokens: TokenCounter,
    max_tokens: int,
    overlap_sentences: int,
    sentence_tokens: Sequence[int] | None = None,
    additive: bool = False,
) -> list[tuple[int, int]]:
    """Group consecutive sentence spans into windows that fit ``max_tokens``.

    Returns ``(first, last)`` sentence indices (inclusive) of each window: from its first sentence, as many
    following ones as fit. Where a window ends is guessed from the sentences' own token counts (a WordPiece
    count of sentences joined by whitespace is their sum) and then settled by counting the window's text, so
    that, whatever the tokenizer, the window fits and one more sentence would not. That is two counts of a
    whole window instead of one per sentence it holds. ``sentence_tokens``: each sentence's own count, when
    known (``counted_units``).

    ``additive``: ``count_tokens`` is known to count two texts joined by whitespace as the sum of their counts
    (``embedding.token_counts_add_up``: a WordPiece tokenizer that splits words at whitespace). Then a window
    whose sentences are separated by plain whitespace (``_PLAIN_GAP``) is measured by that sum, the same number
    its text would give, without counting its text (docs/decisions/chunking-token-counts.md). Windows with
    anything else between their sentences are still counted on their text.
    """
    n = len(sentences)
    if not n:
        return []
    own = list(sentence_tokens) if sentence_tokens is not None else [count_tokens(text[s:e]) for s, e in sentences]
    joined = _joined_counter(text, sentences, count_tokens, own if additive else None)

    def fits(i: int, j: int) -> bool:
        return joined(i, j) <= max_tokens

    windows: list[tuple[int, int]] = []
    i = 0
    while i < n:
        j, total = i, own[i]  # guess: the sum of the sentences' own counts
        while j + 1 < n and total + own[j + 1] <= max_tokens:
            j += 1
            total += own[j]
        while j > i and not fits(i, j):  # settle it on the window's text
            j -= 1
        while j + 1 < n and fits(i, j + 1):
            j += 1
        windows.append((i, j))
        if j + 1 >= n:
            break
        # Step forward, keeping up to `overlap_sentences` of context, but always advancing.
        i = max(i + 1, j + 1 - overlap_sentences)
    return windows
