"""Build an index: chunk, embed and store articles as a new immutable build, then publish it atomically.

A build is written into a fresh ``builds/.tmp-<id>`` folder, fsynced, renamed to ``builds/<id>`` and only then
published by replacing ``CURRENT`` (``manifest.py`` has the layout). A build killed part-way leaves a stray
folder, never a half-written live index; older builds are pruned after a publish, the previous one kept so a
running reader is never cut off: docs/decisions/write-protocol.md.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .backends.base import article_row
from .chunking import Layout, split_articles
from .config import Settings
from .embedding import Embedder, normalize_rows
from .embedding.export import prepare_encoder
from .embedding.onnx_encoder import SERVING_THREADS, OnnxEmbedder, resolve_quantize
from .files import link_or_copy, publish_folder, sha256_file, write_json_atomically, write_text_atomically
from .index_texts import Chunks, embedding_texts, lexical_texts, sentence_embedding_texts, sentence_groups
from .manifest import (BUILDS, CURRENT, FORMAT_VERSION, LEXICAL, MANIFEST, PASSAGES_DB, SENTENCE_VECTORS, VECTORS,
                       VOCABULARY, check_model, chunking_settings, index_status, live_manifest, metadata_digest,
                       read_manifest)
from .reuse import LiveRows, previous_layouts, previous_vectors
from .types import Article, Passage

# The builder's API; the read side of the index (check_model, index_status, read_manifest) is manifest.py's,
# named here too for callers of the builder.
__all__ = ["BuildSummary", "build_index", "check_model", "chunk_articles", "embed_chunks", "index_status",
           "read_manifest"]

KEEP_BUILDS = 2


def chunk_articles(articles: Iterable[Article], embedder: Embedder, settings: Settings,
                   previous: dict[str, Layout] | None = None) -> Chunks:
    """Split every article into sentences and passages sized for ``embedder``.

    Args:
        previous: article id -> its layout in the live build (``reuse.previous_layouts``), taken as it is
            instead of cutting the article again (docs/decisions/build-reuse.md).
    """
    max_tokens = min(settings.max_tokens, embedder.max_seq_length - 2)
    chunks = Chunks([], [], [])
    previous = previous or {}
    articles = list(articles)
    to_cut = [a for a in articles if a.id not in previous]
    # An embedder that does not say whether its counts add up (a wrapper, a test's fake) has windows counted whole.
    additive = bool(getattr(embedder, "counts_add_up", False))
    cuts = dict(zip((a.id for a in to_cut), split_articles(to_cut, embedder.count_tokens, max_tokens,
                                                           settings.overlap_sentences, additive=additive)))
    for article in articles:
        units, windows = previous[article.id] if article.id in previous else cuts[article.id]
        base = len(chunks.sentences)
        chunks.sentences.extend((article.id, s, e) for s, e in units)
        for i, j in windows:
            start, end = units[i][0], units[j][1]
            chunks.passages.append(Passage(article.id, start, end, article.text[start:end]))
            chunks.passage_sentences.append((base + i, base + j))
    return chunks


def _write_db(path: Path, articles: Sequence[Article], chunks: Chunks) -> None:
    con = sqlite3.connect(path)
    try:
        con.executescript(
            """
            CREATE TABLE articles (id TEXT PRIMARY KEY, source TEXT NOT NULL, title TEXT, date TEXT,
                                   text TEXT NOT NULL, content_hash TEXT NOT NULL, source_url TEXT, outlet TEXT,
                                   author TEXT, story TEXT, title_from TEXT, lead_title TEXT);
            CREATE TABLE passages (id INTEGER PRIMARY KEY, article_id TEXT NOT NULL REFERENCES articles(id),
                                   start INTEGER NOT NULL, "end" INTEGER NOT NULL, text TEXT NOT NULL,
                                   first_sentence INTEGER NOT NULL, last_sentence INTEGER NOT NULL);
            CREATE TABLE sentences (id INTEGER PRIMARY KEY, article_id TEXT NOT NULL,
                                    start INTEGER NOT NULL, "end" INTEGER NOT NULL);
            CREATE INDEX passages_article ON passages(article_id);
            """
        )
        con.executemany("INSERT INTO articles VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", [article_row(a) for a in articles])
        con.executemany("INSERT INTO passages VALUES (?,?,?,?,?,?,?)",
                        [(i, p.article_id, p.start, p.end, p.text, *chunks.passage_sentences[i])
                         for i, p in enumerate(chunks.passages)])
        con.executemany("INSERT INTO sentences VALUES (?,?,?,?)",
                        [(i, *row) for i, row in enumerate(chunks.sentences)])
        con.commit()
    finally:
        con.close()


# When the lexical files are written on forked workers (docs/decisions/upload-cost.md): from this many passages
# on as many workers as there are parts; from this many passages to embed on one worker, while they are embedded.
LEXICAL_PARALLEL_MIN = 2_000
LEXICAL_EARLY_MIN = 256
_LEXICAL_JOB: tuple | None = None  # (folder, passage texts, sentence texts) for forked workers: inherited, not pickled
_LEXICAL_LOCK = threading.Lock()


def _lexical_part(part: str) -> None:
    """Write one part of a build's lexical files (run in this process or in a forked worker)."""
    from .retrieval.lexical import LexicalIndex, Vocabulary, analyze, pairs

    folder, texts, sentence_texts = _LEXICAL_JOB
    if part == "passages":  # one analysis of each passage serves BM25 over its terms and over its word pairs
        terms = [analyze(t) for t in texts]
        LexicalIndex.from_terms(terms).save(folder / LEXICAL / "passages")
        LexicalIndex.from_terms([pairs(t) for t in terms], analyzer="bigrams").save(folder / LEXICAL / "bigrams")
    elif part == "sentences":
        LexicalIndex.build(sentence_texts).save(folder / LEXICAL / "sentences")
    else:
        Vocabulary.from_texts(texts).save(folder / VOCABULARY)


