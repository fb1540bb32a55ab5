"""The PostgreSQL reader: answers ``IndexBackend`` queries from a PostgreSQL + pgvector database.

Any number of ``qa-service serve`` processes, on any number of hosts, read one database (``--database-url`` /
``QA_DATABASE_URL``); filters by source and date are SQL, and every write is one transaction, so each process
sees a new article on its next question with no restart. Read replicas scale questions: point the serving hosts
at a replica and the indexer at the primary (docs/decisions/postgres-backend.md).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..config import Settings
from ..errors import ArticleNotFound
from ..retrieval.lexical import BM25_B, BM25_K1, Vocabulary, analyze, background_idfs, bigrams
from ..types import Article, ArticleInfo, Filters
from .base import ARTICLE_COLUMNS, INFO_COLUMNS, Evidence, info_of, unknown_sources
from .postgres_schema import (BUILD_HINT, ENCODER_CACHE, PASSAGE_PAIRS, PASSAGE_TERMS, SENTENCE_TERMS, connect,
                              database_manifest, fetch_encoder, read_database_manifest, redact)

logger = logging.getLogger(__name__)


class PostgresBackend:
    """Answer ``IndexBackend`` queries from a PostgreSQL database (see the module docstring)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.url = settings.database_url
        self._local = threading.local()
        conn = self._conn()  # first: without the postgres extra this says how to install it
        manifest = database_manifest(conn, self.url)
        self._lock = threading.Lock()
        self._generation = None
        self._vocabulary = Vocabulary({})
        self._stats: dict[int, tuple[float, float]] = {}
        self.manifest = manifest
        self._refresh(conn)

    # ------------------------------------------------------------------ plumbing
    def describe(self) -> str:
        return f"database {redact(self.url)}"

    def rebuild_hint(self) -> str:
        return BUILD_HINT

    def _conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = self._local.conn = connect(self.url)
            self._local.depth = 0
            self._local.cache = None
        return conn

    def _refresh(self, conn) -> None:
        """Reload what is kept in memory (manifest, vocabulary, BM25 statistics) when a write moved the generation."""
        rows = dict(conn.execute("SELECT key, value FROM qa_meta WHERE key IN ('generation', 'manifest')").fetchall())
        generation = rows.get("generation")
        if generation == self._generation:
            return
        with self._lock:
            if generation == self._generation:
                return
            vocabulary = Vocabulary(dict(conn.execute("SELECT word, count FROM qa_vocabulary").fetchall()))
            stats = {k: (float(n), float(total)) for k, n, total in
                     conn.execute("SELECT kind, docs, total_length FROM qa_lexical_stats").fetchall()}
            manifest = rows.get("manifest") or self.manifest
            if (manifest.get("model") != self.manifest.get("model")
                    or manifest.get("dimension") != self.manifest.get("dimension")):
                logger.warning("the database was re-indexed with another model; restart this service")
            self._vocabulary, self._stats, self.manifest = vocabulary, stats, manifest
            self._generation = generation

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """One REPEATABLE READ, read-only transaction: every query inside sees the same committed state."""
        conn = self._conn()
        if self._local.depth:
            self._local.depth += 1
            try:
                yield
            finally:
                self._local.depth -= 1
            return
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            self._refresh(conn)
            self._local.depth = 1
            self._local.cache = {"articles": {}, "passages": {}, "spans": {}, "vectors": {}, "leads": {}}
            try:
                yield
            finally:
                self._local.depth = 0
                self._local.cache = None

    def _cache(self, name: str) -> dict:
        cache = getattr(self._local, "cache", None)
        return cache[name] if cache is not None else {}

    # ------------------------------------------------------------------ what is indexed
    def _current(self) -> None:
        """Outside a snapshot, catch up with writes first (inside one, the snapshot's start did)."""
        conn = self._conn()
        if not self._local.depth:
            self._refresh(conn)

    @property
    def passage_count(self) -> int:
        self._current()
        return int(self._stats.get(PASSAGE_TERMS, (0, 0))[0])

    @property
    def vocabulary(self) -> Vocabulary:
        self._current()
        return self._vocabulary

    def load_encoder(self):
        """The ONNX question encoder stored with the index, copied once into the local cache."""
        entry = self.manifest.get("encoder") or {}
        if entry.get("backend") != "onnx":
            return None
        from ..embedding import load_index_encoder

        folder = fetch_encoder(self._conn(), entry, Path(self.settings.index_dir) / ENCODER_CACHE)
        return load_index_encoder({**self.manifest, "_build_dir": str(folder)},
                                  pin_threads="encoder_cores" in self.settings.tuning)

    @property
    def article_count(self) -> int:
        return int(self._conn().execute("SELECT count(*) FROM qa_articles").fetchone()[0])

    def articles(self) -> list[Article]:
        rows = self._conn().execute(f"SELECT {ARTICLE_COLUMNS} FROM qa_articles ORDER BY id")
        return [Article(*r) for r in rows]

    def catalog(self) -> list[ArticleInfo]:
        rows = self._conn().execute(f"SELECT {INFO_COLUMNS} FROM qa_articles ORDER BY id")
        return [ArticleInfo(*r) for r in rows]

    def article(self, article_id: str) -> Article:
        cache = self._cache("articles")
        if article_id in cache:
            return cache[article_id]
        row = None
        if isinstance(article_id, str) and "\x00" not in article_id:  # PostgreSQL text cannot hold NUL
            row = self._conn().execute(f"SELECT {ARTICLE_COLUMNS} FROM qa_articles "
                                       "WHERE id = %s", (article_id,)).fetchone()
        if row is None:
            raise ArticleNotFound(f"There is no article with id {article_id!r}.")
        cache[article_id] = Article(*row)
        return cache[article_id]

    def article_info(self, article_id: str) -> ArticleInfo:
        return info_of(self.article(article_id))  # cached per generation, text and all

    def passage_count_for(self, article_id: str) -> int:
        row = self._conn().execute("SELECT passages FROM qa_articles WHERE id = %s",
                                   (str(article_id).replace("\x00", ""),)).fetchone()
        return int(row[0]) if row else 0

    # ------------------------------------------------------------------ search
    def selection(self, filters: Filters | None) -> tuple[str, dict] | None:
        """Return a SQL condition on ``qa_passages p`` and its named parameters (None: everything)."""
        if filters is None or filters.is_empty():
            return None
        clauses, params = [], {}
        if filters.sources:
            wanted = [s.replace("\x00", "") for s in filters.sources]  # PostgreSQL text cannot hold NUL
            rows = self._conn().execute("SELECT id, source FROM qa_articles WHERE id = ANY(%s) OR source = ANY(%s)",
                                        (wanted, wanted)).fetchall()
            known = {r[0] for r in rows} | {r[1] for r in rows}
            unknown = [s for s in wanted if s not in known]
            if unknown:
                raise unknown_sources(unknown)
            clauses.append("p.article_id = ANY(%(sel_ids)s)")
            params["sel_ids"] = sorted({r[0] for r in rows})
        if filters.date_from or filters.date_to:
            clauses.append("p.date IS NOT NULL AND p.date <> '' AND p.date BETWEEN %(sel_from)s AND %(sel_to)s")
            params.update(sel_from=filters.date_from or "0000-00-00", sel_to=filters.date_to or "9999-99-99")
        return " AND ".join(clauses), params

    def _bm25(self, kind: int, terms: list[str], ids: Sequence[int] = (), top: int = 0,
              selection: tuple[str, dict] | None = None, background: dict[str, float] | None = None,
              background_docs: float = 0.0) -> tuple[float, dict[int, float], list[int]]:
        """BM25 of ``terms`` over one kind of postings.

        Returns ``(best score over the whole index, {id: score} for ``ids`` and the ranked ones, the
        ``top`` best ids under ``selection``)``. Repeated terms count repeatedly, as in bm25s. With
        ``background`` (term -> background idf) each idf is blended as ``lexical.blended_idf`` does.
        """
        n, total = self._stats.get(kind, (0.0, 0.0))
        if not terms or n == 0:
            return 0.0, {}, []
        counted = Counter(t.replace("\x00", "") for t in terms)  # PostgreSQL text cannot hold NUL
        q_terms, q_weights = list(counted), [float(v) for v in counted.values()]
        blend = background_docs if background else 0.0
        q_background = [float((background or {}).get(t, 0.0)) for t in q_terms]
        avgdl = total / n
        sql = """
        WITH q AS (SELECT * FROM unnest(%(terms)s::text[], %(weights)s::float8[], %(bg)s::float8[]) AS q(term, w, bg)),
        df AS (SELECT ts.term, ts.df::float8 AS df FROM qa_term_stats ts JOIN q USING (term)
               WHERE ts.kind = %(kind)s AND ts.df > 0),
        s AS MATERIALIZED (
            SELECT po.doc, sum(q.w * (%(n)s * ln(1 + (%(n)s - df.df + 0.5) / (df.df + 0.5)) + %(blend)s * q.bg)
                               / (%(n)s + %(blend)s)
                               * po.tf / (po.tf + %(k1)s * (1 - %(b)s + %(b)s * po.dl / %(avgdl)s)))::float8 AS score
            FROM qa_postings po JOIN q USING (term) JOIN df USING (term)
            WHERE po.kind = %(kind)s GROUP BY po.doc)
        SELECT 0, NULL::bigint, max(score) FROM s
        UNION ALL SELECT 1, doc, score FROM s WHERE doc = ANY(%(ids)s)"""
        params = {"terms": q_terms, "weights": q_weights, "bg": q_background, "blend": float(blend), "kind": kind,
                  "n": n, "k1": BM25_K1, "b": BM25_B, "avgdl": avgdl, "ids": [int(i) for i in ids]}
        if top:
            if selection is None:
                sql += "\nUNION ALL (SELECT 2, doc, score FROM s ORDER BY score DESC, doc LIMIT %(top)s)"
            else:
                sql += (f"\nUNION ALL (SELECT 2, s.doc, s.score FROM s JOIN qa_passages p ON p.id = s.doc "
                        f"WHERE {selection[0]} ORDER BY s.score DESC, s.doc LIMIT %(top)s)")
                params.update(selection[1])
            params["top"] = int(top)
        best, scores, ranked = 0.0, {}, []
        for part, doc, score in self._conn().execute(sql, params):
            if part == 0:
                best = float(score or 0.0)
            else:
                scores[int(doc)] = float(score)
                if part == 2:
                    ranked.append(int(doc))
        return best, scores, ranked

    def candidates(self, qvec: np.ndarray, lexical_text: str, pool: int, mode: str, selection,
                   lexical_mix: bool, weights: tuple[float, float], background_docs: float = 0.0) -> Evidence:
        conn = self._conn()
        qvec = np.asarray(qvec, dtype=np.float32)
        where, params = ("WHERE " + selection[0], dict(selection[1])) if selection else ("", {})
        ids: list[int] = []
        if mode in ("dense", "hybrid"):
            ef = max(int(self.settings.hnsw_ef_search), pool)
            conn.execute("SELECT set_config('hnsw.ef_search', %s, true), set_config('hnsw.iterative_scan', %s, true)",
                         (str(ef), "relaxed_order" if selection else "off"))
            ids += [r[0] for r in conn.execute(
                f"SELECT p.id FROM qa_passages p {where} ORDER BY p.embedding <#> %(q)s LIMIT %(k)s",
                {**params, "q": qvec, "k": pool})]
        terms = analyze(lexical_text)
        lexical: dict[int, float] = {}
        passage_best = 0.0
        blend = background_docs if mode == "hybrid" else 0.0
        background = background_idfs(lexical_text) if blend > 0 else None
        if mode in ("lexical", "hybrid"):
            passage_best, lexical, ranked = self._bm25(PASSAGE_TERMS, terms, ids, pool, selection, background, blend)
            ids += ranked
        pids = np.array(sorted(set(ids)), dtype=np.int64)
        if not len(pids):
            return Evidence.empty()
        rows = {int(r[0]): r[1:] for r in conn.execute(
            "SELECT id, first_sentence, last_sentence, date, (-(embedding <#> %s))::float4 FROM qa_passages "
            "WHERE id = ANY(%s)", (qvec, pids.tolist()))}
        pids = np.array([p for p in pids.tolist() if p in rows], dtype=np.int64)
        passages = self._cache("passages")
        sids: list[int] = []
        for p in pids:
            first, last = rows[p][0], rows[p][1]
            passages[int(p)] = (int(first), int(last))
            sids.extend(range(first, last + 1))
        spans, sims = self._cache("spans"), {}
        for sid, start, end, cos in conn.execute(
                'SELECT id, start, "end", (-(embedding <#> %s))::float4 FROM qa_sentences WHERE id = ANY(%s)',
                (qvec, sids)):
            spans[sid] = (start, end)
            sims[sid] = cos
        sentence_cosines = [np.array([sims.get(s, 0.0) for s in range(rows[p][0], rows[p][1] + 1)], dtype=np.float32)
                            for p in pids]
        lex = np.array([lexical.get(int(p), 0.0) for p in pids], dtype=np.float32)
        mix = None
        if lexical_mix and mode == "hybrid":
            ws, wb = weights
            sent_top, sent_scores, _ = self._bm25(SENTENCE_TERMS, terms, sids, background=background,
                                                  background_docs=blend)
            pair_top, pair_scores, _ = self._bm25(PASSAGE_PAIRS, bigrams(lexical_text), pids.tolist())
            sentence_best = np.array([max([sent_scores.get(s, 0.0) for s in range(rows[p][0], rows[p][1] + 1)],
                                          default=0.0) for p in pids], dtype=np.float32)
            pair = np.array([pair_scores.get(int(p), 0.0) for p in pids], dtype=np.float32)

            def scaled(values: np.ndarray, top: float) -> np.ndarray:
                return values / top if top > 0 else np.zeros_like(values)

            mix = ((1 - ws) * scaled(lex, passage_best) + ws * scaled(sentence_best, sent_top)
                   + wb * scaled(pair, pair_top)) / (1 + wb)
        return Evidence(pids, np.array([rows[p][3] for p in pids], dtype=np.float32), sentence_cosines, lex, mix,
                        [rows[p][2] for p in pids])

    # ------------------------------------------------------------------ rows
    def passages(self, ids: Sequence[int]) -> dict[int, tuple[str, int, int, str]]:
        if not len(ids):
            return {}
        rows = self._conn().execute('SELECT id, article_id, start, "end", text, first_sentence, last_sentence '
                                    'FROM qa_passages WHERE id = ANY(%s)', ([int(i) for i in ids],)).fetchall()
        cache = self._cache("passages")
        for r in rows:
            cache[r[0]] = (r[5], r[6])
        articles = self._cache("articles")
        wanted = sorted({r[1] for r in rows} - set(articles))
        if wanted and getattr(self._local, "cache", None) is not None:  # the answer step reads their text next
            for row in self._conn().execute(f"SELECT {ARTICLE_COLUMNS} FROM qa_articles "
                                            "WHERE id = ANY(%s)", (wanted,)):
                articles[row[0]] = Article(*row)
        return {r[0]: r[1:5] for r in rows}

    def lead(self, article_id: str) -> str:
        """The article's first sentence ("" when it has none); raises ``ArticleNotFound``."""
        cache = self._cache("leads")
        if article_id not in cache:
            text = self.article(article_id).text
            row = self._conn().execute('SELECT start, "end" FROM qa_sentences WHERE article_id = %s '
                                       "ORDER BY start LIMIT 1", (article_id,)).fetchone()
            cache[article_id] = text[row[0]:row[1]] if row else ""
        return cache[article_id]

    def passage_sentences(self, pid: int) -> list[tuple[int, int, int]]:
        return [(sid, *self.sentence_span(sid)) for sid in self.passage_sentence_ids(pid)]

    def passage_sentence_ids(self, pid: int) -> range:
        cache = self._cache("passages")
        if pid not in cache:
            row = self._conn().execute("SELECT first_sentence, last_sentence FROM qa_passages WHERE id = %s",
                                       (int(pid),)).fetchone()
            cache[pid] = (row[0], row[1]) if row else (0, -1)
        first, last = cache[pid]
        return range(int(first), int(last) + 1)

    def sentence_span(self, sid: int) -> tuple[int, int]:
        cache = self._cache("spans")
        if sid not in cache:
            row = self._conn().execute('SELECT start, "end" FROM qa_sentences WHERE id = %s', (int(sid),)).fetchone()
            cache[sid] = (int(row[0]), int(row[1]))
        return cache[sid]

    def sentence_vectors(self, sids: Sequence[int]) -> np.ndarray:
        cache = self._cache("vectors")
        missing = sorted({int(s) for s in sids} - set(cache))
        if missing:
            for sid, vec in self._conn().execute("SELECT id, embedding FROM qa_sentences WHERE id = ANY(%s)",
                                                 (missing,)):
                cache[sid] = np.asarray(vec.to_numpy() if hasattr(vec, "to_numpy") else vec, dtype=np.float32)
        dim = int(self.manifest.get("dimension") or 0)
        return np.array([cache[int(s)] for s in sids], dtype=np.float32).reshape(len(sids), dim)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()


__all__ = ["PostgresBackend", "read_database_manifest"]
