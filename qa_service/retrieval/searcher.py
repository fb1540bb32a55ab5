"""The one search path: a ``Searcher`` owns a loaded index and the query encoder.

The CLI, the web app and the evaluation script all call ``Searcher.search`` / ``Searcher.ask``, so
the three ways of use can never disagree.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import Settings
from ..embedding import Embedder, load_embedder
from ..errors import ArticleNotFound, IndexCorrupt, IndexMismatch, InvalidRequest
from ..store import PASSAGES_DB, VECTORS, check_model, read_manifest, rebuild_hint
from ..types import Article, Citation, Filters, Hit
from .dense import DenseIndex

logger = logging.getLogger(__name__)


class Searcher:
    """Answer questions from one index directory."""

    def __init__(self, settings: Settings | None = None, embedder: Embedder | None = None):
        self.settings = settings or Settings.from_env()
        index_dir = Path(self.settings.index_dir)
        manifest = read_manifest(index_dir)
        if embedder is None:
            check_model(manifest, self.settings.model, index_dir)
            embedder = load_embedder(self.settings.model)
        elif manifest.get("model") != embedder.name:
            raise IndexMismatch(f"The index in {index_dir} was built with model {manifest.get('model')!r}, "
                                f"not {embedder.name!r}. {rebuild_hint(index_dir)}")
        if embedder.dimension != manifest.get("dimension"):
            raise IndexMismatch(f"The index in {index_dir} holds {manifest.get('dimension')}-d vectors but the model "
                                f"makes {embedder.dimension}-d ones. {rebuild_hint(index_dir)}")
        self.embedder = embedder
        self.manifest = manifest
        build = Path(manifest["_build_dir"])
        try:
            self.dense = DenseIndex(build / VECTORS)
            self._db = sqlite3.connect(f"file:{build / PASSAGES_DB}?mode=ro", uri=True, check_same_thread=False)
            rows = self._db.execute("SELECT id, source, title, date, text, content_hash FROM articles ORDER BY id").fetchall()
            self._articles = {r[0]: Article(*r) for r in rows}
            art_rows = self._db.execute("SELECT article_id FROM passages ORDER BY id").fetchall()
        except (RuntimeError, sqlite3.DatabaseError) as exc:
            raise IndexCorrupt(f"The index in {index_dir} cannot be read ({type(exc).__name__}). {rebuild_hint(index_dir)}") from exc
        self._lock = threading.Lock()
        ids = sorted(self._articles)
        self._article_pos = {a: i for i, a in enumerate(ids)}
        self._article_ids = ids
        self._passage_article = np.array([self._article_pos[r[0]] for r in art_rows], dtype=np.int32)
        self._passage_counts = np.bincount(self._passage_article, minlength=len(ids)) if len(ids) else np.zeros(0, int)
        if len(self._passage_article) != self.dense.size:
            raise IndexCorrupt(f"The index in {index_dir} has {self.dense.size} vectors for "
                               f"{len(self._passage_article)} passages. {rebuild_hint(index_dir)}")

    # ------------------------------------------------------------------ articles
    @property
    def model_name(self) -> str:
        return self.embedder.name

    @property
    def passage_count(self) -> int:
        return int(self.dense.size)

    def articles(self) -> list[Article]:
        return [self._articles[a] for a in self._article_ids]

    def article(self, article_id: str) -> Article:
        try:
            return self._articles[article_id]
        except (KeyError, TypeError):
            raise ArticleNotFound(f"There is no article with id {article_id!r}.") from None

    def passage_count_for(self, article_id: str) -> int:
        return int(self._passage_counts[self._article_pos[article_id]])

    # ------------------------------------------------------------------ search
    def _allowed_passages(self, filters: Filters | None) -> np.ndarray | None:
        if filters is None or filters.is_empty():
            return None
        keep = np.ones(len(self._article_ids), dtype=bool)
        if filters.sources:
            by_name = {a.source: a.id for a in self._articles.values()}
            wanted = set()
            unknown = []
            for s in filters.sources:
                if s in self._articles:
                    wanted.add(s)
                elif s in by_name:
                    wanted.add(by_name[s])
                else:
                    unknown.append(s)
            if unknown:
                raise InvalidRequest(f"Unknown source(s): {', '.join(map(repr, unknown[:5]))}. "
                                     "Use article ids or file names from /api/articles.", code="unknown_source")
            keep &= np.array([a in wanted for a in self._article_ids])
        if filters.date_from or filters.date_to:
            lo, hi = filters.date_from or "0000-00-00", filters.date_to or "9999-99-99"
            keep &= np.array([bool(self._articles[a].date) and lo <= self._articles[a].date <= hi
                              for a in self._article_ids])
        return np.flatnonzero(keep[self._passage_article]).astype(np.int64)

    def _passages(self, ids: Sequence[int]) -> dict[int, tuple[str, int, int, str]]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        with self._lock:
            rows = self._db.execute(f'SELECT id, article_id, start, "end", text FROM passages WHERE id IN ({marks})',
                                    [int(i) for i in ids]).fetchall()
        return {r[0]: r[1:] for r in rows}

    def encode_questions(self, questions: Sequence[str]) -> np.ndarray:
        return self.embedder.encode(list(questions), batch_size=self.settings.batch_size)

    def search(self, question: str, k: int = 5, filters: Filters | None = None,
               query_vector: np.ndarray | None = None) -> list[Hit]:
        """Return the top ``k`` passages for ``question``, best first."""
        return self.search_many([question], k, filters,
                                None if query_vector is None else query_vector.reshape(1, -1))[0]

    def search_many(self, questions: Sequence[str], k: int = 5, filters: Filters | None = None,
                    query_vectors: np.ndarray | None = None) -> list[list[Hit]]:
        """Search several questions at once (embedded in one batch)."""
        allowed = self._allowed_passages(filters)
        vectors = self.encode_questions(questions) if query_vectors is None else query_vectors
        scores, ids = self.dense.search(vectors, k, allowed)
        rows = self._passages(sorted({int(i) for i in ids.ravel() if i >= 0}))
        out: list[list[Hit]] = []
        for qscores, qids in zip(scores, ids):
            hits = []
            for score, pid in zip(qscores, qids):
                if pid < 0:
                    continue
                article_id, start, end, text = rows[int(pid)]
                article = self._articles[article_id]
                hits.append(Hit(len(hits) + 1, float(score), text,
                                Citation(article.id, article.source, article.title, article.date, start, end)))
            out.append(hits)
        return out

    def ask(self, question: str, k: int = 5, filters: Filters | None = None) -> dict:
        """Return the result structure shared by ``qa-service ask --json`` and the JSON API."""
        started = time.perf_counter()
        hits = self.search(question, k, filters)
        return {"question": question, "results": [h.to_dict() for h in hits],
                "took_ms": round((time.perf_counter() - started) * 1000, 3)}
