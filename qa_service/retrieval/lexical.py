"""Lexical retrieval: BM25 (bm25s, Lucene variant) over folded, stemmed words, plus spelling-variant lookup.

Words are folded before anything else (Unicode compatibility forms, accents, curly quotes, case), so
"Iran’s" and "Iran's" are one word. Names spelled differently by different outlets (Araqchi / Araghchi,
Haniya / Haniyeh, al-Hayyah / al-Hayya) are matched by ``Vocabulary.correct``: a query word that no
passage contains is replaced by the closest word that passages do contain, compared on a transliteration
key (gh→q, j→y, doubled letters and a final "h" dropped) with rapidfuzz similarity. The rewrite also helps the
dense side, so the searcher embeds the corrected question (docs/decisions/name-variants.md).

A small index knows little about which words are rare. In five news articles "met" or "leadership" occur
in a passage or two and weigh more than "Haniyeh", which most passages name. Hybrid search therefore blends
each query term's idf with a background idf from general English word frequencies (wordfreq), weighted
as if the background were ``BACKGROUND_DOCS`` more texts (``blended_idf``); a large index barely moves
(docs/decisions/background-idf.md).
"""

from __future__ import annotations

import bisect
import json
import math
import re
import unicodedata
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Container, Iterable, Sequence

import numpy as np

_WORD = re.compile(r"\d+(?:[.,]\d+)*|[^\W\d_]+(?:['’][^\W\d_]+)?", re.UNICODE)
_QUOTES = str.maketrans({"’": "'", "‘": "'", "ʼ": "'", "“": '"', "”": '"', "„": '"', "–": "-", "—": "-"})

# BM25's term-frequency saturation and length normalisation (docs/decisions/bm25-parameters.md).
BM25_K1 = 0.9
BM25_B = 0.4
# Hybrid search's background idf (see the module docstring), for passage and sentence BM25 (word pairs keep
# their own idf: English has no frequency for a pair): it counts as this many texts beside the index's own,
# and a word's chance to occur in a text is its frequency in English times BACKGROUND_WORDS
# (docs/decisions/background-idf.md).
BACKGROUND_DOCS = 1000.0
BACKGROUND_WORDS = 100


def fold(text: str) -> str:
    """Return ``text`` lower-cased, without accents and with straight quotes."""
    text = text.translate(_QUOTES)
    if text.isascii():  # nothing to decompose (the common case, and far cheaper)
        return text.lower()
    text = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in text if not unicodedata.combining(ch)).lower()


def words(text: str) -> list[str]:
    """Return the folded words of ``text``; numbers keep their digits only ("47,400" → "47400")."""
    out = []
    for w in _WORD.findall(fold(text)):
        if w[0].isdigit():
            out.append(re.sub(r"[.,](?=\d{3}\b)", "", w))
        else:
            out.append(w[:-2] if w.endswith("'s") else w)
    return out


@lru_cache(maxsize=1)
def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


@lru_cache(maxsize=1)
def _stemmer():
    import Stemmer

    return Stemmer.Stemmer("english")


def analyze(text: str) -> list[str]:
    """Return the BM25 terms of ``text``: folded words, no stopwords, Snowball-stemmed."""
    stop = _stopwords()
    kept = [w for w in words(text) if w not in stop]
    return _stemmer().stemWords(kept) if kept else []


def bigrams(text: str) -> list[str]:
    """Return adjacent pairs of BM25 terms ("prison_exchang"): phrases shared with the question count extra."""
    return pairs(analyze(text))


def pairs(terms: Sequence[str]) -> list[str]:
    """Return the adjacent pairs of already analysed ``terms`` (what ``bigrams`` gives for their text)."""
    return [f"{a}_{b}" for a, b in zip(terms, terms[1:])]


ANALYZERS = {"terms": analyze, "bigrams": bigrams}


