"""Build, save and load an index directory atomically; the manifest says what it holds and how fresh it is.

Layout::

    index/
      CURRENT                 name of the live build (replaced atomically with os.replace)
      builds/<build-id>/      one complete, immutable build
        manifest.json         format version, model, dimension, chunking, article hashes, file sizes
        passages.sqlite       articles, passages (row id == vector id) and sentences
        vectors.faiss         FAISS inner-product index over L2-normalised passage vectors (exact, or IVF
                              above Settings.ann_threshold passages; manifest "faiss" records its parameters)
        sentences.npy         float32 [n_sentences, d] sentence vectors (answer sentence, scoring), pooled
                              from the passage pass's token vectors (``embed_chunks``)
        model/                ONNX export of the model + tokenizer.json: the torch-free query encoder
        lexical/              BM25 indexes (bm25s): passages, passage bigrams, sentences
        vocabulary.json       surface words and their passage counts (spelling-variant lookup)

A build is written into a fresh ``builds/<id>`` folder, fsynced, and only then published by replacing
``CURRENT``. A build killed part-way leaves a stray folder, never a half-written live index; older builds
are pruned after a successful publish (the previous one is kept so a running reader is never cut off).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from datetime import datetime, timezone
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .files import fsync_dir, link_or_copy, sha256_file
from .chunking import cut_many
from .config import Settings
from .embedding import Embedder, canonical_model_name, normalize_rows
from .errors import IndexCorrupt, IndexMismatch, IndexNotBuilt
from .embedding.export import prepare_encoder
from .embedding.onnx_encoder import SERVING_THREADS, OnnxEmbedder, encoder_status, resolve_quantize
from .types import Article, Passage

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CURRENT = "CURRENT"
BUILDS = "builds"
MANIFEST = "manifest.json"
PASSAGES_DB = "passages.sqlite"
VECTORS = "vectors.faiss"
SENTENCE_VECTORS = "sentences.npy"
LEXICAL = "lexical"
VOCABULARY = "vocabulary.json"
KEEP_BUILDS = 2


def rebuild_hint(index_dir: Path) -> str:
    return f"Rebuild it with: qa-service index SEEDS_DIR --index-dir {index_dir}"


def chunking_settings(settings: Settings) -> dict:
    return {"max_tokens": settings.max_tokens, "overlap_sentences": settings.overlap_sentences,
            "splitter": "sentencex+news-abbrev-v1", "passage_context": PASSAGE_CONTEXT,
            "sentence_context": SENTENCE_CONTEXT,
            "lexical": "bm25s-lucene-k0.9-b0.4-snowball-v2-sentences-bigrams-headline-or-lead-v2"}


# --------------------------------------------------------------------------- reading

def current_build_dir(index_dir: Path) -> Path:
    """Return the live build folder, or raise ``IndexNotBuilt``."""
    index_dir = Path(index_dir)
    pointer = index_dir / CURRENT
    if not pointer.is_file():
        raise IndexNotBuilt(f"No index found in {index_dir}. {rebuild_hint(index_dir)}")
    name = pointer.read_text(encoding="utf-8").strip()
    build = index_dir / BUILDS / name
    if not name or "/" in name or not build.is_dir():
        raise IndexCorrupt(f"The index in {index_dir} points to a missing build ({name!r}). {rebuild_hint(index_dir)}")
    return build


def read_manifest(index_dir: Path) -> dict:
    """Return the live manifest after checking its files are whole; raise a clear error otherwise."""
    index_dir = Path(index_dir)
    build = current_build_dir(index_dir)
    try:
        manifest = json.loads((build / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise IndexCorrupt(f"The index manifest in {index_dir} is missing or unreadable. {rebuild_hint(index_dir)}") from exc
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise IndexMismatch(
            f"The index in {index_dir} has format version {manifest.get('format_version') if isinstance(manifest, dict) else '?'}, "
            f"this qa-service reads version {FORMAT_VERSION}. {rebuild_hint(index_dir)}"
        )
    for name, meta in manifest.get("files", {}).items():
        path = build / name
        if not path.is_file() or path.stat().st_size != meta["size"]:
            raise IndexCorrupt(f"The index file {name} in {index_dir} is missing or truncated. {rebuild_hint(index_dir)}")
    manifest["_build_dir"] = str(build)
    return manifest


def check_model(manifest: dict, model: str, index_dir: Path) -> None:
    """Raise ``IndexMismatch`` when the index was built with another model than ``model``."""
    wanted = canonical_model_name(model)
    if manifest.get("model") != wanted:
        raise IndexMismatch(
            f"The index in {index_dir} was built with model {manifest.get('model')!r}, not {wanted!r}. "
            f"Rebuild it with: qa-service index SEEDS_DIR --index-dir {index_dir} --model {model}, "
            f"or ask with --model {manifest.get('model')}."
        )


def live_manifest(index_dir: Path) -> dict | None:
    """Return the live build's manifest, or None when there is no usable index (not built, damaged, other format)."""
    try:
        return read_manifest(index_dir)
    except (IndexNotBuilt, IndexCorrupt, IndexMismatch):
        return None