_LEXICAL_PARTS = ("passages", "sentences", "vocabulary")  # longest first


class _LexicalWrite:
    """The lexical files of a build being written: ``wait()`` for them; ``stop()`` abandons them (after an error).

    A large build writes them on forked workers (``chunking.fork_pool``) while this process embeds passages and
    writes the dense index and the SQLite file, all CPU-bound (docs/decisions/upload-cost.md); a process that may
    not fork (``chunking.can_fork``: one that answers questions) writes them here. ``embedding``: how many
    passages the build embeds after starting this.
    """

    def __init__(self, folder: Path, chunks: Chunks, articles: Sequence[Article], embedding: int = 0):
        global _LEXICAL_JOB
        from .chunking import can_fork, cores, fork_pool

        by_id = {a.id: a for a in articles}
        texts = lexical_texts(chunks, articles)  # the headline (else the lead) is part of what a passage is about
        sentence_texts = [by_id[a].text[s:e] for a, s, e in chunks.sentences]
        self._pool = self._result = None
        with _LEXICAL_LOCK:
            _LEXICAL_JOB = (folder, texts, sentence_texts)
            try:
                workers = 0
                if cores() > 1 and can_fork():
                    if len(texts) >= LEXICAL_PARALLEL_MIN:
                        workers = min(cores(), len(_LEXICAL_PARTS))
                    elif embedding >= LEXICAL_EARLY_MIN:
                        workers = 1
                if workers:
                    self._pool = fork_pool(workers)
                    self._result = self._pool.map_async(_lexical_part, _LEXICAL_PARTS, chunksize=1)
                else:
                    for part in _LEXICAL_PARTS:
                        _lexical_part(part)
            finally:
                _LEXICAL_JOB = None  # the workers forked with their copy

    def wait(self) -> None:
        if self._pool is not None:
            self._result.get()  # a worker's exception is raised here
            self._pool.close()
            self._pool.join()
            self._pool = None

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


@dataclass
class BuildSummary:
    articles: int
    passages: int
    seconds: float
    build_dir: str
    reused_articles: int = 0  # unchanged articles whose vectors came from the previous build


def _fill(vectors: np.ndarray, texts: Sequence[str], embedder: Embedder, batch_size: int, progress: bool) -> None:
    """Embed the rows of ``vectors`` that are still NaN (not reused), in place."""
    todo = np.flatnonzero(np.isnan(vectors[:, 0])) if len(vectors) else np.zeros(0, dtype=np.int64)
    if len(todo):
        new = embedder.encode([texts[i] for i in todo], batch_size=batch_size, progress=progress)
        if new.shape != (len(todo), vectors.shape[1]):
            raise RuntimeError(f"embedder returned shape {new.shape} for {len(todo)} texts")
        vectors[todo] = new