@lru_cache(maxsize=65536)
def background_idf(word: str) -> float:
    """The idf of a (folded) word in English: minus the log of its chance to occur in a text of
    ``BACKGROUND_WORDS`` words, from wordfreq's frequency."""
    from wordfreq import zipf_frequency

    # The small list holds English words of Zipf >= 3; rarer words and names count as Zipf 1 (1 in 10^8 words).
    zipf = max(1.0, zipf_frequency(word, "en", wordlist="small"))
    return -math.log(min(0.5, 10 ** (zipf - 9) * BACKGROUND_WORDS))


@lru_cache(maxsize=1024)
def background_idfs(text: str) -> dict[str, float]:
    """Return the background idf of each BM25 term of ``text`` (a term from several words: the rarest's)."""
    stop, stemmer = _stopwords(), _stemmer()
    out: dict[str, float] = {}
    for w in words(text):
        if w not in stop:
            term = stemmer.stemWord(w)
            out[term] = max(out.get(term, 0.0), background_idf(w))
    return out


def corpus_idf(df: float, n: float) -> float:
    """BM25's (Lucene) idf of a term found in ``df`` of ``n`` texts."""
    return math.log(1 + (n - df + 0.5) / (df + 0.5))


def blended_idf(idf: float, background: float | None, n: float, background_docs: float) -> float:
    """Return ``idf`` (from ``n`` texts) blended with a ``background`` idf counted as ``background_docs`` texts."""
    if background is None or background_docs <= 0:
        return idf
    return (n * idf + background_docs * background) / (n + background_docs)


@lru_cache(maxsize=1024)
def _question_terms(analyzer: str, question: str) -> tuple[str, ...]:
    """A question's terms for ``LexicalIndex.scores``: one question is scored against passages, sentences and
    word pairs (two of them with the same analyser), so its analysis is remembered, not redone."""
    return tuple(ANALYZERS[analyzer](question))


def translit_key(word: str) -> str:
    """Return a spelling-insensitive key for a transliterated name."""
    w = word.lower()
    if w.startswith("al-") or w.startswith("el-"):
        w = w[3:]
    w = w.replace("-", "").replace("'", "")
    w = w.replace("gh", "q").replace("kh", "k").replace("j", "y").replace("ou", "u")
    w = re.sub(r"(.)\1+", r"\1", w)  # doubled letters
    w = re.sub(r"(?<=[aeiouy])h$", "", w)  # Haniyeh → Haniye, Hayyah → Haya
    w = re.sub(r"e$", "a", w)
    return w


