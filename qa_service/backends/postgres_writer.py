"""The PostgreSQL writer: whole folders (``sync``) or one article (``put`` / ``delete``), each one transaction.

A write embeds its new text first (outside the transaction), then in one transaction deletes the replaced rows
and copies the new ones with binary ``COPY``; a crash before ``COMMIT`` leaves the previous rows, so readers
never see half an article. One writer at a time across every host (an advisory lock).
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import Settings
from ..embedding import canonical_model_name
from ..embedding.export import prepare_encoder
from ..embedding.onnx_encoder import SERVING_THREADS, OnnxEmbedder, encoder_status, resolve_quantize
from ..files import publish_folder, write_json_atomically
from ..errors import ArticleNotFound, IndexMismatch, LastArticle, WriteBusy
from ..index_texts import lexical_text, lexical_texts
from ..manifest import FORMAT_VERSION, chunking_settings, folder_status
from ..retrieval.lexical import _hyphenated, analyze, bigrams, words
from ..store import chunk_articles, embed_chunks
from ..types import Article, ArticleInfo
from .base import ARTICLE_COLUMNS, INFO_COLUMNS, article_row, info_of
from .postgres_schema import (ENCODER_CACHE, PASSAGE_PAIRS, PASSAGE_TERMS, SENTENCE_TERMS, connect, fetch_encoder,
                              migrate, store_encoder, stored_manifest)


def _lexical_rows(articles: dict[str, Article], chunks) -> tuple[dict, Counter]:
    """Postings (kind, term, doc-index, tf, dl) of passages, word pairs and sentences, and word counts."""
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
        self.conn = connect(settings.database_write_url or settings.database_url)
        migrate(self.conn)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "PostgresWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ state
    def manifest(self) -> dict | None:
        return stored_manifest(self.conn)

    def indexed(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT id, content_hash FROM qa_articles").fetchall())

    def infos(self) -> dict[str, ArticleInfo]:
        """Every stored article's ``ArticleInfo`` (its metadata), by id."""
        return {r[0]: ArticleInfo(*r) for r in self.conn.execute(f"SELECT {INFO_COLUMNS} FROM qa_articles")}

    def _stale_infos(self, articles: Sequence[Article], indexed: dict[str, str]) -> list[Article]:
        """The articles whose text is indexed unchanged but whose metadata differs from the stored row (a story
        regrouped by a new copy, rows written before the metadata columns existed)."""
        same = [a for a in articles if indexed.get(a.id) == a.content_hash]
        if not same:
            return []
        stored = self.infos()
        return [a for a in same if stored.get(a.id) != info_of(a)]

    def _update_infos(self, articles: Sequence[Article]) -> None:
        """Rewrite the metadata of ``articles`` in place (inside a transaction); their passages keep their rows."""
        for a in articles:
            i = info_of(a)
            self.conn.execute("UPDATE qa_articles SET source = %s, title = %s, date = %s, source_url = %s, "
                              "outlet = %s, author = %s, story = %s, title_from = %s, lead_title = %s WHERE id = %s",
                              (i.source, i.title, i.date, i.source_url, i.outlet, i.author, i.story, i.title_from,
                               i.lead_title, i.id))
            self.conn.execute("UPDATE qa_passages SET date = %s WHERE article_id = %s AND date IS DISTINCT FROM %s",
                              (i.date, i.id, i.date))

    def status(self, articles: Sequence[Article], articles_dir: Path | None = None) -> tuple[bool, str]:
        """``(fresh, reason)`` as ``manifest.index_status``, for the database."""
        manifest = self.manifest()
        if manifest is None:
            return False, "the database holds no index yet"
        if manifest.get("format_version") != FORMAT_VERSION:
            return False, (f"it was written by another qa-service (index format {manifest.get('format_version')}, "
                           f"this one writes {FORMAT_VERSION})")
        if manifest.get("model") != canonical_model_name(self.settings.model):
            return False, "the model changed"
        if manifest.get("chunking") != chunking_settings(self.settings):
            return False, "the chunking settings changed"
        indexed = self.indexed()
        if indexed != {a.id: a.content_hash for a in articles}:
            return False, "the articles changed"
        if self._stale_infos(articles, indexed):
            return False, "the articles' metadata changed"
        if reason := folder_status(manifest, articles_dir):
            return False, reason
        return (False, reason) if (reason := encoder_status(manifest, self.settings.quantize)) else (True, "up to date")

    # ------------------------------------------------------------------ writes
    def sync(self, articles: Sequence[Article], embedder, progress: bool = False, force: bool = False,
             remove_missing: bool = True, encoder_threads: int | None = None,
             articles_dir: Path | None = None) -> dict:
        """Make the database hold exactly ``articles`` (or add/replace them, without ``remove_missing``).

        Only new or changed articles are embedded. A changed model, chunking or encoder re-indexes all.
        ``embedder`` None embeds with the database's own ONNX encoder (``encoder_threads`` onnxruntime threads;
        default the serving count), so no torch is loaded.
        ``articles_dir``: the folder they were read from, recorded in the manifest (None keeps the recorded one).
        Returns a summary: articles, passages embedded, removed, seconds, full (re-indexed everything).
        """
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
        relabel = [] if full else self._stale_infos(articles, indexed)
        source_dir = str(Path(articles_dir).resolve()) if articles_dir else (manifest or {}).get("articles_dir")
        if not changed and not removed and not full:
            if (relabel or manifest.get("format_version") != FORMAT_VERSION
                    or manifest.get("articles_dir") != source_dir):
                with self.conn.transaction():
                    self._lock()
                    self._update_infos(relabel)
                    self._publish({**manifest, "format_version": FORMAT_VERSION, "articles_dir": source_dir})
            return {"articles": len(indexed), "embedded": 0, "removed": 0, "full": False,
                    "relabelled": len(relabel), "seconds": time.perf_counter() - started}
        chunks = chunk_articles(changed, embedder, self.settings)
        encode = embedder
        if self.settings.ray_address:
            from ..embedding.ray import maybe_distributed

            encode = maybe_distributed(embedder, self.settings)
        pvecs = np.full((len(chunks.passages), embedder.dimension), np.nan, dtype=np.float32)
        svecs = np.full((len(chunks.sentences), embedder.dimension), np.nan, dtype=np.float32)
        embed_chunks(pvecs, svecs, chunks, changed, encode, self.settings.batch_size, progress)
        new_manifest = {
            "format_version": FORMAT_VERSION, "backend": "postgres", "model": canonical_model_name(embedder.name),
            "dimension": embedder.dimension, "chunking": chunking_settings(self.settings), "encoder": entry,
            "articles_dir": source_dir,
        }
        with self.conn.transaction():
            self._lock()
            if full:  # re-indexing everything with the database's own encoder (folder None) keeps its files
                self._reset(embedder.dimension, keep_encoder=folder is None and entry.get("backend") == "onnx")
            self._delete([a.id for a in changed if a.id in indexed] + removed)
            self._insert(changed, chunks, pvecs, svecs)
            self._update_infos(relabel)
            if folder is not None:
                store_encoder(self.conn, entry, folder)
            count = self.conn.execute("SELECT count(*) FROM qa_articles").fetchone()[0]
            if count == 0:
                raise LastArticle("The index cannot be empty. Add another article first.")
            self._publish(new_manifest)
        if full:
            self.conn.execute("ANALYZE qa_passages; ANALYZE qa_sentences; ANALYZE qa_postings")
        return {"articles": count, "embedded": len(changed), "passages": len(chunks.passages),
                "removed": len(removed), "relabelled": len(relabel), "full": full,
                "seconds": time.perf_counter() - started}

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
            raise WriteBusy("Another write is in progress; try again in a moment.") from None

    def _encoder(self, embedder, manifest: dict | None, sample: list[str], threads: int | None = None):
        """Return ``(embedder for passages and questions, its manifest entry, folder to upload or None)``."""
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
        write_json_atomically(tmp / "manifest.json", {"encoder": new_entry})
        folder = cache / new_entry["sha256"][:32]
        if folder.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            publish_folder(tmp, folder)
        encoder = OnnxEmbedder.from_manifest({"encoder": new_entry, "model": encoder.name,
                                              "dimension": encoder.dimension, "_build_dir": str(folder)})
        return encoder, new_entry, folder

    def _reset(self, dimension: int, keep_encoder: bool = False) -> None:
        c = self.conn
        c.execute("TRUNCATE qa_articles, qa_passages, qa_sentences, qa_postings, qa_term_stats, qa_lexical_stats, "
                  "qa_vocabulary" + ("" if keep_encoder else ", qa_encoder_files"))
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
        for kind, table in ((PASSAGE_TERMS, "qa_passages"), (PASSAGE_PAIRS, "qa_passages"),
                            (SENTENCE_TERMS, "qa_sentences")):
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
        # Words of the removed passages' BM25 texts (``index_texts.lexical_text``: headline, else lead, and passage).
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
        with c.cursor().copy(f"COPY qa_articles ({ARTICLE_COLUMNS}, lead_title, passages) "
                             "FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["text"] * 12 + ["int4"])
            for a in articles:
                copy.write_row((*article_row(a), counts.get(a.id, 0)))
        with c.cursor().copy('COPY qa_passages (id, article_id, start, "end", text, first_sentence, last_sentence, '
                             "date, embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["int8", "text", "int4", "int4", "text", "int8", "int8", "text", "vector"])
            for i, p in enumerate(chunks.passages):
                first, last = chunks.passage_sentences[i]
                copy.write_row((pid0 + i, p.article_id, p.start, p.end, p.text, sid0 + first, sid0 + last,
                                by_id[p.article_id].date, pvecs[i]))
        with c.cursor().copy('COPY qa_sentences (id, article_id, start, "end", embedding) '
                             "FROM STDIN WITH (FORMAT BINARY)") as copy:
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
