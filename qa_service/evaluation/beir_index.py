"""A BEIR corpus's own index: where it is cached, how it is cut into passages, and building it when stale.

Whole-document passages follow the MTEB/BEIR protocol (one vector per document, title + text truncated by
the model); see docs/decisions/scifact-protocol.md.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from pathlib import Path

from ..config import Settings
from .datasets import beir_articles

logger = logging.getLogger(__name__)

# The store caps passages at the model's window, so with this cap and token counts clipped to the window
# (``whole_document_embedder``) every document packs into one passage.
WHOLE_DOCUMENT_MAX_TOKENS = 1 << 20
WHOLE_DOCUMENT_SUFFIX = "-whole"


def beir_index_dir(folder: Path | str, cache_root: Path | str, whole_documents: bool = False) -> Path:
    """Return ``cache_root/<name>-<corpus sha256[:12]>`` (``-whole`` added for whole-document passages).

    A new corpus gets a new folder, and the two ways of cutting it into passages each keep their own,
    so switching ``whole_documents`` back and forth never rebuilds either.
    """
    folder = Path(folder)
    h = hashlib.sha256()
    with open(folder / "corpus.jsonl", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return Path(cache_root) / f"{folder.name}-{h.hexdigest()[:12]}{WHOLE_DOCUMENT_SUFFIX if whole_documents else ''}"


def whole_document_embedder(embedder):
    """Return a copy of ``embedder`` whose ``count_tokens`` counts only the tokens the model reads.

    With it every text fits one window, so chunking makes one passage per document (and never cuts a
    long sentence: the encoder truncates it). Encoding, the model and its ONNX export are unchanged.
    """
    window = max(1, int(embedder.max_seq_length) - 2)  # [CLS] and [SEP] take two places
    count = embedder.count_tokens
    whole = copy.copy(embedder)
    whole.count_tokens = lambda text: min(count(text), window)
    whole.counts_add_up = False  # clipped counts do not add up
    return whole


def beir_settings_for(settings: Settings, index_dir: Path, whole_documents: bool = False) -> Settings:
    """Settings of a BEIR corpus's index: its own folder, and whole-document passages if asked."""
    if whole_documents:
        return settings.with_(index_dir=index_dir, max_tokens=WHOLE_DOCUMENT_MAX_TOKENS)
    return settings.with_(index_dir=index_dir)


def retrieval_config(settings: Settings, whole_documents: bool = False):
    """The Searcher's ``RetrievalConfig`` for an evaluation; None keeps the service's defaults.

    Whole documents are scored by the plain passage cosine (``sentence_weight=0``), as MTEB scores them,
    instead of mixing in the cosine of the document's best sentence.
    """
    if not whole_documents:
        return None
    from ..retrieval.searcher import RetrievalConfig

    return RetrievalConfig(reranker=settings.reranker, sentence_weight=0.0)


def ensure_beir_index(folder: Path | str, settings: Settings, cache_root: Path | str, embedder=None,
                      progress: bool = False, whole_documents: bool = False) -> tuple[Settings, str]:
    """Index the BEIR corpus under ``cache_root`` unless a fresh build is there; return its settings and a note.

    Freshness is the store's own check (model, chunking settings, every document's hash), so a
    changed model or chunking rebuilds too.

    Args:
        whole_documents: one passage per document (see ``whole_document_embedder``), in its own folder.
    """
    from ..articles import writer_lock
    from ..store import build_index, index_status

    index_dir = beir_index_dir(folder, cache_root, whole_documents)
    beir_settings = beir_settings_for(settings, index_dir, whole_documents)
    articles = beir_articles(folder)
    each = ", one passage each" if whole_documents else ""
    with writer_lock(index_dir, timeout=None):  # two evaluations of one corpus build it once
        fresh, reason = index_status(beir_settings, articles)
        if fresh:
            return beir_settings, f"using cached index {index_dir} ({len(articles)} documents{each})"
        if embedder is None:  # torch only when there is something to embed
            from ..embedding import load_embedder

            embedder = load_embedder(settings.model)
        if whole_documents:
            embedder = whole_document_embedder(embedder)
        logger.info("indexing %s into %s (%s)", folder, index_dir, reason)
        summary = build_index(articles, embedder, beir_settings, progress=progress)
    reused = f", vectors of {summary.reused_articles} reused" if getattr(summary, "reused_articles", 0) else ""
    return beir_settings, (f"indexed {summary.articles} documents, {summary.passages} passages into {index_dir} "
                           f"in {summary.seconds:.1f} s ({reason}{reused})")