class Vocabulary:
    """The surface words of the indexed passages, for spelling-variant correction of questions."""

    MIN_LEN = 5
    CUTOFF = 84.0

    def __init__(self, counts: dict[str, int]):
        self.counts = counts
        self._by_key: dict[str, str] = {}  # key -> most frequent spelling
        self._all_by_key: dict[str, list[str]] = {}
        for word, _n in sorted(counts.items(), key=lambda kv: -kv[1]):
            if len(word) >= self.MIN_LEN and word.replace("-", "").isalpha():
                key = translit_key(word)
                self._by_key.setdefault(key, word)
                self._all_by_key.setdefault(key, []).append(word)
        self._keys = list(self._by_key)

    @cached_property
    def _ordered(self) -> list[str]:
        """The indexed words, sorted on first use (the web worker's warm-up): most questions never need them."""
        return sorted(self.counts)

    def has_prefix(self, prefix: str) -> bool:
        """Does some indexed word start with ``prefix`` (folded)? ("turk" for "Turkey"; ``answer.unfamiliar_names``)"""
        i = bisect.bisect_left(self._ordered, prefix)
        return i < len(self._ordered) and self._ordered[i].startswith(prefix)

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "Vocabulary":
        counts: dict[str, int] = {}
        for text in texts:
            for w in set(words(text)) | set(_hyphenated(text)):
                counts[w] = counts.get(w, 0) + 1
        return cls(counts)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.counts, ensure_ascii=False, sort_keys=True), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> "Vocabulary":
        return cls(json.loads(path.read_text(encoding="utf-8")))

    def variants(self, word: str, known: Container[str] = frozenset()) -> list[str]:
        """Return indexed spellings of ``word`` other than itself (same transliteration key, or close).

        ``known``: words of the language (``embedding.whole_words`` of the model's tokenizer). One of them that
        no passage holds is not a misspelling: only its same-key spellings count, not merely close words
        ("forums" is not "forms", "diplomatic" not "diplomacy"; "Galant" still finds "Gallant").
        """
        w = fold(word)
        if len(w) < self.MIN_LEN or not w.replace("-", "").isalpha():
            return []
        key = translit_key(w)
        same = [v for v in self._all_by_key.get(key, ()) if v != w]
        if same or w in self.counts or w in known:
            return same
        from rapidfuzz import fuzz, process

        best = process.extractOne(key, self._keys, scorer=fuzz.ratio, score_cutoff=self.CUTOFF)
        return [self._by_key[best[0]]] if best else []

    def correct(self, question: str, known: Container[str] = frozenset()) -> tuple[str, dict[str, list[str]]]:
        """Return ``question`` with unindexed spellings replaced by indexed ones, and every variant found.

        The corrected question suits the dense side (one vector, in the corpus's spelling); the
        variants, appended to the question, let BM25 match every spelling the passages use. ``known``: see
        ``variants``.
        """
        found: dict[str, list[str]] = {}

        def swap(match: re.Match) -> str:
            token = match.group(0)
            options = self.variants(token, known)
            if not options:
                return token
            # prefer the spelling that keeps the question's form ("al-Hayyah" → "al-Hayya")
            options.sort(key=lambda o: ("-" in o) != ("-" in token))
            found[token] = options
            if fold(token) in self.counts:
                return token
            return _match_case(token, options[0])

        corrected = re.sub(r"(?:[A-Za-z]{1,3}-)?[^\W\d_]+", swap, question)
        return corrected, found


def _hyphenated(text: str) -> list[str]:
    return [m.lower() for m in re.findall(r"\b[A-Za-z]{1,3}-[A-Za-z]{3,}\b", fold(text))]


def _match_case(original: str, replacement: str) -> str:
    """Give ``replacement`` the capitalisation of ``original`` ("al-Hayyah" → "al-Hayya")."""
    head, _, name = original.rpartition("-")
    r_head, _, r_name = replacement.rpartition("-")
    if name[:1].isupper():
        r_name = r_name[:1].upper() + r_name[1:]
    if r_head and head[:1].isupper():
        r_head = r_head[:1].upper() + r_head[1:]
    return f"{r_head}-{r_name}" if r_head else r_name


