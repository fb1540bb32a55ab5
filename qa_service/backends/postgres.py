"""PostgreSQL + pgvector: one shared index and article store for many stateless service processes.

Point any number of ``qa-service serve`` processes (and their gunicorn workers), on any number of
hosts, at one database with ``--database-url`` / ``QA_DATABASE_URL``. Articles, passages and
sentences are rows; filters by source and date are SQL; every write (``qa-service index``, or
``PUT``/``DELETE /api/articles/<id>``) is one transaction, so every process sees a new article on its
next question, with no restart and no reload. Read replicas scale questions: point the serving hosts
at a replica and the indexer at the primary (README "Scaling out").

Schema (``MIGRATIONS``; versions recorded in ``qa_schema_migrations``, applied under an advisory lock):

- ``qa_articles``: id, source file, title, date, the exact text citations slice, content hash;
- ``qa_passages`` / ``qa_sentences``: spans into the article text and their vectors (``vector(d)``);
  HNSW (``vector_ip_ops``) over passage vectors, ``hnsw.ef_search`` from ``Settings.hnsw_ef_search``,
  iterative scans for filtered queries;
- ``qa_postings`` + ``qa_term_stats`` + ``qa_lexical_stats``: the lexical side as BM25 postings (passage terms, passage
  word pairs, sentence terms), made by the same analyzer as the FAISS backend's bm25s indexes and
  scored in SQL with the same formula (Lucene BM25, k1=0.9, b=0.4), so both backends give the same
  lexical scores and the ``Searcher`` fuses them the same way. A stock ``tsvector`` full-text index
  was the other option; ``ts_rank`` has no inverse document frequency, which BM25 fusion relies on;
- ``qa_vocabulary``: word → passage count, for spelling variants (kept in memory, refreshed when
  ``qa_meta.generation`` moves);
- ``qa_meta``: the manifest (model, dimension, chunking, encoder) and the write generation;
- ``qa_encoder_files``: the ONNX question encoder made at index time, so a serving host needs only
  the database URL: it copies the encoder to ``<index_dir>/pg-encoders/<sha256>`` once (checksummed).

Bulk loads use binary ``COPY``. A write embeds its new text first (outside the transaction), then in
one transaction deletes the replaced rows and copies the new ones; a crash before ``COMMIT`` leaves the
previous rows, so readers never see half an article.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..config import Settings
from ..errors import ArticleNotFound, IndexCorrupt, IndexMismatch, IndexNotBuilt, LastArticle, QAError
from ..retrieval.lexical import (BM25_B, BM25_K1, Vocabulary, _hyphenated, analyze, background_idfs, bigrams,
                                 words)
from ..types import Article, ArticleInfo, Filters
from . import ARTICLE_COLUMNS, Evidence

logger = logging.getLogger(__name__)

PASSAGE_TERMS, PASSAGE_PAIRS, SENTENCE_TERMS = 0, 1, 2  # qa_postings.kind
ENCODER_CACHE = "pg-encoders"

MIGRATIONS: list[tuple[int, str]] = [
    (1, """
    CREATE EXTENSION IF NOT EXISTS vector;
    CREATE TABLE qa_meta (key text PRIMARY KEY, value jsonb NOT NULL);
    CREATE TABLE qa_articles (
        id text PRIMARY KEY, source text NOT NULL, title text, date text, text text NOT NULL,
        content_hash text NOT NULL, passages integer NOT NULL);
    CREATE TABLE qa_passages (
        id bigint PRIMARY KEY, article_id text NOT NULL REFERENCES qa_articles(id) ON DELETE CASCADE,
        start integer NOT NULL, "end" integer NOT NULL, text text NOT NULL,
        first_sentence bigint NOT NULL, last_sentence bigint NOT NULL, date text, embedding vector NOT NULL);
    CREATE INDEX qa_passages_article ON qa_passages (article_id);
    CREATE INDEX qa_passages_date ON qa_passages (date);
    CREATE TABLE qa_sentences (
        id bigint PRIMARY KEY, article_id text NOT NULL REFERENCES qa_articles(id) ON DELETE CASCADE,
        start integer NOT NULL, "end" integer NOT NULL, embedding vector NOT NULL);
    CREATE INDEX qa_sentences_article ON qa_sentences (article_id);
    CREATE TABLE qa_postings (kind smallint NOT NULL, term text NOT NULL, doc bigint NOT NULL,
                              tf real NOT NULL, dl real NOT NULL, PRIMARY KEY (kind, term, doc));
    CREATE INDEX qa_postings_doc ON qa_postings (kind, doc);
    CREATE TABLE qa_lexical_stats (kind smallint PRIMARY KEY, docs bigint NOT NULL, total_length double precision NOT NULL);
    CREATE TABLE qa_vocabulary (word text PRIMARY KEY, count integer NOT NULL);
    CREATE TABLE qa_encoder_files (path text PRIMARY KEY, sha256 text NOT NULL, data bytea NOT NULL);
    CREATE SEQUENCE qa_passage_ids;
    CREATE SEQUENCE qa_sentence_ids;
    """),
    # Document frequencies kept per term, so a question's BM25 reads its terms' postings once, not twice.
    (2, """
    CREATE TABLE qa_term_stats (kind smallint NOT NULL, term text NOT NULL, df integer NOT NULL,
                                PRIMARY KEY (kind, term));
    INSERT INTO qa_term_stats (kind, term, df) SELECT kind, term, count(*) FROM qa_postings GROUP BY kind, term;
    """),
]


def _connect(url: str, autocommit: bool = True):
    try:
        import psycopg
        from pgvector.psycopg import register_vector
    except ImportError as exc:
        from ..errors import ConfigError

        raise ConfigError(f"--database-url needs the postgres extra ({exc.name} is missing): "
                          "pip install 'qa-service[postgres]'") from None

    try:
        conn = psycopg.connect(url, autocommit=autocommit, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise QAError(f"Cannot connect to the PostgreSQL database ({_redact(url)}): {str(exc).strip()[:200]}",
                      code="database_unavailable", status=503) from None
    try:
        register_vector(conn)
    except psycopg.ProgrammingError:
        pass  # no vector extension yet: migrate() creates it, then connections register it
    return conn


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{parts.username + '@' if parts.username else ''}{host}{':' + str(parts.port) if parts.port else ''}{parts.path}"


def migrate(conn) -> int:
    """Apply the schema migrations not yet applied; return the schema version. Safe to run concurrently."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('qa_service.migrate'))")
        conn.execute("CREATE TABLE IF NOT EXISTS qa_schema_migrations (version integer PRIMARY KEY, "
                     "applied_at timestamptz NOT NULL DEFAULT now())")
        done = {r[0] for r in conn.execute("SELECT version FROM qa_schema_migrations")}
        for version, sql in MIGRATIONS:
            if version not in done:
                conn.execute(sql)
                conn.execute("INSERT INTO qa_schema_migrations (version) VALUES (%s)", (version,))
                logger.info("applied schema migration %d", version)
    from pgvector.psycopg import register_vector

    register_vector(conn)
    return max(v for v, _ in MIGRATIONS)


