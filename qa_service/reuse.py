"""Reuse of the live build's unchanged articles: their cut (sentences and passages) and their vectors.

An article is taken as it is only when the live build cut and embedded it as the new build would (same model,
encoder, maximum length, chunking and content hash), so an upload or a re-index embeds only new or changed text:
docs/decisions/build-reuse.md.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Sequence

import numpy as np

from .config import Settings
from .embedding import Embedder
from .chunking import Layout
from .index_texts import Chunks
from .manifest import PASSAGES_DB, SENTENCE_VECTORS, VECTORS, chunking_settings
from .types import Article

logger = logging.getLogger(__name__)


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
    """Whether the live build ``old`` was cut and embedded as this build will be: same model, encoder
    (``_same_vectors``), maximum length and chunking (the lexical side does not matter)."""
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


class LiveRows:
    """The live build's passage and sentence rows, read from its SQLite file at most once per build
    (both ``previous_layouts`` and ``previous_vectors`` need them)."""

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


def previous_vectors(old: dict | None, embedder: Embedder, encoder: dict, settings: Settings,
                     articles: Sequence[Article], chunks: Chunks,
                     rows: LiveRows | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Return passage and sentence vector arrays pre-filled (NaN elsewhere) from the live build, and how many
    articles were reused: those ``_reusable`` and unchanged that were cut into exactly the same spans."""
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
        passages, sentences = (rows or LiveRows(old)).get()
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
    # (new row, live row) pairs of every reusable article, copied in one read each below: for a large archive,
    # reading per article costs more than the copying.
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


def previous_layouts(old: dict | None, embedder: Embedder, encoder: dict, settings: Settings,
                     articles: Sequence[Article], rows: LiveRows | None = None) -> dict[str, Layout]:
    """Return the live build's sentence spans and passage windows of every unchanged article.

    Only when the live build was cut with the same settings by the same encoder (so the same token counts):
    then splitting the article again would give exactly this, and splitting is most of a build's time after
    embedding.
    """
    if not _reusable(old, embedder, encoder, settings):
        return {}
    unchanged = _unchanged(old, articles)
    if not unchanged:
        return {}
    try:
        passages, sentences = (rows or LiveRows(old)).get()
    except sqlite3.DatabaseError:
        return {}
    first: dict[str, int] = {}
    layouts: dict[str, Layout] = {}
    for sid, aid, start, end in sentences:
        if aid in unchanged:
            first.setdefault(aid, sid)
            layouts.setdefault(aid, Layout([], [])).sentences.append((start, end))
    for _pid, aid, _start, _end, lo, hi in passages:
        if aid in layouts:
            layouts[aid].windows.append((lo - first[aid], hi - first[aid]))
    return layouts