class LexicalIndex:
    """BM25 over texts (passages or sentences), with terms or bigrams; ``search`` can be restricted to ids."""

    def __init__(self, bm25, size: int, analyzer: str = "terms"):
        self.bm25 = bm25
        self.size = size
        self.analyzer = analyzer

    @classmethod
    def build(cls, texts: Sequence[str], analyzer: str = "terms") -> "LexicalIndex":
        return cls.from_terms([ANALYZERS[analyzer](t) for t in texts], analyzer)

    @classmethod
    def from_terms(cls, corpus: Sequence[Sequence[str]], analyzer: str = "terms") -> "LexicalIndex":
        """Index texts already analysed by ``ANALYZERS[analyzer]`` (one term list per text)."""
        import bm25s

        bm25 = bm25s.BM25(k1=BM25_K1, b=BM25_B, method="lucene")
        if corpus:
            bm25.index([list(terms) or [""] for terms in corpus], show_progress=False)
        return cls(bm25, len(corpus), analyzer)

    def save(self, folder: Path) -> None:
        self.bm25.save(str(folder))

    @classmethod
    def load(cls, folder: Path, size: int, analyzer: str = "terms") -> "LexicalIndex":
        import bm25s

        # Memory-mapped: the score matrices are read from the page cache, shared by every worker, instead of
        # copied into each (docs/decisions/bm25-parameters.md).
        bm25 = bm25s.BM25.load(str(folder), mmap=True)
        # Plain array views of the same mapped memory: indexing an ``np.memmap`` runs its subclass hooks on every
        # call, and a question indexes these matrices dozens of times.
        bm25.scores = {k: v.view(np.ndarray) if isinstance(v, np.memmap) else v for k, v in bm25.scores.items()}
        return cls(bm25, size, analyzer)

    def scores(self, question: str, background_docs: float = 0.0) -> np.ndarray:
        """Return the BM25 score of every text for ``question`` (float32 ``[size]``).

        Args:
            background_docs: blend each term's idf with its background idf (``blended_idf``); 0: plain BM25.
        """
        terms = [t for t in _question_terms(self.analyzer, question) if t in self.bm25.vocab_dict]
        if not terms or self.size == 0:
            return np.zeros(self.size, dtype=np.float32)
        if background_docs <= 0:
            return np.asarray(self.bm25.get_scores(terms), dtype=np.float32)
        # bm25s stores idf x the term-frequency part per (term, text), a column per term: rescale each column.
        background = background_idfs(question)
        matrix = self.bm25.scores
        data, indices, indptr = matrix["data"], matrix["indices"], matrix["indptr"]
        rows, values = [], []
        for term in terms:
            tid = self.bm25.vocab_dict[term]
            start, end = int(indptr[tid]), int(indptr[tid + 1])
            idf = corpus_idf(end - start, self.size)
            rows.append(indices[start:end])
            values.append(np.float32(blended_idf(idf, background.get(term), self.size, background_docs) / idf)
                          * data[start:end])
        out = np.zeros(self.size, dtype=np.float32)
        np.add.at(out, np.concatenate(rows), np.concatenate(values))  # summed as bm25s sums
        return out

    def search(self, question: str, k: int, allowed: np.ndarray | None = None,
               scores: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(scores, ids)`` of the best ``k`` texts with a positive BM25 score, best first."""
        all_scores = self.scores(question) if scores is None else scores
        if allowed is not None:
            masked = np.zeros_like(all_scores)
            masked[allowed] = all_scores[allowed]
            all_scores = masked
        order = top_positive(all_scores, k)
        return all_scores[order], order


TOP_BLOCK = 64  # ``top_positive``: texts per block whose maximum bounds the k-th best score from below


def top_positive(scores: np.ndarray, k: int) -> np.ndarray:
    """Return the ids of the ``k`` highest positive ``scores``, best first; equal scores by id.

    On a large index most texts share some frequent term with a question, and selecting among all of them was the
    costliest step of a lexical search (docs/decisions/bm25-parameters.md). Instead: the k-th largest of
    the maxima of blocks of ``TOP_BLOCK`` texts is a lower bound of the k-th best score (k blocks reach it, each
    through at least one text), so every text of the top k, ties at the k-th score included, scores at least
    that much; only those few are ranked.
    """
    k = max(0, int(k))
    n = len(scores)
    if k == 0 or n == 0:
        return np.zeros(0, dtype=np.int64)
    blocks = n // TOP_BLOCK
    if blocks >= 4 * k:
        maxima = scores[: blocks * TOP_BLOCK].reshape(blocks, TOP_BLOCK).max(axis=1)
        bound = float(np.partition(maxima, blocks - k)[blocks - k])
        candidates = np.flatnonzero(scores >= bound) if bound > 0 else np.flatnonzero(scores > 0)
    else:
        candidates = np.flatnonzero(scores > 0)
    candidates = candidates[scores[candidates] > 0]
    order = candidates[np.lexsort((candidates, -scores[candidates]))][:k]
    return order.astype(np.int64)