def _manifest(conn) -> dict | None:
    row = conn.execute("SELECT value FROM qa_meta WHERE key = 'manifest'").fetchone()
    return row[0] if row else None


BUILD_HINT = "Build it with: qa-service index SEEDS_DIR --database-url URL"


def _live_manifest(conn, url: str) -> dict:
    """Return the manifest of the index in the database, or raise a clear error when there is none."""
    import psycopg

    try:
        exists = conn.execute("SELECT to_regclass('qa_meta') IS NOT NULL").fetchone()[0]
        manifest = _manifest(conn) if exists else None
    except psycopg.Error as exc:
        raise IndexCorrupt(f"The database {_redact(url)} cannot be read ({type(exc).__name__}).") from exc
    if manifest is None:
        raise IndexNotBuilt(f"The database {_redact(url)} holds no index yet. {BUILD_HINT}")
    return manifest


def read_database_manifest(url: str) -> tuple[dict, str]:
    """Return the manifest of the index in the database at ``url`` and a printable name for it."""
    conn = _connect(url)
    try:
        return _live_manifest(conn, url), f"database {_redact(url)}"
    finally:
        conn.close()


# --------------------------------------------------------------------------- reading

class PostgresBackend:
    """Answer ``IndexBackend`` queries from a PostgreSQL database (see the module docstring)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.url = settings.database_url
        self._local = threading.local()
        conn = self._conn()  # first: without the postgres extra this says how to install it
        manifest = _live_manifest(conn, self.url)
        self._lock = threading.Lock()
        self._generation = None
        self._vocabulary = Vocabulary({})
        self._stats: dict[int, tuple[float, float]] = {}
        self.manifest = manifest
        self._refresh(conn)

    # ------------------------------------------------------------------ plumbing
    def describe(self) -> str:
        return f"database {_redact(self.url)}"

    def rebuild_hint(self) -> str:
        return BUILD_HINT

    def _conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = self._local.conn = _connect(self.url)
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
            if manifest.get("model") != self.manifest.get("model") or manifest.get("dimension") != self.manifest.get("dimension"):
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
                                  pin_threads="encoder_cores" in getattr(self.settings, "tuning", ()))

    @property
    def article_count(self) -> int:
        return int(self._conn().execute("SELECT count(*) FROM qa_articles").fetchone()[0])

    def articles(self) -> list[Article]:
        rows = self._conn().execute(f"SELECT {ARTICLE_COLUMNS} FROM qa_articles ORDER BY id")
        return [Article(*r) for r in rows]

    def catalog(self) -> list[ArticleInfo]:
        rows = self._conn().execute("SELECT id, source, title, date FROM qa_articles ORDER BY id")
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
        a = self.article(article_id)  # cached per generation, text and all
        return ArticleInfo(a.id, a.source, a.title, a.date)

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
                from .faiss import unknown_sources

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
            for sid, vec in self._conn().execute("SELECT id, embedding FROM qa_sentences WHERE id = ANY(%s)", (missing,)):
                cache[sid] = np.asarray(vec.to_numpy() if hasattr(vec, "to_numpy") else vec, dtype=np.float32)
        dim = int(self.manifest.get("dimension") or 0)
        return np.array([cache[int(s)] for s in sids], dtype=np.float32).reshape(len(sids), dim)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()


# --------------------------------------------------------------------------- the encoder

def fetch_encoder(conn, entry: dict, cache_root: Path) -> Path:
    """Return a local folder holding the encoder files ``entry`` names, copied from the database if needed."""
    folder = Path(cache_root) / entry["sha256"][:32]
    marker = folder / "manifest.json"
    if marker.is_file():
        return folder
    from ..files import sha256_file

    cache_root = Path(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = cache_root / f".tmp-{uuid.uuid4().hex[:12]}"
    try:
        for key in ("file", "tokenizer"):
            row = conn.execute("SELECT data, sha256 FROM qa_encoder_files WHERE path = %s", (entry[key],)).fetchone()
            if row is None:
                raise IndexCorrupt(f"The database lacks the encoder file {entry[key]}. "
                                   "Rebuild it with: qa-service index SEEDS_DIR --database-url URL --force")
            target = tmp / entry[key]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(row[0])
            if sha256_file(target) != row[1]:
                raise IndexCorrupt("An encoder file in the database does not match its checksum.")
        (tmp / "manifest.json").write_text(json.dumps({"encoder": entry}), encoding="utf-8")
        try:
            os.replace(tmp, folder)
        except OSError:  # another process put it there first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _store_encoder(conn, entry: dict, folder: Path) -> None:
    from ..files import sha256_file

    for key in ("file", "tokenizer"):
        path = folder / entry[key]
        digest = sha256_file(path)
        row = conn.execute("SELECT sha256 FROM qa_encoder_files WHERE path = %s", (entry[key],)).fetchone()
        if row is None or row[0] != digest:
            conn.execute("INSERT INTO qa_encoder_files (path, sha256, data) VALUES (%s, %s, %s) "
                         "ON CONFLICT (path) DO UPDATE SET sha256 = EXCLUDED.sha256, data = EXCLUDED.data",
                         (entry[key], digest, path.read_bytes()))


# --------------------------------------------------------------------------- writing

def _lexical_rows(articles: dict[str, Article], chunks) -> tuple[dict, Counter]:
    """Postings (kind, term, doc-index, tf, dl) of passages, word pairs and sentences, and word counts."""
    from ..store import lexical_texts

    passage_texts = lexical_texts(chunks, articles.values())
    out = {PASSAGE_TERMS: [], PASSAGE_PAIRS: [], SENTENCE_TERMS: []}
    for i, text in enumerate(passage_texts):
        for kind, tokens in ((PASSAGE_TERMS, analyze(text)), (PASSAGE_PAIRS, bigrams(text))):
            tokens = tokens or [""]  # as bm25s: an empty text still counts as a document of length 1
            for term, tf in Counter(tokens).items():
                out[kind].append((term, i, tf, len(tokens)))
    for i, (aid, s, e) in enumerate(chunks.sentences):
        tokens = analyze(articles[aid].text[s:e]) or [""]
        for term, tf in Counter(tokens).items():
            out[SENTENCE_TERMS].append((term, i, tf, len(tokens)))
    vocab = Counter()
    for text in passage_texts:
        vocab.update(set(words(text)) | set(_hyphenated(text)))
    return out, vocab


class PostgresWriter:
    """Writes articles into the database: whole folders (``sync``) or one article (``put`` / ``delete``)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        # A service reading from a replica writes to the primary.
        self.conn = _connect(settings.database_write_url or settings.database_url)
        migrate(self.conn)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "PostgresWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ state
    def manifest(self) -> dict | None:
        return _manifest(self.conn)

    def indexed(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT id, content_hash FROM qa_articles").fetchall())

    def status(self, articles: Sequence[Article]) -> tuple[bool, str]:
        """``(fresh, reason)`` as ``store.index_status``, for the database."""
        from ..embedding import canonical_model_name
        from ..embedding.onnx_encoder import encoder_status
        from ..store import chunking_settings

        manifest = self.manifest()
        if manifest is None:
            return False, "the database holds no index yet"
        if manifest.get("model") != canonical_model_name(self.settings.model):
            return False, "the model changed"
        if manifest.get("chunking") != chunking_settings(self.settings):
            return False, "the chunking settings changed"
        if self.indexed() != {a.id: a.content_hash for a in articles}:
            return False, "the articles changed"
        return (False, reason) if (reason := encoder_status(manifest, self.settings.quantize)) else (True, "up to date")

    # ------------------------------------------------------------------ writes
    def sync(self, articles: Sequence[Article], embedder, progress: bool = False, force: bool = False,
             remove_missing: bool = True, encoder_threads: int | None = None) -> dict:
        """Make the database hold exactly ``articles`` (or add/replace them, without ``remove_missing``).

        Only new or changed articles are embedded. A changed model, chunking or encoder re-indexes all.
        ``embedder`` None embeds with the database's own ONNX encoder (``encoder_threads`` onnxruntime threads;
        default the serving count), so no torch is loaded.
        Returns a summary: articles, passages embedded, removed, seconds, full (re-indexed everything).
        """
        from ..embedding import canonical_model_name
        from ..store import chunk_articles, chunking_settings, embed_chunks

        started = time.perf_counter()
        manifest = self.manifest()
        embedder, entry, folder = self._encoder(embedder, manifest, [a.text[:2000] for a in articles[:8]],
                                                encoder_threads)
        full = (force or manifest is None or manifest.get("model") != embedder.name
                or manifest.get("dimension") != embedder.dimension
                or manifest.get("chunking") != chunking_settings(self.settings)
                or (manifest.get("encoder") or {}).get("sha256") != entry.get("sha256")
                or (manifest.get("encoder") or {}).get("backend") != entry.get("backend"))
        if full and not remove_missing:
            raise IndexMismatch("The database was indexed with another model, chunking or encoder; re-index the "
                                "whole folder first: qa-service index SEEDS_DIR --database-url URL")
        indexed = {} if full else self.indexed()
        changed = [a for a in articles if indexed.get(a.id) != a.content_hash]
        wanted = {a.id for a in articles}
        removed = sorted(set(indexed) - wanted) if remove_missing else []
        if not changed and not removed and not full:
            return {"articles": len(indexed), "embedded": 0, "removed": 0, "full": False,
                    "seconds": time.perf_counter() - started}
        chunks = chunk_articles(changed, embedder, self.settings)
        encode = embedder
        if self.settings.ray_address:
            from ..embedding.ray import maybe_distributed

            encode = maybe_distributed(embedder, self.settings)
        pvecs = np.full((len(chunks.passages), embedder.dimension), np.nan, dtype=np.float32)
        svecs = np.full((len(chunks.sentences), embedder.dimension), np.nan, dtype=np.float32)
        embed_chunks(pvecs, svecs, chunks, changed, encode, self.settings.batch_size, progress)
        new_manifest = {
            "format_version": 1, "backend": "postgres", "model": canonical_model_name(embedder.name),
            "dimension": embedder.dimension, "chunking": chunking_settings(self.settings), "encoder": entry,
        }
        with self.conn.transaction():
            self._lock()
            if full:  # re-indexing everything with the database's own encoder (folder None) keeps its files
                self._reset(embedder.dimension, keep_encoder=folder is None and entry.get("backend") == "onnx")
            self._delete([a.id for a in changed if a.id in indexed] + removed)
            self._insert(changed, chunks, pvecs, svecs)
            if folder is not None:
                _store_encoder(self.conn, entry, folder)
            count = self.conn.execute("SELECT count(*) FROM qa_articles").fetchone()[0]
            if count == 0:
                raise LastArticle("The index cannot be empty. Add another article first.")
            self._publish(new_manifest)
        if full:
            self.conn.execute("ANALYZE qa_passages; ANALYZE qa_sentences; ANALYZE qa_postings")
        return {"articles": count, "embedded": len(changed), "passages": len(chunks.passages),
                "removed": len(removed), "full": full, "seconds": time.perf_counter() - started}

    def delete(self, article_id: str) -> int:
        """Remove one article in one transaction; return how many articles remain."""
        with self.conn.transaction():
            self._lock()
            if self.conn.execute("SELECT 1 FROM qa_articles WHERE id = %s", (article_id,)).fetchone() is None:
                raise ArticleNotFound(f"There is no article with id {article_id!r}.")
            self._delete([article_id])
            count = self.conn.execute("SELECT count(*) FROM qa_articles").fetchone()[0]
            if count == 0:
                raise LastArticle("This is the only article; the index cannot be empty. Add another one first.")
            self._publish(self.manifest())
        return count

    # ------------------------------------------------------------------ pieces (inside a transaction)
    def _lock(self) -> None:
        """One writer at a time across every host: a transaction-scoped advisory lock."""
        import psycopg

        timeout_ms = int(self.settings.write_timeout * 1000)
        self.conn.execute(f"SET LOCAL lock_timeout = {timeout_ms}")
        try:
            self.conn.execute("SELECT pg_advisory_xact_lock(hashtext('qa_service.write'))")
        except psycopg.errors.LockNotAvailable:
            from ..errors import WriteBusy

            raise WriteBusy("Another write is in progress; try again in a moment.") from None

    def _encoder(self, embedder, manifest: dict | None, sample: list[str], threads: int | None = None):
        """Return ``(embedder for passages and questions, its manifest entry, folder to upload or None)``."""
        from ..embedding.export import prepare_encoder
        from ..embedding.onnx_encoder import SERVING_THREADS, OnnxEmbedder, resolve_quantize

        cache = Path(self.settings.index_dir) / ENCODER_CACHE
        entry = (manifest or {}).get("encoder") or {}
        if isinstance(embedder, OnnxEmbedder) or embedder is None:
            # The index's own encoder (a web worker adding an article): no export, no torch.
            if entry.get("backend") != "onnx":
                raise IndexMismatch("The database has no ONNX encoder to embed new articles with; "
                                    "re-index with: qa-service index SEEDS_DIR --database-url URL")
            if embedder is None:
                folder = fetch_encoder(self.conn, entry, cache)
                embedder = OnnxEmbedder.from_manifest({**manifest, "_build_dir": str(folder)},
                                                      threads=threads or SERVING_THREADS)
            return embedder, entry, None
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".tmp-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            encoder, new_entry = prepare_encoder(embedder, resolve_quantize(self.settings.quantize, manifest), tmp,
                                                 cache, sample)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if new_entry.get("backend") != "onnx":
            shutil.rmtree(tmp, ignore_errors=True)
            return encoder, new_entry, None
        new_entry = {k: v for k, v in new_entry.items() if k != "reused_from"}
        (tmp / "manifest.json").write_text(json.dumps({"encoder": new_entry}), encoding="utf-8")
        folder = cache / new_entry["sha256"][:32]
        if folder.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, folder)
        encoder = OnnxEmbedder.from_manifest({"encoder": new_entry, "model": encoder.name,
                                              "dimension": encoder.dimension, "_build_dir": str(folder)})
        return encoder, new_entry, folder

    def _reset(self, dimension: int, keep_encoder: bool = False) -> None:
        c = self.conn
        c.execute("TRUNCATE qa_articles, qa_passages, qa_sentences, qa_postings, qa_term_stats, qa_lexical_stats, qa_vocabulary"
                  + ("" if keep_encoder else ", qa_encoder_files"))
        c.execute("DROP INDEX IF EXISTS qa_passages_hnsw")
        c.execute(f"ALTER TABLE qa_passages ALTER COLUMN embedding TYPE vector({int(dimension)})")
        c.execute(f"ALTER TABLE qa_sentences ALTER COLUMN embedding TYPE vector({int(dimension)})")
        c.execute("ALTER SEQUENCE qa_passage_ids RESTART; ALTER SEQUENCE qa_sentence_ids RESTART")
        self._create_hnsw = True

    def _delete(self, article_ids: list[str]) -> None:
        if not article_ids:
            return
        c = self.conn
        # Take the removed rows' contribution out of the BM25 statistics and the vocabulary.
        for kind, table in ((PASSAGE_TERMS, "qa_passages"), (PASSAGE_PAIRS, "qa_passages"), (SENTENCE_TERMS, "qa_sentences")):
            c.execute(f"""
                WITH gone AS (SELECT DISTINCT po.doc, po.dl FROM qa_postings po JOIN {table} t ON t.id = po.doc
                              WHERE po.kind = %s AND t.article_id = ANY(%s))
                UPDATE qa_lexical_stats SET docs = docs - (SELECT count(*) FROM gone),
                                            total_length = total_length - (SELECT coalesce(sum(dl), 0) FROM gone)
                WHERE kind = %s""", (kind, article_ids, kind))
            c.execute(f"""
                WITH gone AS (DELETE FROM qa_postings po USING {table} t WHERE po.kind = %s AND po.doc = t.id
                              AND t.article_id = ANY(%s) RETURNING po.term),
                counted AS (SELECT term, count(*) AS n FROM gone GROUP BY term)
                UPDATE qa_term_stats ts SET df = ts.df - counted.n FROM counted
                WHERE ts.kind = %s AND ts.term = counted.term""", (kind, article_ids, kind))
        c.execute("DELETE FROM qa_term_stats WHERE df <= 0")
        from ..store import lexical_text

        # The words of the removed passages' BM25 texts (``store.lexical_text``: headline, else lead, and passage).
        gone_articles = {row[0]: Article(*row) for row in c.execute(
            "SELECT id, source, title, date, text, content_hash FROM qa_articles WHERE id = ANY(%s)", (article_ids,))}
        leads = {aid: (start, end) for aid, start, end in c.execute(
            'SELECT DISTINCT ON (article_id) article_id, start, "end" FROM qa_sentences WHERE article_id = ANY(%s) '
            "ORDER BY article_id, start", (article_ids,))}
        gone = Counter()
        for aid, start, end in c.execute('SELECT article_id, start, "end" FROM qa_passages WHERE article_id = ANY(%s)',
                                         (article_ids,)).fetchall():
            full = lexical_text(gone_articles[aid], start, end, leads.get(aid))
            gone.update(set(words(full)) | set(_hyphenated(full)))
        if gone:
            c.execute("""UPDATE qa_vocabulary v SET count = v.count - g.n
                         FROM unnest(%s::text[], %s::int[]) AS g(word, n) WHERE v.word = g.word""",
                      (list(gone), list(gone.values())))
            c.execute("DELETE FROM qa_vocabulary WHERE count <= 0")
        c.execute("DELETE FROM qa_articles WHERE id = ANY(%s)", (article_ids,))  # passages, sentences cascade

    def _insert(self, articles: Sequence[Article], chunks, pvecs: np.ndarray, svecs: np.ndarray) -> None:
        if not articles:
            return
        c = self.conn
        by_id = {a.id: a for a in articles}
        n_p, n_s = len(chunks.passages), len(chunks.sentences)
        pid0 = c.execute("SELECT nextval('qa_passage_ids')").fetchone()[0] if n_p else 0
        if n_p > 1:
            c.execute("SELECT setval('qa_passage_ids', %s)", (pid0 + n_p - 1,))
        sid0 = c.execute("SELECT nextval('qa_sentence_ids')").fetchone()[0] if n_s else 0
        if n_s > 1:
            c.execute("SELECT setval('qa_sentence_ids', %s)", (sid0 + n_s - 1,))
        counts = Counter(p.article_id for p in chunks.passages)
        with c.cursor().copy("COPY qa_articles (id, source, title, date, text, content_hash, passages) "
                             "FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["text", "text", "text", "text", "text", "text", "int4"])
            for a in articles:
                copy.write_row((a.id, a.source, a.title, a.date, a.text, a.content_hash, counts.get(a.id, 0)))
        with c.cursor().copy('COPY qa_passages (id, article_id, start, "end", text, first_sentence, last_sentence, '
                             "date, embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["int8", "text", "int4", "int4", "text", "int8", "int8", "text", "vector"])
            for i, p in enumerate(chunks.passages):
                first, last = chunks.passage_sentences[i]
                copy.write_row((pid0 + i, p.article_id, p.start, p.end, p.text, sid0 + first, sid0 + last,
                                by_id[p.article_id].date, pvecs[i]))
        with c.cursor().copy('COPY qa_sentences (id, article_id, start, "end", embedding) FROM STDIN WITH (FORMAT BINARY)') as copy:
            copy.set_types(["int8", "text", "int4", "int4", "vector"])
            for i, (aid, s, e) in enumerate(chunks.sentences):
                copy.write_row((sid0 + i, aid, s, e, svecs[i]))
        postings, vocab = _lexical_rows(by_id, chunks)
        base = {PASSAGE_TERMS: pid0, PASSAGE_PAIRS: pid0, SENTENCE_TERMS: sid0}
        with c.cursor().copy("COPY qa_postings (kind, term, doc, tf, dl) FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["int2", "text", "int8", "float4", "float4"])
            for kind, rows in postings.items():
                for term, doc, tf, dl in rows:
                    copy.write_row((kind, term, base[kind] + doc, tf, dl))
        for kind, rows in postings.items():
            df = Counter(term for term, _doc, _tf, _dl in rows)
            if df:
                c.execute("""INSERT INTO qa_term_stats (kind, term, df) SELECT %s, * FROM unnest(%s::text[], %s::int[])
                             ON CONFLICT (kind, term) DO UPDATE SET df = qa_term_stats.df + EXCLUDED.df""",
                          (kind, list(df), list(df.values())))
            docs = {doc: dl for _t, doc, _tf, dl in rows}
            c.execute("""INSERT INTO qa_lexical_stats (kind, docs, total_length) VALUES (%s, %s, %s)
                         ON CONFLICT (kind) DO UPDATE SET docs = qa_lexical_stats.docs + EXCLUDED.docs,
                         total_length = qa_lexical_stats.total_length + EXCLUDED.total_length""",
                      (kind, len(docs), float(sum(docs.values()))))
        if vocab:
            c.execute("""INSERT INTO qa_vocabulary (word, count) SELECT * FROM unnest(%s::text[], %s::int[])
                         ON CONFLICT (word) DO UPDATE SET count = qa_vocabulary.count + EXCLUDED.count""",
                      (list(vocab), list(vocab.values())))

    def _publish(self, manifest: dict) -> None:
        c = self.conn
        if getattr(self, "_create_hnsw", False):
            # Built after the bulk load: much faster than inserting into a live HNSW graph.
            c.execute("CREATE INDEX qa_passages_hnsw ON qa_passages USING hnsw (embedding vector_ip_ops)")
            self._create_hnsw = False
        generation = uuid.uuid4().hex
        manifest = {**manifest, "build_id": f"pg-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{generation[:8]}",
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        manifest["counts"] = {"articles": c.execute("SELECT count(*) FROM qa_articles").fetchone()[0],
                              "passages": c.execute("SELECT count(*) FROM qa_passages").fetchone()[0]}
        c.execute("INSERT INTO qa_meta (key, value) VALUES ('manifest', %s), ('generation', %s) "
                  "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                  (json.dumps(manifest), json.dumps(generation)))
