"""Add, replace or remove one article: the seeds folder and the index change together or not at all.

The seeds folder is the source of truth and the index is derived from it. One write takes the writer lock
(``fcntl.flock`` on ``index/write.lock``, dropped by the kernel if the process dies), settles any write a crash
interrupted (``recover``), stages the new file beside its target, journals the operation, builds and publishes
the index (replacing ``index/CURRENT`` is the single commit point), applies the staged file and forgets the
journal; a crash at any point leaves the old seeds with the old index or the new with the new, never a mix:
docs/decisions/write-protocol.md. Article ids come from a strict ASCII allow-list (``ARTICLE_ID``), so
``<id>.txt`` always names a file directly inside the seeds folder.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .config import Settings
from .errors import (ArticleNotFound, IndexNotBuilt, InvalidArticle, LastArticle, SeedsOutOfSync, WriteBusy,
                     WritesUnavailable)
from .files import fsync_dir, write_bytes_atomically, write_json_atomically
from .manifest import CURRENT, live_manifest, read_manifest
from .types import Article

logger = logging.getLogger(__name__)

ARTICLE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$"
ARTICLE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}", re.ASCII)
LOCK_FILE = "write.lock"
JOURNAL = "write-journal.json"
STAGED_SUFFIX = ".staged"


@dataclass
class WriteResult:
    """What a write did: ``action`` is created, replaced, unchanged or deleted."""

    article_id: str
    action: str
    build_id: str | None
    articles: int
    embedded_articles: int  # articles whose text was embedded for this write (0 or 1)
    seconds: float


def _checkpoint(step: str) -> None:
    """Mark a step of the write protocol; does nothing (the crash tests replace it to kill the process here)."""


# --------------------------------------------------------------------------- names

def check_article_id(article_id: object) -> str:
    """Return ``article_id`` if it is on the allow-list, else raise ``InvalidArticle``."""
    if not isinstance(article_id, str) or not ARTICLE_ID.fullmatch(article_id):
        shown = repr(article_id)[:60] if isinstance(article_id, str) else type(article_id).__name__
        raise InvalidArticle(f"The article id {shown} is not allowed: use 1 to 100 ASCII letters, digits, '-' "
                             "or '_', starting with a letter or digit.", code="article_id_invalid")
    return article_id


def article_path(seeds_dir: Path, article_id: str) -> Path:
    """Return ``seeds_dir/<id>.txt`` for an allowed id; never a path outside ``seeds_dir``."""
    check_article_id(article_id)
    folder = Path(seeds_dir).resolve()
    path = folder / f"{article_id}.txt"
    if path.parent != folder or path.name != f"{article_id}.txt":  # defence in depth: the regex already ensures it
        raise InvalidArticle("The article id is not allowed.", code="article_id_invalid")
    return path


def _seeds_dir(settings: Settings) -> Path:
    """The folder writes go to: ``settings.seeds_dir``, else the one the live index was built from."""
    if settings.seeds_dir is not None:
        folder = Path(settings.seeds_dir)
    else:
        manifest = live_manifest(settings.index_dir)
        recorded = (manifest or {}).get("articles_dir")
        folder = Path(recorded) if recorded else Path("seeds")
    if not folder.is_dir():
        raise WritesUnavailable(f"The articles folder {folder} does not exist, so articles cannot be written.")
    return folder.resolve()


# --------------------------------------------------------------------------- the journal

def _read_journal(index_dir: Path) -> dict | None:
    try:
        return json.loads((index_dir / JOURNAL).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def _current_build(index_dir: Path) -> str | None:
    try:
        return (Path(index_dir) / CURRENT).read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------- the lock

@contextmanager
def writer_lock(index_dir: Path, timeout: float | None = 30.0) -> Iterator[None]:
    """Hold the index's writer lock; wait at most ``timeout`` seconds (None: as long as it takes).

    Raises ``WriteBusy`` when another writer keeps it longer.
    """
    index_dir = Path(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(index_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if timeout is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                if time.monotonic() >= deadline:
                    raise WriteBusy("Another change to the articles is in progress; try again in a few seconds.")
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


# --------------------------------------------------------------------------- recovery

def _remove_stray_staged(folder: Path, keep: str | None) -> None:
    if not folder.is_dir():
        return
    # staged files, and the temporary files a staged file is written through
    for path in [*folder.glob(f".*{STAGED_SUFFIX}"), *folder.glob(f".*{STAGED_SUFFIX}.*.tmp")]:
        if path.name != keep:
            logger.info("removing %s, left by an interrupted write", path.name)
            path.unlink(missing_ok=True)


def recover(index_dir: Path, seeds_dir: Path | None = None) -> str | None:
    """Finish or undo a write that a crash interrupted; the caller holds the writer lock.

    Returns a sentence saying what was done, or None when there was nothing to do.
    """
    index_dir = Path(index_dir)
    for path in index_dir.glob(f".{JOURNAL}.*"):  # a journal that was never put in place
        path.unlink(missing_ok=True)
    journal = _read_journal(index_dir)
    if journal is None:
        if seeds_dir is not None:
            _remove_stray_staged(Path(seeds_dir), None)
        return None
    seeds = Path(journal["seeds_dir"])
    article_id = check_article_id(journal["id"])
    target = seeds / f"{article_id}.txt"
    staged = seeds / journal["staged"] if journal.get("staged") else None
    committed = _current_build(index_dir) != journal.get("base_build")
    if committed:
        if journal["op"] == "put":
            if staged is not None and staged.exists():
                os.replace(staged, target)
        else:
            target.unlink(missing_ok=True)
        fsync_dir(seeds)
        what = "finished"
    else:
        if staged is not None:
            staged.unlink(missing_ok=True)
        what = "undid"
    (index_dir / JOURNAL).unlink()
    fsync_dir(index_dir)
    _remove_stray_staged(seeds, None)
    message = f"{what} an interrupted {'upload' if journal['op'] == 'put' else 'removal'} of article {article_id}"
    logger.warning("%s", message)
    return message


def recover_if_idle(index_dir: Path) -> str | None:
    """Run ``recover`` if a journal is there and no writer holds the lock right now (web workers)."""
    if not (Path(index_dir) / JOURNAL).exists():
        return None
    try:
        with writer_lock(index_dir, timeout=0):
            return recover(index_dir)
    except WriteBusy:
        return None


# --------------------------------------------------------------------------- writes

def _build(settings: Settings, articles: list[Article], embedder, seeds: Path):
    """Build and publish an index of ``articles`` read from ``seeds``, embedding only what changed."""
    from .embedding.onnx_encoder import onnx_backend_is_used
    from .store import build_index

    if embedder is not None:
        return build_index(articles, embedder, settings, articles_dir=seeds)
    manifest = read_manifest(settings.index_dir)
    if onnx_backend_is_used(manifest):  # the index's own encoder: no torch in a web worker
        return build_index(articles, None, settings, encoder_of=manifest, articles_dir=seeds)
    from .embedding import load_embedder

    return build_index(articles, load_embedder(settings.model), settings, articles_dir=seeds)


def _live_articles(index_dir: Path) -> dict:
    return read_manifest(index_dir).get("articles", {})


def _seed_articles(seeds: Path, index_dir: Path) -> dict[str, Article]:
    from .ingest import load_articles

    return {a.id: a for a in load_articles(seeds, exclude=[index_dir]).articles}


def _check_in_sync(seeds: Path, current: dict[str, Article], live: dict, article_id: str) -> None:
    """Refuse to write when the folder and the index already differ in another article than ``article_id``."""
    on_disk = {i: a.content_hash for i, a in current.items() if i != article_id}
    indexed = {i: h for i, h in live.items() if i != article_id}
    if on_disk != indexed:
        differ = sorted(set(on_disk) ^ set(indexed) | {i for i in set(on_disk) & set(indexed) if on_disk[i] != indexed[i]})
        raise SeedsOutOfSync(f"The articles folder and the index disagree about {len(differ)} other article(s) "
                             f"(e.g. {differ[0]!r}); rebuild the index from the folder first (qa-service index).")


def _commit(settings: Settings, journal: dict, articles: list[Article], embedder) -> str:
    """Journal, build and publish, apply to the seeds folder, forget the journal; return the new build id."""
    index_dir = Path(settings.index_dir)
    write_json_atomically(index_dir / JOURNAL, journal)
    _checkpoint("journaled")
    try:
        summary = _build(settings, articles, embedder, Path(journal["seeds_dir"]))
    except BaseException:
        recover(index_dir)  # the build failed before or after publishing: settle it either way
        raise
    _checkpoint("published")
    seeds = Path(journal["seeds_dir"])
    target = seeds / f"{journal['id']}.txt"
    if journal["op"] == "put":
        os.replace(seeds / journal["staged"], target)
    else:
        target.unlink(missing_ok=True)
    fsync_dir(seeds)
    _checkpoint("applied")
    (index_dir / JOURNAL).unlink()
    fsync_dir(index_dir)
    return Path(summary.build_dir).name


def put_article(settings: Settings, article_id: str, data: bytes, embedder=None,
                timeout: float | None = None) -> WriteResult:
    """Add or replace the article ``<id>.txt`` with ``data`` (the file's bytes) and index it, atomically.

    Args:
        embedder: what embeds the new text; None: the live index's own encoder (the service's case).
        timeout: seconds to wait for another writer (default ``settings.write_timeout``).
    """
    started = time.perf_counter()
    article_id = check_article_id(article_id)
    settings = settings.with_(ray_address=None)  # one article is never worth starting (or joining) a Ray
    if b"\x00" in data:
        raise InvalidArticle("The article text contains NUL characters.")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArticle(f"The article text is not valid UTF-8 (byte {exc.start}).") from None
    if settings.database_url:
        return _put_in_database(settings, article_id, data, embedder, started)
    seeds = _seeds_dir(settings)
    target = article_path(seeds, article_id)
    index_dir = Path(settings.index_dir)
    with writer_lock(index_dir, settings.write_timeout if timeout is None else timeout):
        recover(index_dir, seeds)
        base = _current_build(index_dir)
        if base is None:
            raise IndexNotBuilt(f"No index found in {index_dir}: build one before adding articles.")
        staged = seeds / f".{article_id}.txt.{uuid.uuid4().hex[:12]}{STAGED_SUFFIX}"
        write_bytes_atomically(staged, data)  # durable, its folder entry too
        _checkpoint("staged")
        try:
            from .ingest import LoadReport, load_article

            report = LoadReport()
            article = load_article(staged, report)
            if article is None:
                reason = report.skipped[0][1] if report.skipped else "unusable"
                raise InvalidArticle(f"The article text cannot be used: {reason}.")
            article = dataclasses.replace(article, id=article_id, source=target.name)
            current = _seed_articles(seeds, index_dir)
            previous = current.get(article_id)
            live = _live_articles(index_dir)
            _check_in_sync(seeds, current, live, article_id)
            if previous is not None and previous.content_hash == article.content_hash \
                    and live.get(article_id) == article.content_hash:
                staged.unlink()
                return WriteResult(article_id, "unchanged", base, len(live), 0, time.perf_counter() - started)
            current[article_id] = article
            articles = sorted(current.values(), key=lambda a: a.source)  # the order load_articles reads them in
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        sha = hashlib.sha256(data).hexdigest()
        journal = {"op": "put", "id": article_id, "seeds_dir": str(seeds), "staged": staged.name, "sha256": sha,
                   "base_build": base}
        build_id = _commit(settings, journal, articles, embedder)
    action = "replaced" if previous is not None or article_id in live else "created"
    return WriteResult(article_id, action, build_id, len(articles), 1, time.perf_counter() - started)


def delete_article(settings: Settings, article_id: str, embedder=None, timeout: float | None = None) -> WriteResult:
    """Remove the article ``<id>.txt`` from the seeds folder and the index, atomically."""
    started = time.perf_counter()
    article_id = check_article_id(article_id)
    settings = settings.with_(ray_address=None)  # the rebuild re-embeds nothing new: no Ray
    if settings.database_url:
        return _delete_in_database(settings, article_id, started)
    seeds = _seeds_dir(settings)
    target = article_path(seeds, article_id)
    index_dir = Path(settings.index_dir)
    with writer_lock(index_dir, settings.write_timeout if timeout is None else timeout):
        recover(index_dir, seeds)
        base = _current_build(index_dir)
        if base is None:
            raise IndexNotBuilt(f"No index found in {index_dir}.")
        live = _live_articles(index_dir)
        if not target.is_file() and article_id not in live:
            raise ArticleNotFound(f"There is no article with id {article_id!r}.")
        current = _seed_articles(seeds, index_dir)
        _check_in_sync(seeds, current, live, article_id)
        articles = [a for a in current.values() if a.id != article_id]
        if not articles:
            raise LastArticle("This is the only article; the index cannot be empty. Add another one first.")
        articles.sort(key=lambda a: a.source)
        journal = {"op": "delete", "id": article_id, "seeds_dir": str(seeds), "staged": None, "sha256": None,
                   "base_build": base}
        build_id = _commit(settings, journal, articles, embedder)
    return WriteResult(article_id, "deleted", build_id, len(articles), 0, time.perf_counter() - started)


# --------------------------------------------------------------------------- PostgreSQL

def _parse_upload(article_id: str, data: bytes) -> Article:
    """Clean uploaded bytes exactly as ``load_articles`` cleans a file named ``<id>.txt``."""
    import tempfile

    from .ingest import LoadReport, load_article

    with tempfile.TemporaryDirectory(prefix="qa-upload-") as folder:
        path = Path(folder) / f"{article_id}.txt"
        path.write_bytes(data)
        report = LoadReport()
        article = load_article(path, report)
    if article is None:
        reason = report.skipped[0][1] if report.skipped else "unusable"
        raise InvalidArticle(f"The article text cannot be used: {reason}.")
    return dataclasses.replace(article, id=article_id, source=f"{article_id}.txt")


def _put_in_database(settings: Settings, article_id: str, data: bytes, embedder, started: float) -> WriteResult:
    """Add or replace one article in the PostgreSQL index: one transaction, seen by every service at once.

    The database is the source of truth here (no seeds folder is written): the new text is embedded
    first, then its rows replace the old ones in a single transaction (``PostgresWriter.sync``).
    """
    from .backends.postgres_writer import PostgresWriter

    article = _parse_upload(article_id, data)
    with PostgresWriter(settings) as writer:
        before = writer.indexed().get(article_id)
        if before == article.content_hash:
            manifest = writer.manifest() or {}
            return WriteResult(article_id, "unchanged", manifest.get("build_id"), len(writer.indexed()), 0,
                               time.perf_counter() - started)
        summary = writer.sync([article], embedder, remove_missing=False)
        build_id = (writer.manifest() or {}).get("build_id")
    return WriteResult(article_id, "replaced" if before else "created", build_id, summary["articles"], 1,
                       time.perf_counter() - started)


def _delete_in_database(settings: Settings, article_id: str, started: float) -> WriteResult:
    from .backends.postgres_writer import PostgresWriter

    with PostgresWriter(settings) as writer:
        remaining = writer.delete(article_id)
        build_id = (writer.manifest() or {}).get("build_id")
    return WriteResult(article_id, "deleted", build_id, remaining, 0, time.perf_counter() - started)
