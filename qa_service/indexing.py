"""Bring the index up to date with an articles folder: the library behind ``qa-service index`` and ``serve --build``.

It returns a one-line summary and prints nothing; what a person waiting for it may want to read (articles
skipped, why a rebuild is needed, an interrupted write settled) goes to the ``notes`` callback.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from .config import Settings
from .errors import QAError
from .types import Article

logger = logging.getLogger(__name__)

Notes = Callable[[str], None]


def _log(line: str) -> None:
    logger.info("%s", line)


def ensure_index(settings: Settings, seeds_dir: Path, force: bool = False, progress: bool = True,
                 notes: Notes | None = None) -> str:
    """Build the index from ``seeds_dir`` unless it is fresh (or ``force``); return a one-line summary.

    Holds the index's writer lock meanwhile (``articles.writer_lock``), after settling any article upload that a
    crash interrupted, so a build never races a write from a running service. ``notes`` (default: the log)
    receives the lines worth showing while it runs.
    """
    from .articles import recover, writer_lock

    notes = notes or _log
    if settings.database_url:  # the database serialises its writers itself (an advisory lock)
        return _ensure_database_index(settings, seeds_dir, force, progress, notes)
    with writer_lock(settings.index_dir, timeout=None):
        recovered = recover(settings.index_dir, seeds_dir)
        if recovered:
            notes(recovered)
        return _ensure_folder_index(settings, seeds_dir, force, progress, notes)


def load_seeds(seeds_dir: Path, notes: Notes | None = None, index_dir: Path | None = None) -> list[Article]:
    """Read the articles of ``seeds_dir``, telling ``notes`` about every file skipped or warned about.

    An index kept inside the articles folder (``index_dir``) is not read as articles.

    Raises a ``QAError`` (code ``no_articles``) when none is usable.
    """
    from .ingest import load_articles

    notes = notes or _log
    report = load_articles(seeds_dir, exclude=[index_dir] if index_dir else ())
    for name, reason in report.skipped:
        notes(f"skipped {name}: {reason}")
    for name, reason in report.warnings:
        notes(f"warning {name}: {reason}")
    if not report.articles:
        raise QAError(f"No usable articles in {seeds_dir}.", code="no_articles")
    return report.articles


def _ensure_folder_index(settings: Settings, seeds_dir: Path, force: bool, progress: bool, notes: Notes) -> str:
    from .embedding import load_embedder
    from .manifest import index_status, live_manifest
    from .onnx_encoder import INDEXING_THREADS, cached_export, remember_export, resolve_quantize, shareable_encoder
    from .store import build_index

    articles = load_seeds(seeds_dir, notes, settings.index_dir)
    fresh, reason = index_status(settings, articles)
    if fresh and not force:
        return f"index is up to date: {len(articles)} articles"
    notes(f"building index ({reason})")
    live = live_manifest(settings.index_dir)
    # The same model files as the live index's ONNX export, or as one this machine made for another index: embed
    # with it, without loading torch or exporting (docs/decisions/export-cache.md). Either is used only if its
    # checksums still match.
    quantize = resolve_quantize(settings.quantize, live)  # "auto": the live index's precision
    shared = live if shareable_encoder(live, settings.model, quantize) else cached_export(settings.model, quantize)
    if shared is not None:
        summary = build_index(articles, None, settings, progress=progress, encoder_of=shared,
                              encoder_threads=INDEXING_THREADS)
    else:
        summary = build_index(articles, load_embedder(settings.model), settings, progress=progress)
    remember_export(live_manifest(settings.index_dir))  # for the next new index of this model on this machine
    line = f"indexed {summary.articles} articles, {summary.passages} passages in {summary.seconds:.1f} s"
    if summary.reused_articles:
        line += f" ({summary.reused_articles} unchanged articles not re-embedded)"
    return line


def _ensure_database_index(settings: Settings, seeds_dir: Path, force: bool, progress: bool, notes: Notes) -> str:
    from .backends.postgres_writer import PostgresWriter
    from .embedding import load_embedder
    from .onnx_encoder import INDEXING_THREADS, shareable_encoder

    articles = load_seeds(seeds_dir, notes, settings.index_dir)
    with PostgresWriter(settings) as writer:
        fresh, reason = writer.status(articles)
        if fresh and not force:
            return f"index is up to date: {len(articles)} articles (PostgreSQL)"
        notes(f"building index in PostgreSQL ({reason})")
        # The same model files as the database's ONNX export: embed with that (fetched and checksummed), no torch.
        # --force loads the model and exports again, which is also how a damaged export is repaired.
        shared = not force and shareable_encoder(writer.manifest(), settings.model, settings.quantize,
                                                 check_files=False)
        embedder = None if shared else load_embedder(settings.model)
        summary = writer.sync(articles, embedder, progress=progress, force=force, encoder_threads=INDEXING_THREADS)
    line = (f"indexed {summary['embedded']} new or changed articles ({summary.get('passages', 0)} passages), removed "
            f"{summary['removed']}; the database holds {summary['articles']} articles ({summary['seconds']:.1f} s)")
    return line + (" [re-indexed everything]" if summary["full"] else "")
