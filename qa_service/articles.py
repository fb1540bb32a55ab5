"""Add, replace or remove one article: the seeds folder and the index change together or not at all.

The seeds folder is the source of truth and the index is derived from it. One write takes the writer lock
(``fcntl.flock`` on ``index/write.lock``, dropped by the kernel if the process dies), settles any write a crash
interrupted (``recover``), stages the new file beside its target, journals the operation, builds and publishes
the index (replacing ``index/CURRENT`` is the single commit point), applies the staged file and forgets the
journal; a crash at any point leaves the old seeds with the old index or the new with the new, never a mix:
docs/decisions/write-protocol.md. Article ids come from a strict ASCII allow-list (``ARTICLE_ID``), so
``<id>.txt`` always names a file directly inside the seeds folder. An article written with metadata (title, date,
url, outlet, author) is stored as ``<id>.md`` with YAML front matter, so a rebuild from the folder gives the same
article; the other of the two files, if there, goes in the same step.
"""

from __future__ import annotations

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

from .config import DEFAULT_SEEDS_DIR, Settings
from .errors import (ArticleNotFound, IndexNotBuilt, InvalidArticle, LastArticle, QAError, SeedsOutOfSync,
                     WriteBusy, WritesUnavailable)
from .files import fsync_dir, write_bytes_atomically, write_json_atomically
from .manifest import CURRENT, live_manifest, read_manifest, recorded_articles_dir
from .types import Article

logger = logging.getLogger(__name__)

ARTICLE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$"
ARTICLE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}", re.ASCII)
LOCK_FILE = "write.lock"
JOURNAL = "write-journal.json"
STAGED_SUFFIX = ".staged"
WRITTEN_SUFFIXES = (".txt", ".md")  # the files a write makes: plain text, or Markdown with front matter
METADATA_FIELDS = ("title", "date", "url", "outlet", "author")  # front matter keys, as the .md reader reads them


@dataclass
class WriteResult:
    """What a write did: ``action`` is created, replaced, unchanged or deleted."""

    article_id: str
    action: str
    build_id: str | None
    articles: int
    embedded_articles: int  # articles whose text was embedded for this write (0 or 1)
    seconds: float
    article: Article | None = None  # the article as indexed (None after a removal)


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


def article_path(seeds_dir: Path, article_id: str, suffix: str = ".txt") -> Path:
    """Return ``seeds_dir/<id><suffix>`` (``.txt`` or ``.md``) for an allowed id; never a path outside
    ``seeds_dir``."""
    check_article_id(article_id)
    if suffix not in WRITTEN_SUFFIXES:
        raise ValueError(f"articles are written as {' or '.join(WRITTEN_SUFFIXES)}, not {suffix}")
    folder = Path(seeds_dir).resolve()
    path = folder / f"{article_id}{suffix}"
    if path.parent != folder or path.name != f"{article_id}{suffix}":  # defence in depth: the regex ensures it
        raise InvalidArticle("The article id is not allowed.", code="article_id_invalid")
    return path


def article_file(article_id: str, text: str, metadata: dict | None) -> tuple[str, bytes]:
    """The file name and bytes an uploaded article is stored as: ``<id>.txt`` holding ``text`` when there is no
    metadata, else ``<id>.md`` with the metadata as YAML front matter (``METADATA_FIELDS``) above ``text``."""
    import yaml

    fields = {k: v for k, v in (metadata or {}).items() if v is not None}
    unknown = set(fields) - set(METADATA_FIELDS)
    if unknown:
        raise ValueError(f"unknown metadata field(s) {sorted(unknown)}")
    if not fields:
        return f"{article_id}.txt", text.encode("utf-8")
    front = yaml.safe_dump({k: fields[k] for k in METADATA_FIELDS if k in fields}, allow_unicode=True,
                           sort_keys=False, default_flow_style=False, width=10_000)
    return f"{article_id}.md", f"---\n{front}---\n{text}".encode("utf-8")


def _seeds_dir(settings: Settings) -> Path:
    """The folder writes go to: ``settings.seeds_dir``, else the one the live index was built from."""
    if settings.seeds_dir is not None:
        folder = Path(settings.seeds_dir)
    else:
        folder = recorded_articles_dir(live_manifest(settings.index_dir)) or DEFAULT_SEEDS_DIR
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