def embed_chunks(vectors: np.ndarray, sentence_vectors: np.ndarray, chunks: Chunks, articles: Sequence[Article],
                 embedder: Embedder, batch_size: int, progress: bool, laps=None,
                 passage_texts: Sequence[str] | None = None) -> str:
    """Embed the passage and sentence rows still NaN (not reused), in place; return how sentences were embedded.

    "pooled" (a mean-pooling model with token vectors, the normal case): one pass over the passages gives
    each passage's vector and, from the same token vectors, each sentence's, pooled over the sentence and its
    headline or lead (``sentence_groups``; a sentence in two overlapping passages takes the mean of both):
    docs/decisions/pooled-sentence-vectors.md. "separate": sentences are embedded as texts of their own
    (``sentence_embedding_texts``), for encoders that cannot pool; any sentence pooling left empty (cut off by
    the model's truncation) is embedded that way too. ``passage_texts``: ``embedding_texts(chunks, articles)``,
    when the caller has it.
    """
    if passage_texts is None:
        passage_texts = embedding_texts(chunks, articles)
    todo = np.flatnonzero(np.isnan(vectors[:, 0])) if len(vectors) else np.zeros(0, dtype=np.int64)
    method = "separate"
    if getattr(embedder, "token_pooling", None) == "mean":
        method = "pooled"
        if len(todo):
            groups = sentence_groups(chunks, articles)
            new, pooled = embedder.encode_pooled([passage_texts[i] for i in todo], [groups[i] for i in todo],
                                                 batch_size=batch_size, progress=progress)
            if new.shape != (len(todo), vectors.shape[1]):
                raise RuntimeError(f"embedder returned shape {new.shape} for {len(todo)} texts")
            vectors[todo] = new
            wanted = np.isnan(sentence_vectors[:, 0])
            total = np.zeros(sentence_vectors.shape, dtype=np.float64)
            for i, rows in zip(todo, pooled):
                first, last = chunks.passage_sentences[i]
                ids = np.arange(first, last + 1)
                keep = wanted[ids] & ~np.isnan(rows[:, 0])
                total[ids[keep]] += rows[keep]
            done = np.flatnonzero(np.any(total != 0, axis=1))
            sentence_vectors[done] = normalize_rows(total[done])
    else:
        _fill(vectors, passage_texts, embedder, batch_size, progress)
    if laps:
        laps("embed_passages")
    _fill(sentence_vectors, sentence_embedding_texts(chunks, articles), embedder, batch_size * 2, progress)
    if laps:
        laps("embed_sentences")
    return method


def _share_encoder(manifest: dict, build_dir: Path, threads: int) -> tuple[Embedder, dict]:
    """Hard-link the ONNX query encoder of ``manifest``'s build into ``build_dir``; return it and its entry."""
    entry = dict(manifest["encoder"])
    source = Path(manifest["_build_dir"])
    for key in ("file", "tokenizer"):
        target = build_dir / entry[key]
        target.parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(source / entry[key], target)
    entry["reused_from"] = source.name
    # Its session is opened later (``build_index``): cutting the articles needs only the tokenizer.
    return OnnxEmbedder.from_manifest({**manifest, "_build_dir": str(build_dir)}, threads=threads,
                                      open_session=False), entry


