"""Bring the index up to date with an articles folder: the library behind ``qa-service index`` and ``serve --build``.

It returns an ``IndexReport`` (or its one-line summary) and prints nothing; what a person waiting for it may want
to read (articles skipped, why a rebuild is needed, an interrupted write settled) goes to the ``notes`` callback.
The index records the absolute folder it was built from, so later commands and writes find that folder from any
working directory (``articles_folder``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import DEFAULT_SEEDS_DIR, Settings
from .errors import QAError
from .types import Article

logger = logging.getLogger(__name__)

Notes = Callable[[str], None]


def _log(line: str) -> None:
    logger.info("%s", line)


@dataclass
class IndexReport:
    """What one ``index_folder`` run did: ``line`` is the summary a person reads, the rest its details."""

    line: str
    articles: int
    passages: int | None  # None when the index was already up to date and nothing was built
    folder: str
    fresh: bool  # nothing to do: the index already held exactly these articles
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file or record, reason)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    removed: int = 0  # articles of the previous index that are gone
    added: int = 0  # articles the previous index did not hold
    replaced_folder: str | None = None  # the other folder the previous index was built from

    def to_json(self) -> dict:
        """The ``qa-service index --json`` object."""
        return {"summary": self.line, "folder": self.folder, "up_to_date": self.fresh, "articles": self.articles,
                "passages": self.passages,
                "skipped": [{"file": name, "reason": reason} for name, reason in self.skipped],
                "warnings": [{"file": name, "reason": reason} for name, reason in self.warnings],
                "removed": self.removed, "added": self.added, "replaced_folder": self.replaced_folder}


def indexed_folder(settings: Settings) -> Path | None:
    """The absolute articles folder the live index (FAISS folder or database) was built from, or None."""
    from .manifest import live_manifest, recorded_articles_dir

    if settings.database_url:
        from .backends import read_index_manifest

        try:
            manifest, _ = read_index_manifest(settings)
        except QAError:
            return None
    else:
        manifest = live_manifest(settings.index_dir)
    return recorded_articles_dir(manifest)


def articles_folder(settings: Settings) -> Path:
    """The articles folder to read and write: ``settings.seeds_dir`` (--seeds-dir, QA_SEEDS_DIR) when given, else
    the folder the index names, else ``DEFAULT_SEEDS_DIR``."""
    if settings.seeds_dir is not None:
        return Path(settings.seeds_dir)
    return indexed_folder(settings) or DEFAULT_SEEDS_DIR


def ensure_index(settings: Settings, seeds_dir: Path, force: bool = False, progress: bool = True,
                 notes: Notes | None = None) -> str:
    """Build the index from ``seeds_dir`` unless it is fresh (or ``force``); return a one-line summary."""
    return index_folder(settings, seeds_dir, force=force, progress=progress, notes=notes).line


def index_folder(settings: Settings, seeds_dir: Path, force: bool = False, progress: bool = True,
                 notes: Notes | None = None) -> IndexReport:
    """Build the index from ``seeds_dir`` unless it is fresh (or ``force``); return what was done.

    Holds the index's writer lock meanwhile (``articles.writer_lock``), after settling any article upload that a
    crash interrupted, so a build never races a write from a running service. ``notes`` (default: the log)
    receives the lines worth showing while it runs.
    """
    from .articles import recover, writer_lock

    notes = notes or _log
    seeds_dir = Path(seeds_dir).resolve()
    if settings.database_url:  # the database serialises its writers itself (an advisory lock)
        return _ensure_database_index(settings, seeds_dir, force, progress, notes)
    with writer_lock(settings.index_dir, timeout=None):
        recovered = recover(settings.index_dir, seeds_dir)
        if recovered:
            notes(recovered)
        return _ensure_folder_index(settings, seeds_dir, force, progress, notes)


def _read(seeds_dir: Path, notes: Notes, index_dir: Path | None):
    """Read the folder, telling ``notes`` about every file skipped or warned about; the ``LoadReport``."""
    from .ingest import READERS, load_articles

    report = load_articles(seeds_dir, exclude=[index_dir] if index_dir else ())
    for name, reason in report.skipped:
        notes(f"skipped {name}: {reason}")
    for name, reason in report.warnings:
        notes(f"warning {name}: {reason}")
    if not report.articles:
        kinds = ", ".join(sorted(READERS))
        what = f"{len(report.skipped)} file(s) or record(s) skipped, each named above; " if report.skipped else ""
        raise QAError(f"No usable articles in {seeds_dir} ({what}articles are read from {kinds} files, in any "
                      "letter case, in the folder and its subfolders).", code="no_articles")
    return report


def load_seeds(seeds_dir: Path, notes: Notes | None = None, index_dir: Path | None = None) -> list[Article]:
    """Read the articles of ``seeds_dir``, telling ``notes`` about every file skipped or warned about.

    An index kept inside the articles folder (``index_dir``) is not read as articles.

    Raises a ``QAError`` (code ``no_articles``) when none is usable.
    """
    return _read(seeds_dir, notes or _log, index_dir).articles


def _changes(previous: dict | None, report, seeds_dir: Path, notes: Notes) -> dict:
    """How the new articles differ from those of the index ``previous`` describes (a manifest, or None); says so
    in ``notes`` when the index was built from another folder."""
    old_ids = set((previous or {}).get("articles") or {})
    new_ids = {a.id for a in report.articles}
    old_dir = (previous or {}).get("articles_dir")
    out = {"removed": len(old_ids - new_ids), "added": len(new_ids - old_ids), "replaced_folder": None}
    if previous is not None and old_dir and Path(old_dir) != seeds_dir:
        out["replaced_folder"] = old_dir
        notes(f"index: replacing {len(old_ids)} articles from {old_dir} with {len(new_ids)} from {seeds_dir} "
              f"({out['removed']} removed, {out['added']} added)")
    return out


def _ensure_folder_index(settings: Settings, seeds_dir: Path, force: bool, progress: bool,
                         notes: Notes) -> IndexReport:
    from .embedding import load_embedder
    from .embedding.export_cache import cached_export, remember_export, shareable_encoder
    from .embedding.onnx_encoder import INDEXING_THREADS, resolve_quantize
    from .manifest import index_status, live_manifest
    from .store import build_index

    report = _read(seeds_dir, notes, settings.index_dir)
    articles = report.articles
    fresh, reason = index_status(settings, articles, articles_dir=seeds_dir)
    live = live_manifest(settings.index_dir)
    base = {"folder": str(seeds_dir), "skipped": report.skipped, "warnings": report.warnings}
    if fresh and not force:
        return IndexReport(f"index is up to date: {len(articles)} articles", len(articles), None, fresh=True, **base)
    changes = _changes(live, report, seeds_dir, notes)
    notes(f"building index ({reason})")
    # The same model files as the live index's ONNX export, or as one this machine made for another index: embed
    # with it, without loading torch or exporting (docs/decisions/export-cache.md). Either is used only if its
    # checksums still match.
    quantize = resolve_quantize(settings.quantize, live)  # "auto": the live index's precision
    shared = live if shareable_encoder(live, settings.model, quantize) else cached_export(settings.model, quantize)
    if shared is not None:
        summary = build_index(articles, None, settings, progress=progress, encoder_of=shared,
                              encoder_threads=INDEXING_THREADS, articles_dir=seeds_dir)
    else:
        summary = build_index(articles, load_embedder(settings.model), settings, progress=progress,
                              articles_dir=seeds_dir)
    remember_export(live_manifest(settings.index_dir))  # for the next new index of this model on this machine
    line = f"indexed {summary.articles} articles, {summary.passages} passages in {summary.seconds:.1f} s"
    if summary.reused_articles:
        line += f" ({summary.reused_articles} unchanged articles not re-embedded)"
    return IndexReport(line, summary.articles, summary.passages, fresh=False, **base, **changes)


def _ensure_database_index(settings: Settings, seeds_dir: Path, force: bool, progress: bool,
                           notes: Notes) -> IndexReport:
    from .backends.postgres_writer import PostgresWriter
    from .embedding import load_embedder
    from .embedding.export_cache import shareable_encoder
    from .embedding.onnx_encoder import INDEXING_THREADS

    report = _read(seeds_dir, notes, settings.index_dir)
    articles = report.articles
    base = {"folder": str(seeds_dir), "skipped": report.skipped, "warnings": report.warnings}
    with PostgresWriter(settings) as writer:
        fresh, reason = writer.status(articles, articles_dir=seeds_dir)
        if fresh and not force:
            return IndexReport(f"index is up to date: {len(articles)} articles (PostgreSQL)", len(articles), None,
                               fresh=True, **base)
        previous = writer.manifest()
        if previous is not None:
            previous = {**previous, "articles": writer.indexed()}
        changes = _changes(previous, report, seeds_dir, notes)
        notes(f"building index in PostgreSQL ({reason})")
        # The same model files as the database's ONNX export: embed with that (fetched and checksummed), no torch.
        # --force loads the model and exports again, which is also how a damaged export is repaired.
        shared = not force and shareable_encoder(writer.manifest(), settings.model, settings.quantize,
                                                 check_files=False)
        embedder = None if shared else load_embedder(settings.model)
        summary = writer.sync(articles, embedder, progress=progress, force=force, encoder_threads=INDEXING_THREADS,
                              articles_dir=seeds_dir)
    line = (f"indexed {summary['embedded']} new or changed articles ({summary.get('passages', 0)} passages), removed "
            f"{summary['removed']}; the database holds {summary['articles']} articles ({summary['seconds']:.1f} s)")
    line += " [re-indexed everything]" if summary["full"] else ""
    return IndexReport(line, summary["articles"], summary.get("passages", 0), fresh=False, **base, **changes)