def index_status(settings: Settings, articles: Sequence[Article]) -> tuple[bool, str]:
    """Return ``(fresh, reason)``: is the live index built from exactly these articles and settings?"""
    try:
        manifest = read_manifest(settings.index_dir)
    except (IndexNotBuilt, IndexCorrupt, IndexMismatch) as exc:
        return False, exc.message
    if manifest.get("model") != canonical_model_name(settings.model):
        return False, "the model changed"
    if manifest.get("chunking") != chunking_settings(settings):
        return False, "the chunking settings changed"
    if manifest.get("articles") != {a.id: a.content_hash for a in articles}:
        return False, "the articles changed"
    reason = encoder_status(manifest, settings.quantize)
    if reason:
        return False, reason
    return True, "up to date"


# --------------------------------------------------------------------------- writing

@dataclass
class Chunks:
    """Passages and the sentences they are made of (global sentence ids, inclusive ranges)."""

    passages: list[Passage]
    sentences: list[tuple[str, int, int]]  # (article_id, start, end)
    passage_sentences: list[tuple[int, int]]  # (first, last) sentence id of each passage


Layout = tuple[list[tuple[int, int]], list[tuple[int, int]]]  # an article's sentence spans, passage windows


def chunk_articles(articles: Iterable[Article], embedder: Embedder, settings: Settings,
                   previous: dict[str, Layout] | None = None) -> Chunks:
    """Split every article into sentences and passages sized for ``embedder``.

    Args:
        previous: article id -> its layout in the live build (``_previous_layouts``), taken as it is instead of
            cutting the article again: cutting (sentence splitting and token counting) is most of a build's
            time after embedding, and an upload or re-index would otherwise cut every unchanged article.
    """
    max_tokens = min(settings.max_tokens, embedder.max_seq_length - 2)
    chunks = Chunks([], [], [])
    previous = previous or {}
    articles = list(articles)
    to_cut = [a for a in articles if a.id not in previous]
    # An embedder that does not say whether its counts add up (a wrapper, a test's fake) has windows counted whole.
    additive = bool(getattr(embedder, "counts_add_up", False))
    cuts = dict(zip((a.id for a in to_cut), cut_many([a.text for a in to_cut], embedder.count_tokens, max_tokens,
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


PASSAGE_CONTEXT = "headline-or-lead-v1"  # what ``embedding_texts`` puts before a passage; in the manifest
SENTENCE_CONTEXT = "headline-or-lead-pooled-v2"  # sentence vectors: pooled with it from the passage pass (v1: embedded apart)
CONTEXT_CHARS = 300  # at most this much of the headline or lead (about 60 tokens), so the passage is not truncated


def _leads(chunks: Chunks) -> dict[str, tuple[int, int]]:
    lead: dict[str, tuple[int, int]] = {}
    for article_id, start, end in chunks.sentences:
        lead.setdefault(article_id, (start, end))
    return lead


def _context(article: Article, start: int, end: int, lead: tuple[int, int] | None) -> str:
    """The headline (else the lead sentence) to embed before ``article.text[start:end]``; "" when the span holds it."""
    title = (article.title or "").strip()
    if title and title not in article.text[start:end]:
        context = title
    elif not title and lead is not None and start > lead[0]:
        context = article.text[lead[0]:lead[1]].strip()
    else:
        context = ""
    if len(context) > CONTEXT_CHARS:
        context = context[:CONTEXT_CHARS].rsplit(" ", 1)[0]
    return context


def lexical_text(article: Article, start: int, end: int, lead: tuple[int, int] | None) -> str:
    """Return what BM25 reads for the passage ``article.text[start:end]``: its article's headline, else its lead.

    The context its vector is made with too (``_context``), so a window that says "He stressed ..." is found by
    the names its article's headline or lead sentence gives him. Every passage gets it, the one that holds it
    included, as passages holding their headline always did: the window that states what the article is about
    counts those words twice rather than no more than every other window of the article (measured: the news
    dev set's d007, "On which weekday ... in Qatar", was second behind another window of its article while the
    lead's own window went without it). The vector leaves it off a passage that holds it (``_context``): a
    vector has no term counts for a repetition to raise, only a 128-token window to spend.
    """
    context = article.title or (article.text[lead[0]:lead[1]].strip() if lead else "")
    return f"{context}\n{article.text[start:end]}"


def lexical_texts(chunks: Chunks, articles: Iterable[Article]) -> list[str]:
    """Return ``lexical_text`` of every passage of ``chunks``, in order."""
    by_id = {a.id: a for a in articles}
    lead = _leads(chunks)
    return [lexical_text(by_id[p.article_id], p.start, p.end, lead.get(p.article_id)) for p in chunks.passages]


def _with_context(chunks: Chunks, articles: Iterable[Article], spans: Iterable[tuple[str, int, int]]) -> list[str]:
    """Return each ``(article_id, start, end)`` span's text with its article's headline (else lead) in front.

    The headline is left off a span that already holds it, and the lead off a span that starts with it.
    """
    by_id = {a.id: a for a in articles}
    lead = _leads(chunks)
    out = []
    for article_id, start, end in spans:
        article = by_id[article_id]
        text = article.text[start:end]
        context = _context(article, start, end, lead.get(article_id))
        out.append(f"{context}\n{text}" if context else text)
    return out


def embedding_texts(chunks: Chunks, articles: Iterable[Article]) -> list[str]:
    """Return the text embedded for each passage: its article's headline (else its lead sentence), then the passage.

    A window from the middle of an article rarely names what the article is about ("the minister said he
    demanded ..."); the headline or, in news without one, the lead sentence does. Prefixing it is the
    classic title-with-passage encoding of dense retrievers (DPR). Only the vector sees the prefix: the
    stored passage, its span and its citation are the article text alone. A passage that already holds
    the headline or lead (the first window of an article) is embedded as it is.
    """
    return _with_context(chunks, articles, ((p.article_id, p.start, p.end) for p in chunks.passages))


def sentence_embedding_texts(chunks: Chunks, articles: Iterable[Article]) -> list[str]:
    """Return the text embedded for each sentence: like a passage's, its article's headline (else lead) first.

    Used only where sentences are embedded apart (``embed_chunks``: an encoder that cannot pool); normally a
    sentence's vector is pooled over these same words inside its passage (``sentence_groups``).

    A sentence alone is even shorter of context than a passage ("It continued: ..."). Measured against
    sentences embedded alone (11-26): SQuAD dev hybrid R@1 0.8502 -> 0.853, nDCG@10 0.923 -> 0.925, answer
    in sentence@1 0.865 -> 0.879; SciFact hybrid 0.735 either way (dense alone 0.709 -> 0.693); news dev hybrid
    success@1 0.692 -> 0.769, MRR@10 0.785 -> 0.831. The sentence pass encodes about twice the tokens. Sentence
    vectors serve the dense score's sentence half, the answer sentence, grouping and the no-answer verdict,
    whose model was refitted on these vectors (answer.py).
    """
    return _with_context(chunks, articles, chunks.sentences)


def sentence_groups(chunks: Chunks, articles: Iterable[Article]) -> list[list[tuple[tuple[int, int], ...]]]:
    """For each passage, the character ranges (in its ``embedding_texts`` text) each of its sentences is pooled from.

    A sentence's group is the sentence itself plus its article's headline, else its lead, as the passage's
    embedded text holds them: the prefix put before the passage, or the headline or lead inside a passage that
    starts the article. That is the sentence's text from ``sentence_embedding_texts``, read in the context of
    its whole passage ("late chunking") instead of alone.
    """
    by_id = {a.id: a for a in articles}
    lead = _leads(chunks)
    out = []
    for p, (first, last) in zip(chunks.passages, chunks.passage_sentences):
        article = by_id[p.article_id]
        context = _context(article, p.start, p.end, lead.get(p.article_id))
        base = len(context) + 1 if context else 0  # where the passage starts in its embedded text
        if context:
            inner = (0, len(context))
        else:  # the passage holds its article's headline, or starts with its lead (or has neither)
            title = (article.title or "").strip()
            at = p.text.find(title) if title else -1
            if at >= 0:
                inner = (at, at + len(title))
            elif not title and p.article_id in lead and p.start == lead[p.article_id][0]:
                inner = (0, lead[p.article_id][1] - p.start)
            else:
                inner = (0, 0)
        groups = []
        for k in range(first, last + 1):
            _, start, end = chunks.sentences[k]
            groups.append((inner, (base + start - p.start, base + end - p.start)))
        out.append(groups)
    return out


def _write_db(path: Path, articles: Sequence[Article], chunks: Chunks) -> None:
    con = sqlite3.connect(path)
    try:
        con.executescript(
            """
            CREATE TABLE articles (id TEXT PRIMARY KEY, source TEXT NOT NULL, title TEXT, date TEXT,
                                   text TEXT NOT NULL, content_hash TEXT NOT NULL);
            CREATE TABLE passages (id INTEGER PRIMARY KEY, article_id TEXT NOT NULL REFERENCES articles(id),
                                   start INTEGER NOT NULL, "end" INTEGER NOT NULL, text TEXT NOT NULL,
                                   first_sentence INTEGER NOT NULL, last_sentence INTEGER NOT NULL);
            CREATE TABLE sentences (id INTEGER PRIMARY KEY, article_id TEXT NOT NULL,
                                    start INTEGER NOT NULL, "end" INTEGER NOT NULL);
            CREATE INDEX passages_article ON passages(article_id);
            """
        )
        con.executemany("INSERT INTO articles VALUES (?,?,?,?,?,?)",
                        [(a.id, a.source, a.title, a.date, a.text, a.content_hash) for a in articles])
        con.executemany("INSERT INTO passages VALUES (?,?,?,?,?,?,?)",
                        [(i, p.article_id, p.start, p.end, p.text, *chunks.passage_sentences[i])
                         for i, p in enumerate(chunks.passages)])
        con.executemany("INSERT INTO sentences VALUES (?,?,?,?)",
                        [(i, *row) for i, row in enumerate(chunks.sentences)])
        con.commit()
    finally:
        con.close()


LEXICAL_PARALLEL_MIN = 2_000  # passages: below, the lexical files are written here, one after another
# Passages to embed from which one forked worker writes the lexical files while they are embedded: the encoder
# keeps both cores busy, but the worker's CPU (~0.4 s for 900 passages) then costs the build about half of that
# instead of all of it (benchmarks/HISTORY.md, third 11-27 session). Below it a fork is not worth its while.
LEXICAL_EARLY_MIN = 256
_LEXICAL_JOB: tuple | None = None  # (folder, passage texts, sentence texts) for forked workers: inherited, never pickled
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

    A large build writes them on forked workers (``chunking.fork_pool``) while this process builds the dense index
    and the SQLite file: all of it is CPU-bound Python and numpy. One new article in an archive of 100k one-sentence
    articles took 27-33 s, 21-27 of them writing, one file after another; 20 s and 14 on workers (11-27).
    ``embedding``: how many passages the build embeds after starting this; from ``LEXICAL_EARLY_MIN`` of them one
    forked worker writes every part meanwhile.
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
    headline or lead (``sentence_groups``; a sentence in two overlapping passages takes the mean of both).
    Measured against embedding every sentence again with its headline (11-27, README "Retrieval quality"):
    one encode pass instead of two; SciFact nDCG@10 0.735 -> 0.737, news dev MRR@10 0.831 -> 0.835, SQuAD
    R@1 0.8525 -> 0.8500 (nDCG@10 0.925 -> 0.922), with ``RetrievalConfig.sentence_weight`` re-measured for
    these vectors. "separate": sentences are embedded as texts of their own (``sentence_embedding_texts``),
    for encoders that cannot pool; any sentence pooling left empty (cut off by the model's truncation) is
    embedded that way too. ``passage_texts``: ``embedding_texts(chunks, articles)``, when the caller has it.
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


def _same_vectors(old: dict, new: dict) -> bool:
    """Would encoder ``new`` give the vectors encoder ``old`` gave (same model assumed)?

    True for the same backend, precision and file checksum; and from sentence-transformers (or a build
    from before encoders were recorded) to the fp32 ONNX export, which is checked against
    sentence-transformers at export time (cosine >= 0.9999).
    """
    if all(old.get(key) == new.get(key) for key in ("backend", "precision", "sha256")):
        return True
    return (old.get("backend", "sentence-transformers") == "sentence-transformers"
            and old.get("precision", "fp32") == "fp32"
            and new.get("backend") == "onnx" and new.get("precision") == "fp32")


def _reusable(old: dict | None, embedder: Embedder, encoder: dict, settings: Settings) -> bool:
    """Whether the live build ``old`` was cut and embedded as this build will be, so that its unchanged
    articles' spans and vectors can be taken as they are: same model, encoder (``_same_vectors``), maximum
    length and chunking (the lexical side does not matter)."""
    if old is None or old.get("model") != embedder.name or old.get("dimension") != embedder.dimension:
        return False
    if not _same_vectors(old.get("encoder") or {}, encoder):
        return False
    if (old.get("encoder") or {}).get("max_seq_length", embedder.max_seq_length) != embedder.max_seq_length:
        return False

    def cut(chunking: dict) -> dict:
        return {k: v for k, v in (chunking or {}).items() if k != "lexical"}

    return cut(old.get("chunking")) == cut(chunking_settings(settings))


def _unchanged(old: dict, articles: Sequence[Article]) -> set[str]:
    """Ids of ``articles`` whose content hash is the one the live build ``old`` indexed."""
    indexed = old.get("articles", {})
    return {a.id for a in articles if indexed.get(a.id) == a.content_hash}


class _LiveRows:
    """The live build's passage and sentence rows, read from its SQLite file at most once per build.

    Both the cut (``_previous_layouts``) and the vectors (``_previous_vectors``) of unchanged articles come from
    them; an upload to a large archive would otherwise read every sentence row twice.
    """

    def __init__(self, old: dict):
        self._path = Path(old["_build_dir"]) / PASSAGES_DB
        self._rows: tuple[list, list] | None = None

    def get(self) -> tuple[list, list]:
        """``(passages, sentences)``: ``(id, article_id, start, end, first_sentence, last_sentence)`` and
        ``(id, article_id, start, end)`` rows in id order. Raises ``sqlite3.DatabaseError`` for an unreadable file."""
        if self._rows is None:
            con = sqlite3.connect(f"file:{self._path}?mode=ro", uri=True)
            try:
                passages = con.execute('SELECT id, article_id, start, "end", first_sentence, last_sentence '
                                       "FROM passages ORDER BY id").fetchall()
                sentences = con.execute('SELECT id, article_id, start, "end" FROM sentences ORDER BY id').fetchall()
            finally:
                con.close()
            self._rows = (passages, sentences)
        return self._rows


def _previous_vectors(old: dict | None, embedder: Embedder, encoder: dict, settings: Settings,
                      articles: Sequence[Article], chunks: Chunks,
                      rows: _LiveRows | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Return passage and sentence vector arrays pre-filled (NaN elsewhere) from the live build.

    An article's vectors are reused only when the live build used the same model, encoder, precision and
    chunking, holds the same content hash for it, and cut it into exactly the same spans.
    """
    from .retrieval.dense import read_dense_index

    d = embedder.dimension
    pvecs = np.full((len(chunks.passages), d), np.nan, dtype=np.float32)
    svecs = np.full((len(chunks.sentences), d), np.nan, dtype=np.float32)
    if not _reusable(old, embedder, encoder, settings):
        return pvecs, svecs, 0
    unchanged = _unchanged(old, articles)
    if not unchanged:
        return pvecs, svecs, 0
    build = Path(old["_build_dir"])
    new_p: dict[str, list[int]] = {}
    for i, p in enumerate(chunks.passages):
        new_p.setdefault(p.article_id, []).append(i)
    new_s: dict[str, list[int]] = {}
    for i, (a, _s, _e) in enumerate(chunks.sentences):
        new_s.setdefault(a, []).append(i)
    try:
        passages, sentences = (rows or _LiveRows(old)).get()
        old_p: dict[str, list[tuple[int, int, int]]] = {}
        for pid, a, st, en, _first, _last in passages:
            old_p.setdefault(a, []).append((pid, st, en))
        old_s: dict[str, list[tuple[int, int, int]]] = {}
        for sid, a, st, en in sentences:
            old_s.setdefault(a, []).append((sid, st, en))
        old_index = read_dense_index(build / VECTORS)
        old_sent = np.load(build / SENTENCE_VECTORS, mmap_mode="r")
    except (sqlite3.DatabaseError, RuntimeError, OSError, ValueError):
        logger.warning("previous build unreadable; embedding every article again")
        return pvecs, svecs, 0
    reused = 0
    # (new row, live row) pairs of every reusable article, copied in one read each below: per article, the
    # reads cost more than the copying once an upload to a large archive keeps 100,000 articles (~1.1 s of 3.5).
    p_new: list[int] = []
    p_old: list[int] = []
    s_new: list[int] = []
    s_old: list[int] = []
    for aid in unchanged:
        np_ids, ns_ids = new_p.get(aid, []), new_s.get(aid, [])
        op, os_ = old_p.get(aid, []), old_s.get(aid, [])
        if [(chunks.passages[i].start, chunks.passages[i].end) for i in np_ids] != [(st, en) for _, st, en in op]:
            continue
        if [(chunks.sentences[i][1], chunks.sentences[i][2]) for i in ns_ids] != [(st, en) for _, st, en in os_]:
            continue
        p_new += np_ids
        p_old += [pid for pid, _, _ in op]
        s_new += ns_ids
        s_old += [sid for sid, _, _ in os_]
        reused += 1
    if p_new:
        pvecs[np.asarray(p_new, dtype=np.int64)] = old_index.reconstruct_batch(np.asarray(p_old, dtype=np.int64))
    if s_new:
        old_ids = np.asarray(s_old, dtype=np.int64)
        order = np.argsort(old_ids, kind="stable")  # read the mapped file front to back
        svecs[np.asarray(s_new, dtype=np.int64)[order]] = old_sent[old_ids[order]]
    return pvecs, svecs, reused


def _previous_layouts(old: dict | None, embedder: Embedder, encoder: dict, settings: Settings,
                      articles: Sequence[Article], rows: _LiveRows | None = None) -> dict[str, Layout]:
    """Return the live build's sentence spans and passage windows of every unchanged article.

    Only when the live build was cut with the same settings by the same encoder (same model, export checksum
    and maximum length, so the same token counts): then splitting the article again would give exactly this.
    """
    if not _reusable(old, embedder, encoder, settings):
        return {}
    unchanged = _unchanged(old, articles)
    if not unchanged:
        return {}
    try:
        passages, sentences = (rows or _LiveRows(old)).get()
    except sqlite3.DatabaseError:
        return {}
    first: dict[str, int] = {}
    layouts: dict[str, Layout] = {}
    for sid, aid, start, end in sentences:
        if aid in unchanged:
            first.setdefault(aid, sid)
            layouts.setdefault(aid, ([], []))[0].append((start, end))
    for _pid, aid, _start, _end, lo, hi in passages:
        if aid in layouts:
            layouts[aid][1].append((lo - first[aid], hi - first[aid]))
    return layouts


def _share_encoder(manifest: dict, build_dir: Path, threads: int) -> tuple[Embedder, dict]:
    """Hard-link the ONNX query encoder of the build ``manifest`` describes into ``build_dir``; return it and its entry."""
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
    encoder_of: dict | None = None, encoder_threads: int = SERVING_THREADS,
) -> BuildSummary:
    """Chunk, embed and store ``articles`` as a new build, then publish it atomically.

    Args:
        encoder_of: a manifest (``read_manifest``) whose ONNX encoder this build shares and embeds with,
            instead of exporting ``embedder`` (pass None): single-article updates use it, so a web
            worker adds an article without loading torch, and unchanged articles keep their vectors;
            ``qa-service index`` too when the model is unchanged (``onnx_encoder.shareable_encoder``).
        encoder_threads: onnxruntime threads of that shared encoder (a web worker uses its serving threads;
            the CLI uses both cores).
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
        old_rows = _LiveRows(old) if old is not None else None
        previous = {}
        if encoder_of is not None:
            embedder, encoder = _share_encoder(encoder_of, tmp, encoder_threads)
            # the same encoder as the live build: unchanged articles keep its cut instead of being split again
            previous = _previous_layouts(old, embedder, encoder, settings, articles, old_rows)
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
        vectors, sentence_vectors, reused = _previous_vectors(old, embedder, encoder, settings, articles, chunks,
                                                              old_rows)
        lap("reuse")
        # The lexical files do not depend on the vectors: a forked worker writes them while passages are embedded
        # (for a large archive, several while the dense index and the SQLite file are written).
        lexical = _LexicalWrite(tmp, chunks, articles, embedding=int(np.isnan(vectors[:, 0]).sum()))
        try:
            # A shared encoder's session is opened only now (~0.2 s on one core): till here the build needed its
            # tokenizer alone, and a forked lexical worker, when there is one, now has the other core meanwhile.
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
        # The encoder's files already have their checksums in its entry: computed when it was exported here, or
        # those of the build or cache it is shared from (checked by ``shareable_encoder`` for ``qa-service index``).
        # Recording them instead of hashing the 90 MB model again (~0.07 s of a ~15 s re-index, 11-28) also means
        # a shared file damaged since is caught by the next check, not recorded as good.
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
            "counts": {"articles": len(articles), "passages": len(passages), "sentences": len(chunks.sentences),
                       "reused_articles": reused, "reused_layouts": len(previous)},
            "sentence_vectors": sentence_method,
            "files": files,
            "build_seconds": phases,
        }
        with open(tmp / MANIFEST, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(tmp)
        final = builds / build_id
        os.replace(tmp, final)
        fsync_dir(builds)
        _publish(index_dir, build_id)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(index_dir, keep=build_id)
    return BuildSummary(len(articles), len(passages), time.perf_counter() - started, str(final), reused)


def _publish(index_dir: Path, build_id: str) -> None:
    tmp_pointer = index_dir / f".{CURRENT}.{uuid.uuid4().hex[:8]}"
    with open(tmp_pointer, "w", encoding="utf-8") as fh:
        fh.write(build_id + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp_pointer, index_dir / CURRENT)
    fsync_dir(index_dir)


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
    for path in index_dir.glob(f".{CURRENT}.*"):
        path.unlink(missing_ok=True)
