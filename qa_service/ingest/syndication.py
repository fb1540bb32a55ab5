"""Syndicated copies: the same wire story carried by several outlets, found with MinHash LSH over word shingles.

Every article gets ``story``, the smallest article id of its group of near-copies (its own id when it has none).
Two articles are copies when the Jaccard similarity of their sets of five-word shingles is at least
``THRESHOLD`` and their dates (when both are known) are at most ``MAX_DAYS_APART`` days apart. LSH only proposes
candidates (at a lower threshold, so pairs just above ``THRESHOLD`` are not missed); each pair is then checked on
its exact shingle sets, so the estimate's noise never merges two stories. Articles that report one event in their
own words share few five-word runs and stay apart. The threshold was chosen on edited copies of the seed articles
against every pair of distinct articles; see docs/decisions/ingest-formats.md.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import replace
from datetime import date
from functools import lru_cache

from ..types import Article

SHINGLE_WORDS = 5
THRESHOLD = 0.5
LSH_THRESHOLD = 0.4  # candidates are proposed below THRESHOLD so that pairs just above it are not missed
MAX_DAYS_APART = 3
MIN_SHINGLES = 20  # shorter texts (a one-line summary) are too little evidence to call anything a copy
NUM_PERM = 128
_WORD = re.compile(r"\w+")
_FOLD = str.maketrans("‘’“”", "''\"\"")


def shingles(text: str, size: int = SHINGLE_WORDS) -> set[int]:
    """The set of ``size``-word runs of ``text`` (lower-cased, curly quotes folded), each as its CRC-32.

    A 32-bit checksum is what MinHash hashes to anyway, and computing it here once (in C) keeps datasketch from
    hashing every shingle again with SHA-1 in a Python loop.
    """
    words = _WORD.findall(text.translate(_FOLD).lower())
    return {zlib.crc32(" ".join(words[i:i + size]).encode()) for i in range(max(len(words) - size + 1, 0))}


def _identity(value: int) -> int:
    return value


def jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b|, 0 for two empty sets."""
    return len(a & b) / len(a | b) if a or b else 0.0


@lru_cache(maxsize=8)
def _bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """datasketch's optimal (bands, rows) for ``threshold``, found once: finding it integrates numerically."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


def _days_apart(a: str | None, b: str | None) -> int:
    if not a or not b:
        return 0  # an unknown date does not rule a copy out
    try:
        return abs((date.fromisoformat(a) - date.fromisoformat(b)).days)
    except ValueError:
        return 0


def assign_stories(articles: list[Article], threshold: float = THRESHOLD,
                   max_days_apart: int = MAX_DAYS_APART) -> list[Article]:
    """``articles`` in the same order, each with ``story`` set to the smallest id among its near-copies."""
    sets = [shingles(a.text) for a in articles]
    eligible = [i for i, s in enumerate(sets) if len(s) >= MIN_SHINGLES]
    parent = list(range(len(articles)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if len(eligible) > 1:
        from datasketch import MinHash, MinHashLSH  # imported when needed: it pulls in scipy

        lsh = MinHashLSH(num_perm=NUM_PERM, params=_bands(min(LSH_THRESHOLD, threshold), NUM_PERM))
        hashes = MinHash.bulk([sorted(sets[i]) for i in eligible], num_perm=NUM_PERM, hashfunc=_identity)
        for i, mh in zip(eligible, hashes):
            lsh.insert(i, mh)
        for i, mh in zip(eligible, hashes):
            for j in lsh.query(mh):
                if j <= i or root(i) == root(j):
                    continue
                if (_days_apart(articles[i].date, articles[j].date) <= max_days_apart
                        and jaccard(sets[i], sets[j]) >= threshold):
                    parent[root(j)] = root(i)
    story: dict[int, str] = {}
    for i, article in enumerate(articles):
        r = root(i)
        story[r] = min(story.get(r, article.id), article.id)
    return [replace(a, story=story[root(i)]) for i, a in enumerate(articles)]