def _journal_files(journal: dict) -> tuple[str | None, list[str]]:
    """The file a journaled write puts in place (None for a removal) and the files it removes. A journal from
    before writes could store ``<id>.md`` names neither: then it is ``<id>.txt`` either way."""
    article_id = check_article_id(journal["id"])
    allowed = {f"{article_id}{suffix}" for suffix in WRITTEN_SUFFIXES}
    if "target" not in journal:
        name = f"{article_id}.txt"
        return (name, []) if journal["op"] == "put" else (None, [name])
    target, remove = journal["target"], list(journal.get("remove") or [])
    if (target is not None and target not in allowed) or not set(remove) <= allowed:
        raise ValueError(f"the write journal names files other than {sorted(allowed)}")
    return target, remove


def _apply(journal: dict) -> None:
    """Apply a published write to the seeds folder: put the staged file in place, then remove the article's other
    file (a ``.txt`` replaced by a ``.md`` or the reverse). Safe to repeat after a crash at any point of it."""
    seeds = Path(journal["seeds_dir"])
    target, remove = _journal_files(journal)
    if journal["op"] == "put":
        staged = seeds / journal["staged"]
        if staged.exists():
            os.replace(staged, seeds / target)
            _checkpoint("replaced")
    for name in remove:
        (seeds / name).unlink(missing_ok=True)
    fsync_dir(seeds)


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
    staged = seeds / journal["staged"] if journal.get("staged") else None
    committed = _current_build(index_dir) != journal.get("base_build")
    if committed:
        _apply(journal)
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
        differ = sorted(set(on_disk) ^ set(indexed)
                        | {i for i in set(on_disk) & set(indexed) if on_disk[i] != indexed[i]})
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
    _apply(journal)
    _checkpoint("applied")
    (index_dir / JOURNAL).unlink()
    fsync_dir(index_dir)
    return Path(summary.build_dir).name


def _not_writable(article: Article) -> QAError:
    """The error for a write to an article that a file of another kind holds (a record of a feed, an HTML page):
    rewriting it as ``<id>.md`` would leave two files with one id."""
    return QAError(f"The article {article.id!r} is read from {article.source}, which writes do not change; edit "
                   "that file and re-index instead.", code="article_not_writable", status=409)


