"""Read a folder of news articles, in every format people keep them, into cleaned ``Article`` records.

The folder is read recursively (hidden files and folders aside: they hold staged writes and tool state), with
extensions in any case: ``.txt``, ``.md``, ``.html``/``.htm``, ``.jsonl``/``.ndjson``, ``.json``, ``.csv`` and
RSS/Atom feeds (``.xml``, ``.rss``, ``.atom``), one module per format. Every file or record not read is named with
its reason in ``LoadReport.skipped`` and nothing stops the rest. Syndicated copies then get a shared ``story``.
The text of every article is exactly what its citations slice. See docs/decisions/ingest-formats.md.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from ..types import Article
from . import text
from .common import ARTICLE_ID, UNTITLED, LoadReport, decode, file_id, lead_title, parse_date
from .syndication import assign_stories
from .text import clean_article

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
# One article a file: the longest news page, with inline styles and scripts, is a few MiB; more is not an article.
MAX_ARTICLE_FILE_BYTES = 10 * MiB
# Many articles a file (exports, feeds): these are parsed whole in memory, so they are bounded as well.
MAX_COLLECTION_FILE_BYTES = 100 * MiB

# suffix -> (module, reader, decode the bytes first, size limit, what the limit is for). Modules are imported
# when a file of theirs is met: trafilatura and feedparser take a noticeable time to import.
_ONE = "one-article files"
_MANY = "files of many articles"
READERS = {
    ".txt": ("text", "read", True, MAX_ARTICLE_FILE_BYTES, _ONE),
    ".md": ("markdown", "read", True, MAX_ARTICLE_FILE_BYTES, _ONE),
    ".markdown": ("markdown", "read", True, MAX_ARTICLE_FILE_BYTES, _ONE),
    ".html": ("html", "read", False, MAX_ARTICLE_FILE_BYTES, _ONE),
    ".htm": ("html", "read", False, MAX_ARTICLE_FILE_BYTES, _ONE),
    ".jsonl": ("records", "read_jsonl", True, MAX_COLLECTION_FILE_BYTES, _MANY),
    ".ndjson": ("records", "read_jsonl", True, MAX_COLLECTION_FILE_BYTES, _MANY),
    ".json": ("records", "read_json", True, MAX_COLLECTION_FILE_BYTES, _MANY),
    ".csv": ("records", "read_csv", True, MAX_COLLECTION_FILE_BYTES, _MANY),
    ".xml": ("feeds", "read", False, MAX_COLLECTION_FILE_BYTES, _MANY),
    ".rss": ("feeds", "read", False, MAX_COLLECTION_FILE_BYTES, _MANY),
    ".atom": ("feeds", "read", False, MAX_COLLECTION_FILE_BYTES, _MANY),
}

__all__ = ["ARTICLE_ID", "MAX_ARTICLE_FILE_BYTES", "MAX_COLLECTION_FILE_BYTES", "READERS", "UNTITLED", "LoadReport",
           "assign_stories", "clean_article", "lead_title", "load_article", "load_articles", "parse_date",
           "read_file"]


def _article_id(parts: tuple[str, ...], suffix: str) -> str:
    """A ``.txt`` directly in the folder keeps its stem as id, as it always has; every other file gets
    ``common.file_id`` (the stem when valid, else a slug of the path with a hash)."""
    if suffix == ".txt" and len(parts) == 1:
        return parts[0]
    return file_id(parts)


def _too_big(path: Path, name: str, limit: int, kind: str, report: LoadReport) -> bool:
    size = path.stat().st_size
    if size <= limit:
        return False
    report.skipped.append((name, f"file of {size / MiB:.1f} MiB is over the {limit // MiB} MiB limit for {kind}"))
    return True


def read_file(path: Path, name: str, report: LoadReport) -> list[Article]:
    """The articles of one file, ``name`` being its path inside the folder (POSIX); problems go to ``report``."""
    suffix = path.suffix.lower()
    if suffix not in READERS:
        report.skipped.append((name, f"unsupported type {suffix}" if suffix else "unsupported type (no extension)"))
        return []
    module, function, decoded, limit, kind = READERS[suffix]
    try:
        if _too_big(path, name, limit, kind, report):
            return []
        raw = path.read_bytes()
    except OSError as exc:
        report.skipped.append((name, f"cannot read file ({exc.strerror or exc})"))
        return []
    if decoded:
        content = decode(raw, name, report)
        if content is None:
            return []
    elif not raw.strip():
        report.skipped.append((name, "empty file"))
        return []
    elif b"\x00" in raw:
        report.skipped.append((name, "binary file (contains NUL bytes)"))
        return []
    else:
        content = ""
    parts = tuple(name.split("/")[:-1]) + (Path(name).stem,)
    try:
        reader = getattr(importlib.import_module(f"{__name__}.{module}"), function)
        return reader(raw, content, _article_id(parts, suffix), name, hashlib.sha256(raw).hexdigest(), report)
    except Exception as exc:  # a reader's bug on one strange file must not stop the folder
        logger.debug("reading %s failed", name, exc_info=True)
        report.skipped.append((name, f"cannot be read ({type(exc).__name__}: {exc})"))
        return []


def load_article(path: Path, report: LoadReport | None = None) -> Article | None:
    """Read one file by the plain-text rules, whatever its name (uploads are staged under temporary names);
    return None, and say why in ``report``, when it cannot be used."""
    report = report if report is not None else LoadReport()
    try:
        if _too_big(path, path.name, MAX_ARTICLE_FILE_BYTES, _ONE, report):
            return None
        raw = path.read_bytes()
    except OSError as exc:
        report.skipped.append((path.name, f"cannot read file ({exc.strerror})"))
        return None
    content = decode(raw, path.name, report)
    if content is None:
        return None
    found = text.read(raw, content, path.stem, path.name, hashlib.sha256(raw).hexdigest(), report)
    return found[0] if found else None


def _files(folder: Path, report: LoadReport, exclude: set[Path]) -> list[str]:
    """Every non-hidden file under ``folder`` as a POSIX path relative to it, sorted; symlinked folders are named
    and not followed (they could loop or leave the folder); ``exclude``d folders are not entered."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        here = Path(root).relative_to(folder)
        for d in sorted(dirs):
            if not d.startswith(".") and (Path(root) / d).is_symlink():
                report.skipped.append(((here / d).as_posix(), "symbolic link to a folder, not followed"))
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (Path(root) / d).resolve() not in exclude)
        found += [(here / f).as_posix() for f in files if not f.startswith(".")]
    return sorted(found)


