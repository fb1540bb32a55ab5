"""The default backend: one immutable build of an index directory, loaded into the serving process.

Vectors are a FAISS index (docs/decisions/ann-index.md), sentence vectors a memory-mapped ``.npy``, BM25 three
memory-mapped bm25s indexes (passages, word pairs, sentences), and text and offsets a read-only SQLite file
(``manifest.py`` names the files). Everything but article texts is read once at load; texts stay in SQLite and
are read when an article is asked for, so a worker's memory does not grow with the archive's text. A new build
is picked up by loading a new backend (the web app swaps searchers when ``CURRENT`` moves).
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import nullcontext
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import Settings
from ..embedding import load_index_encoder
from ..errors import ArticleNotFound, IndexCorrupt
from ..retrieval.dense import DenseIndex
from ..retrieval.lexical import LexicalIndex, Vocabulary
from ..manifest import LEXICAL, PASSAGES_DB, SENTENCE_VECTORS, VECTORS, VOCABULARY, read_manifest, rebuild_hint
from ..types import Article, ArticleInfo, Filters
from .base import ARTICLE_COLUMNS, INFO_COLUMNS, Evidence, unknown_sources

ARTICLE_CACHE = 256  # articles whose text a backend keeps in memory (the most recently asked for)
PASSAGE_CACHE = 4096  # passage rows a backend keeps in memory (~1.5 KB each; the longest kept go first)


def _article_reader(db: sqlite3.Connection, lock: threading.Lock):
    """Return a function reading one article, text included. It holds the connection, not the backend: a cache
    of a bound method would tie the backend into a reference cycle, and a replaced build's memory maps would
    then wait for the garbage collector instead of going with the last reference."""
    def read(article_id: str) -> Article:
        with lock:
            row = db.execute(f"SELECT {ARTICLE_COLUMNS} FROM articles WHERE id = ?", (article_id,)).fetchone()
        return Article(*row)

    return read


class FaissBackend:
    """Answer ``IndexBackend`` queries from the live build of ``settings.index_dir``."""

    def __init__(self, settings: Settings):
        index_dir = Path(settings.index_dir)
        manifest = read_manifest(index_dir)
        self.manifest = manifest
        self.index_dir = index_dir
        self._pin_encoder_threads = "encoder_cores" in settings.tuning
        build = Path(manifest["_build_dir"])
        try:
            self.dense = DenseIndex(build / VECTORS, manifest.get("faiss"))
            self._db = sqlite3.connect(f"file:{build / PASSAGES_DB}?mode=ro", uri=True, check_same_thread=False)
            rows = self._db.execute(f"SELECT {INFO_COLUMNS} FROM articles ORDER BY id").fetchall()
            self._meta = {r[0]: r[1:] for r in rows}  # id -> (source, title, date, ...); texts stay in SQLite
            prow = self._db.execute("SELECT article_id, first_sentence, last_sentence FROM passages "
                                    "ORDER BY id").fetchall()
            srow = self._db.execute('SELECT start, "end" FROM sentences ORDER BY id').fetchall()
            self.lexical = LexicalIndex.load(build / LEXICAL / "passages", len(prow))
            self.lexical_bigrams = LexicalIndex.load(build / LEXICAL / "bigrams", len(prow), "bigrams")
            self.lexical_sentences = LexicalIndex.load(build / LEXICAL / "sentences", len(srow))
            self._vocabulary = Vocabulary.load(build / VOCABULARY)
            # A plain array view of the mapped file: indexing an ``np.memmap`` goes through its subclass hooks on
            # every call, and an answer indexes this matrix three times (docs/decisions/hot-path-caches.md).
            self.sentence_matrix = np.load(build / SENTENCE_VECTORS, mmap_mode="r").view(np.ndarray)
        except (RuntimeError, sqlite3.DatabaseError, OSError, ValueError) as exc:
            raise IndexCorrupt(f"The index in {index_dir} cannot be read ({type(exc).__name__}). "
                               f"{rebuild_hint(index_dir)}") from exc
        self._lock = threading.Lock()
        self._article = lru_cache(maxsize=ARTICLE_CACHE)(_article_reader(self._db, self._lock))
        self._passage_rows: dict[int, tuple[str, int, int, str]] = {}  # ``passages``: rows read before
        ids = sorted(self._meta)
        self._article_pos = {a: i for i, a in enumerate(ids)}
        self._article_ids = ids
        self._passage_article = np.array([self._article_pos[r[0]] for r in prow], dtype=np.int32)
        self._passage_sentences = np.array([(r[1], r[2]) for r in prow], dtype=np.int64).reshape(-1, 2)
        self._sentence_spans = np.array(srow, dtype=np.int64).reshape(-1, 2)
        # Each article's first sentence (its lead, ``lead``): the smallest first sentence of its passages.
        none = np.iinfo(np.int64).max
        first = np.full(len(ids), none, dtype=np.int64)
        np.minimum.at(first, self._passage_article, self._passage_sentences[:, 0])
        self._first_sentence = np.where(first == none, -1, first)
        self._passage_counts = np.bincount(self._passage_article, minlength=len(ids)) if len(ids) else np.zeros(0, int)
        self._article_dates = [self._meta[a][2] for a in ids]
        if not (len(prow) == self.dense.size == self.lexical.size) or len(srow) != len(self.sentence_matrix):
            raise IndexCorrupt(f"The index in {index_dir} has {self.dense.size} vectors for "
                               f"{len(prow)} passages. {rebuild_hint(index_dir)}")

    # ------------------------------------------------------------------ what is indexed
    def describe(self) -> str:
        return str(self.index_dir)

    def rebuild_hint(self) -> str:
        return rebuild_hint(self.index_dir)

    @property
    def passage_count(self) -> int:
        return int(self.dense.size)

    @property
    def vocabulary(self) -> Vocabulary:
        return self._vocabulary

    def load_encoder(self):
        return load_index_encoder(self.manifest, pin_threads=self._pin_encoder_threads)

    def snapshot(self):
        return nullcontext()  # a build never changes once published

    @property
    def article_count(self) -> int:
        return len(self._article_ids)

    def articles(self) -> list[Article]:
        with self._lock:
            rows = self._db.execute(f"SELECT {ARTICLE_COLUMNS} FROM articles ORDER BY id").fetchall()
        return [Article(*r) for r in rows]

    def catalog(self) -> list[ArticleInfo]:
        return [ArticleInfo(a, *self._meta[a]) for a in self._article_ids]

    def article(self, article_id: str) -> Article:
        try:
            known = article_id in self._meta
        except TypeError:  # unhashable: not an id
            known = False
        if not known:
            raise ArticleNotFound(f"There is no article with id {article_id!r}.")
        return self._article(article_id)

    def article_info(self, article_id: str) -> ArticleInfo:
        """An indexed article's id, source, title, date and provenance, from memory: what a citation needs (no text
        read)."""
        return ArticleInfo(article_id, *self._meta[article_id])

    def passage_count_for(self, article_id: str) -> int:
        return int(self._passage_counts[self._article_pos[article_id]])

    def lead(self, article_id: str) -> str:
        """The article's first sentence ("" when it has none); raises ``ArticleNotFound``."""
        pos = self._article_pos.get(article_id) if isinstance(article_id, str) else None
        if pos is None:
            raise ArticleNotFound(f"There is no article with id {article_id!r}.")
        sid = int(self._first_sentence[pos])
        if sid < 0:
            return ""
        start, end = self._sentence_spans[sid]
        return self._article(article_id).text[int(start):int(end)]

    # ------------------------------------------------------------------ search
    def selection(self, filters: Filters | None) -> np.ndarray | None:
        """Return the passage ids ``filters`` allow (None: all)."""
        if filters is None or filters.is_empty():
            return None
        # Array work only, nothing per article in Python: at 1M articles a question with a filter must not pay
        # for a loop over the archive.
        keep = np.ones(len(self._article_ids), dtype=bool)
        if filters.sources:
            wanted = []
            unknown = []
            for s in filters.sources:
                a = s if s in self._meta else self._by_source.get(s)
                if a is None:
                    unknown.append(s)
                else:
                    wanted.append(self._article_pos[a])
            if unknown:
                raise unknown_sources(unknown)
            chosen = np.zeros(len(self._article_ids), dtype=bool)
            chosen[wanted] = True
            keep &= chosen
        if filters.date_from or filters.date_to:
            lo, hi = filters.date_from or "0000-00-00", filters.date_to or "9999-99-99"
            dates = self._date_array
            keep &= (dates != "") & (dates >= lo) & (dates <= hi)
        return np.flatnonzero(keep[self._passage_article]).astype(np.int64)

    @cached_property
    def _by_source(self) -> dict[str, str]:
        """File name -> article id, built on the first filter by file name (ids need no lookup)."""
        return {meta[0]: a for a, meta in self._meta.items()}

    @cached_property
    def _date_array(self) -> np.ndarray:
        """Every article's ISO date ("" when it has none), in article order, for vectorised date filters."""
        return np.array([d or "" for d in self._article_dates], dtype="U10")

    def candidates(self, qvec: np.ndarray, lexical_text: str, pool: int, mode: str, selection,
                   lexical_mix: bool, weights: tuple[float, float], background_docs: float = 0.0) -> Evidence:
        ids: set[int] = set()
        if mode in ("dense", "hybrid"):
            _, dids = self.dense.search(qvec.reshape(1, -1), pool, selection)
            ids.update(int(i) for i in dids[0] if i >= 0)
        lex_all = None
        if mode in ("lexical", "hybrid"):
            lex_all = self.lexical.scores(lexical_text, background_docs if mode == "hybrid" else 0.0)
            _, lids = self.lexical.search(lexical_text, pool, selection, scores=lex_all)
            ids.update(int(i) for i in lids)
        if not ids:
            return Evidence.empty()
        pids = np.array(sorted(ids), dtype=np.int64)
        lexical = np.zeros(len(pids), dtype=np.float32) if lex_all is None else lex_all[pids]
        sids, bounds = self._sentence_ids(pids)
        flat = np.asarray(self.sentence_matrix[sids]) @ qvec
        sentence_cosines = [flat[a:b] for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]  # np.split, faster
        mix = (self._lexical_mix(lexical_text, pids, lex_all, weights, sids, bounds, background_docs)
               if lexical_mix and lex_all is not None else None)
        return Evidence(pids, self.dense.vectors(pids) @ qvec, sentence_cosines, lexical, mix,
                        [self._article_dates[a] for a in self._passage_article[pids]])

    def _sentence_ids(self, pids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return the sentence ids of passages ``pids``, concatenated, and where each passage's run starts and ends."""
        first, last = self._passage_sentences[pids].T
        counts = np.maximum(last - first + 1, 0)
        bounds = np.zeros(len(pids) + 1, dtype=np.int64)
        np.cumsum(counts, out=bounds[1:])
        sids = np.arange(bounds[-1], dtype=np.int64) - np.repeat(bounds[:-1] - first, counts)
        return sids, bounds

    def _lexical_mix(self, text: str, pids: np.ndarray, passage_scores: np.ndarray,
                     weights: tuple[float, float], sids: np.ndarray, bounds: np.ndarray,
                     background_docs: float = 0.0) -> np.ndarray:
        """Return the lexical evidence of candidates ``pids`` on a 0..1 scale.

        Passage BM25, the BM25 of the passage's best sentence and BM25 over word pairs, each divided by
        its best score over the whole index for this question, then averaged with the configured weights.
        """
        def scaled(scores: np.ndarray, all_scores: np.ndarray) -> np.ndarray:
            top = float(all_scores.max()) if len(all_scores) else 0.0  # best over the index, not the candidates
            return scores / top if top > 0 else np.zeros_like(scores)

        sentence_all = self.lexical_sentences.scores(text, background_docs)
        sentence_best = np.zeros(len(pids), dtype=np.float32)
        has = bounds[1:] > bounds[:-1]
        if has.any():
            sentence_best[has] = np.maximum.reduceat(sentence_all[sids], bounds[:-1][has])
        bigram_all = self.lexical_bigrams.scores(text)
        ws, wb = weights
        mix = ((1 - ws) * scaled(passage_scores[pids], passage_scores) + ws * scaled(sentence_best, sentence_all)
               + wb * scaled(bigram_all[pids], bigram_all))
        return mix / (1 + wb)

    # ------------------------------------------------------------------ rows
    def passages(self, ids: Sequence[int]) -> dict[int, tuple[str, int, int, str]]:
        """Rows of passages ``ids`` that exist: (article id, start, end, text).

        The rows a question reads are kept (``PASSAGE_CACHE`` of them; a build never changes): most come back
        question after question (docs/decisions/hot-path-caches.md).
        """
        cache, out, missing = self._passage_rows, {}, []
        for pid in ids:
            pid = int(pid)
            row = cache.get(pid)
            if row is None:
                missing.append(pid)
            else:
                out[pid] = row
        if missing:
            marks = ",".join("?" * len(missing))
            with self._lock:
                rows = self._db.execute(f'SELECT id, article_id, start, "end", text FROM passages '
                                        f'WHERE id IN ({marks})', missing).fetchall()
                for r in rows:
                    out[r[0]] = cache[r[0]] = r[1:]
                while len(cache) > PASSAGE_CACHE:  # the oldest first (dicts keep insertion order)
                    del cache[next(iter(cache))]
        return out

    def passage_sentences(self, pid: int) -> list[tuple[int, int, int]]:
        first, last = self._passage_sentences[pid].tolist()
        return [(sid, s, e) for sid, (s, e) in
                zip(range(first, last + 1), self._sentence_spans[first:last + 1].tolist())]

    def sentence_vectors(self, sids: Sequence[int]) -> np.ndarray:
        return np.asarray(self.sentence_matrix[np.asarray(sids, dtype=np.int64)])

    def close(self) -> None:
        self._db.close()