def put_article(settings: Settings, article_id: str, data: bytes, embedder=None,
                timeout: float | None = None, metadata: dict | None = None) -> WriteResult:
    """Add or replace the article ``article_id`` and index it, atomically.

    Without ``metadata`` the file ``<id>.txt`` holds ``data`` (read by the plain-text rules: a dateline or
    ``date`` line and a headline may lead). With it (``METADATA_FIELDS``: title, date, url, outlet, author) the file
    is ``<id>.md``, the metadata as front matter and ``data`` as the body. Either replaces the other.

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
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArticle(f"The article text is not valid UTF-8 (byte {exc.start}).") from None
    name, data = article_file(article_id, text, metadata)
    article = _parse_upload(article_id, name, data)
    if settings.database_url:
        return _put_in_database(settings, article, embedder, started)
    seeds = _seeds_dir(settings)
    target = article_path(seeds, article_id, Path(name).suffix)
    others = [article_path(seeds, article_id, suffix) for suffix in WRITTEN_SUFFIXES if suffix != target.suffix]
    index_dir = Path(settings.index_dir)
    with writer_lock(index_dir, settings.write_timeout if timeout is None else timeout):
        recover(index_dir, seeds)
        base = _current_build(index_dir)
        if base is None:
            raise IndexNotBuilt(f"No index found in {index_dir}: build one before adding articles.")
        staged = seeds / f".{target.name}.{uuid.uuid4().hex[:12]}{STAGED_SUFFIX}"
        write_bytes_atomically(staged, data)  # durable, its folder entry too
        _checkpoint("staged")
        try:
            current = _seed_articles(seeds, index_dir)
            previous = current.get(article_id)
            if previous is not None and previous.source not in {f"{article_id}{x}" for x in WRITTEN_SUFFIXES}:
                raise _not_writable(previous)
            live = _live_articles(index_dir)
            _check_in_sync(seeds, current, live, article_id)
            remove = [p.name for p in others if p.exists()]
            if previous is not None and previous.content_hash == article.content_hash \
                    and live.get(article_id) == article.content_hash and not remove:
                staged.unlink()
                return WriteResult(article_id, "unchanged", base, len(live), 0, time.perf_counter() - started,
                                   previous)
            current[article_id] = article
            articles = sorted(current.values(), key=lambda a: a.source)  # the order load_articles reads them in
            if len(articles) > 1:  # syndicated copies share a story, as a rebuild from the folder would say
                from .ingest import assign_stories

                articles = assign_stories(articles)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        journal = {"op": "put", "id": article_id, "seeds_dir": str(seeds), "staged": staged.name,
                   "sha256": hashlib.sha256(data).hexdigest(), "base_build": base, "target": target.name,
                   "remove": remove}
        build_id = _commit(settings, journal, articles, embedder)
    action = "replaced" if previous is not None or article_id in live else "created"
    stored = next(a for a in articles if a.id == article_id)
    return WriteResult(article_id, action, build_id, len(articles), 1, time.perf_counter() - started, stored)


def delete_article(settings: Settings, article_id: str, embedder=None, timeout: float | None = None) -> WriteResult:
    """Remove the article ``<id>.txt`` or ``<id>.md`` from the seeds folder and the index, atomically."""
    started = time.perf_counter()
    article_id = check_article_id(article_id)
    settings = settings.with_(ray_address=None)  # the rebuild re-embeds nothing new: no Ray
    if settings.database_url:
        return _delete_in_database(settings, article_id, started)
    seeds = _seeds_dir(settings)
    files = [article_path(seeds, article_id, suffix) for suffix in WRITTEN_SUFFIXES]
    index_dir = Path(settings.index_dir)
    with writer_lock(index_dir, settings.write_timeout if timeout is None else timeout):
        recover(index_dir, seeds)
        base = _current_build(index_dir)
        if base is None:
            raise IndexNotBuilt(f"No index found in {index_dir}.")
        live = _live_articles(index_dir)
        if not any(p.is_file() for p in files) and article_id not in live:
            raise ArticleNotFound(f"There is no article with id {article_id!r}.")
        current = _seed_articles(seeds, index_dir)
        previous = current.get(article_id)
        if previous is not None and previous.source not in {p.name for p in files}:
            raise _not_writable(previous)
        _check_in_sync(seeds, current, live, article_id)
        articles = [a for a in current.values() if a.id != article_id]
        if not articles:
            raise LastArticle("This is the only article; the index cannot be empty. Add another one first.")
        articles.sort(key=lambda a: a.source)
        from .ingest import assign_stories

        articles = assign_stories(articles)
        journal = {"op": "delete", "id": article_id, "seeds_dir": str(seeds), "staged": None, "sha256": None,
                   "base_build": base, "target": None, "remove": [p.name for p in files if p.exists()]}
        build_id = _commit(settings, journal, articles, embedder)
    return WriteResult(article_id, "deleted", build_id, len(articles), 0, time.perf_counter() - started)


# --------------------------------------------------------------------------- PostgreSQL

def _parse_upload(article_id: str, name: str, data: bytes) -> Article:
    """Read an upload's file bytes exactly as ``load_articles`` reads a file ``name`` directly in the folder."""
    import tempfile

    from .ingest import LoadReport, read_file

    with tempfile.TemporaryDirectory(prefix="qa-upload-") as folder:
        path = Path(folder) / name
        path.write_bytes(data)
        report = LoadReport()
        found = read_file(path, name, report)
    if not found:
        reason = report.skipped[0][1] if report.skipped else "unusable"
        raise InvalidArticle(f"The article text cannot be used: {reason}.")
    article = found[0]
    if article.id != article_id:  # a rebuild from the folder would give the file another id
        raise InvalidArticle(f"The article id {article_id!r} cannot be stored with metadata (a file {name} is read "
                             f"as {article.id!r}); use an id without '--'.", code="article_id_invalid")
    return article


def _put_in_database(settings: Settings, article: Article, embedder, started: float) -> WriteResult:
    """Add or replace one article in the PostgreSQL index: one transaction, seen by every service at once.

    The database is the source of truth here (no seeds folder is written): the new text is embedded
    first, then its rows replace the old ones in a single transaction (``PostgresWriter.sync``).
    """
    from .backends.postgres_writer import PostgresWriter

    article_id = article.id
    with PostgresWriter(settings) as writer:
        before = writer.indexed().get(article_id)
        if before == article.content_hash:
            manifest = writer.manifest() or {}
            return WriteResult(article_id, "unchanged", manifest.get("build_id"), len(writer.indexed()), 0,
                               time.perf_counter() - started, article)
        summary = writer.sync([article], embedder, remove_missing=False)
        build_id = (writer.manifest() or {}).get("build_id")
    return WriteResult(article_id, "replaced" if before else "created", build_id, summary["articles"], 1,
                       time.perf_counter() - started, article)


def _delete_in_database(settings: Settings, article_id: str, started: float) -> WriteResult:
    from .backends.postgres_writer import PostgresWriter

    with PostgresWriter(settings) as writer:
        remaining = writer.delete(article_id)
        build_id = (writer.manifest() or {}).get("build_id")
    return WriteResult(article_id, "deleted", build_id, remaining, 0, time.perf_counter() - started)