def load_articles(folder: Path | str, exclude: Iterable[Path | str] = (), stories: bool = True) -> LoadReport:
    """Load every article under ``folder`` (sorted by path; records in file order); unusable files and records
    are reported, never fatal. Two articles with one id keep the first; the second is named as a duplicate.
    Folders in ``exclude`` (an index kept inside the articles folder) are not read. ``stories=False`` leaves
    ``story`` unset, for callers that only need ids and hashes (syndication costs about as much as reading)."""
    folder = Path(folder)
    skip = {Path(e).resolve() for e in exclude}
    report = LoadReport()
    if not folder.is_dir():
        raise FileNotFoundError(f"articles folder {folder} does not exist")
    first_source: dict[str, str] = {}
    for name in _files(folder, report, skip):
        for article in read_file(folder / name, name, report):
            if article.id in first_source:
                report.skipped.append((article.source, f"duplicate id {article.id!r}, already read from "
                                                       f"{first_source[article.id]}"))
                continue
            first_source[article.id] = article.source
            report.articles.append(article)
    if stories:
        report.articles = assign_stories(report.articles)
    for name, reason in report.skipped:
        logger.warning("skipped %s: %s", name, reason)
    for name, reason in report.warnings:
        logger.warning("%s: %s", name, reason)
    return report