def build_index(
    articles: Sequence[Article], embedder: Embedder | None, settings: Settings, progress: bool = False,
    encoder_of: dict | None = None, encoder_threads: int = SERVING_THREADS, articles_dir: Path | None = None,
) -> BuildSummary:
    """Chunk, embed and store ``articles`` as a new build, then publish it atomically.

    Args:
        encoder_of: a manifest (``manifest.read_manifest``) whose ONNX encoder this build shares and embeds
            with, instead of exporting ``embedder`` (pass None): a web worker adds an article without loading
            torch, and ``qa-service index`` re-indexes so when the model is unchanged
            (docs/decisions/export-cache.md).
        encoder_threads: onnxruntime threads of that shared encoder (a web worker uses its serving threads;
            the CLI uses both cores).
        articles_dir: the folder the articles were read from, recorded (absolute) in the manifest so that later
            commands and writes find it from any working directory; None keeps the live build's.
    """
    import faiss

    from .retrieval.dense import build_dense_index

    started = time.perf_counter()
    index_dir = Path(settings.index_dir)
    builds = index_dir / BUILDS
    builds.mkdir(parents=True, exist_ok=True)
    # Sortable by creation time (microseconds), so pruning keeps the newest builds.
    build_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f") + "-" + uuid.uuid4().hex[:8]
    tmp = builds / f".tmp-{build_id}"
    tmp.mkdir()
    try:
        phases: dict[str, float] = {}  # seconds per step, in the manifest: where a build's time goes
        mark = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            phases[name] = round(phases.get(name, 0.0) + now - mark, 3)
            mark = now

        old = live_manifest(index_dir)  # the live build, whose unchanged articles keep their cut and vectors
        old_rows = LiveRows(old) if old is not None else None
        previous = {}
        if encoder_of is not None:
            embedder, encoder = _share_encoder(encoder_of, tmp, encoder_threads)
            # the same encoder as the live build: unchanged articles keep its cut instead of being split again
            previous = previous_layouts(old, embedder, encoder, settings, articles, old_rows)
        lap("encoder")
        chunks = chunk_articles(articles, embedder, settings, previous)
        passages = chunks.passages
        embedded = embedding_texts(chunks, articles)  # what each passage vector is made from
        lap("chunk")
        if encoder_of is None:
            # Passages are embedded by the encoder that will answer questions (normally the ONNX export).
            embedder, encoder = prepare_encoder(embedder, resolve_quantize(settings.quantize, old), tmp, builds,
                                                embedded)
        lap("encoder")
        from .embedding.ray import maybe_distributed

        # The same encoder, run on a Ray actor pool when settings.ray_address is set (--ray); else embedder itself.
        fill_with = maybe_distributed(embedder, settings)
        # Unchanged articles keep the vectors of the live build: only new or changed text is embedded.
        vectors, sentence_vectors, reused = previous_vectors(old, embedder, encoder, settings, articles, chunks,
                                                             old_rows)
        lap("reuse")
        # The lexical files do not depend on the vectors: forked workers may write them meanwhile.
        lexical = _LexicalWrite(tmp, chunks, articles, embedding=int(np.isnan(vectors[:, 0]).sum()))
        try:
            # A shared encoder's session is opened only now: till here the build needed its tokenizer alone, and
            # a forked lexical worker, when there is one, has the other core meanwhile.
            if isinstance(embedder, OnnxEmbedder):
                embedder.open()
                lap("encoder")
            sentence_method = embed_chunks(vectors, sentence_vectors, chunks, articles, fill_with,
                                           settings.batch_size, progress, lap, passage_texts=embedded)
            # Exact search up to settings.ann_threshold passages, IVF above it (retrieval/dense.py says why).
            index, dense_entry = build_dense_index(vectors.reshape(-1, embedder.dimension), settings.ann_threshold)
            faiss.write_index(index, str(tmp / VECTORS))
            np.save(tmp / SENTENCE_VECTORS, sentence_vectors.astype(np.float32))
            _write_db(tmp / PASSAGES_DB, articles, chunks)
            lexical.wait()
        finally:
            lexical.stop()  # after an error: no worker may still be writing into the folder removed below
        lap("write")
        files = {}
        # The encoder's files already have their checksums in its entry (from its export, or from the build or
        # cache it is shared from): recording those, not hashing the model again, also means a shared file
        # damaged since is caught by the next check instead of recorded as good.
        known = {encoder[key]: encoder[sha] for key, sha in (("file", "sha256"), ("tokenizer", "tokenizer_sha256"))
                 if key in encoder and sha in encoder}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            with open(path, "rb+") as fh:
                os.fsync(fh.fileno())
            name = path.relative_to(tmp).as_posix()
            files[name] = {"size": path.stat().st_size, "sha256": known.get(name) or sha256_file(path)}
        lap("checksum")
        manifest = {
            "format_version": FORMAT_VERSION,
            "build_id": build_id,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": embedder.name,
            "dimension": embedder.dimension,
            "chunking": chunking_settings(settings),
            "encoder": encoder,
            "faiss": dense_entry,
            "articles": {a.id: a.content_hash for a in articles},
            "articles_dir": str(Path(articles_dir).resolve()) if articles_dir else (old or {}).get("articles_dir"),
            "metadata": metadata_digest(articles),
            "counts": {"articles": len(articles), "passages": len(passages), "sentences": len(chunks.sentences),
                       "reused_articles": reused, "reused_layouts": len(previous)},
            "sentence_vectors": sentence_method,
            "files": files,
            "build_seconds": phases,
        }
        write_json_atomically(tmp / MANIFEST, manifest)  # also fsyncs the folder
        final = builds / build_id
        publish_folder(tmp, final)
        _publish(index_dir, build_id)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(index_dir, keep=build_id)
    return BuildSummary(len(articles), len(passages), time.perf_counter() - started, str(final), reused)


def _publish(index_dir: Path, build_id: str) -> None:
    """Make ``build_id`` the live build: the commit point of every build and article write."""
    write_text_atomically(index_dir / CURRENT, build_id + "\n")


def _prune(index_dir: Path, keep: str) -> None:
    """Remove stale temp folders and all but the newest ``KEEP_BUILDS`` builds."""
    builds = index_dir / BUILDS
    now = time.time()
    entries = sorted((p for p in builds.iterdir() if p.is_dir()), key=lambda p: p.name, reverse=True)
    finished = [p for p in entries if not p.name.startswith(".")]
    for path in finished[KEEP_BUILDS:]:
        if path.name != keep:
            shutil.rmtree(path, ignore_errors=True)
    for path in entries:
        # A temp folder is a killed build, unless a build is running right now: leave fresh ones.
        if path.name.startswith(".tmp-") and now - path.stat().st_mtime > 3600:
            shutil.rmtree(path, ignore_errors=True)
    for path in index_dir.glob(f".{CURRENT}.*"):  # pointers a killed publish left
        path.unlink(missing_ok=True)
