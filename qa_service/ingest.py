"""Read article files into cleaned ``Article`` records: metadata out, boilerplate off, text kept exact.

The cleaned text is what every citation slices into, so cleaning only removes (metadata lines,
boilerplate, stray whitespace, Unicode compatibility forms) and never rewrites the outlet's words.
Curly quotes are kept as the outlet wrote them; search and evaluation fold them when comparing.
"""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from .types import Article

logger = logging.getLogger(__name__)

# " date 2025-01-31 A senior delegation..." : a date prefix glued to the first sentence.
_DATE_PREFIX = re.compile(r"^\s*date\s+(\d{4}-\d{2}-\d{2})\s+", re.IGNORECASE)
# "Thu 20 Jun 2024 4:53 pm - Jerusalem Time" : a dateline on its own line.
_DATELINE = re.compile(
    r"^\s*(?:(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)[a-z]*,?\s+)?"
    r"(\d{1,2})\s+([A-Za-z]{3,9})\.?,?\s+(\d{4})"
    r"(?:\s*,?\s*\d{1,2}:\d{2}\s*(?:[ap]\.?m\.?)?)?"
    r"(?:\s*[-–—]\s*[^\n]{0,40})?\s*$",
    re.IGNORECASE,
)
_BOILERPLATE = re.compile(
    r"^\s*(share your opinion|share this( article)?|read more|follow us on .*|all rights reserved.*"
    r"|subscribe( now)?|comments?|print|email)\s*$",
    re.IGNORECASE,
)
# A lone agency signature at the end: "MNA", "AFP", "IRNA/PressTV".
_SIGNATURE = re.compile(r"^\s*[A-Z]{2,6}(?:\s*/\s*[A-Z][A-Za-z]{1,10})?\s*$")
_TRAILING_SPACE = re.compile(r"[ \t\u00a0]+\n")
_MANY_NEWLINES = re.compile(r"\n{3,}")


@dataclass
class LoadReport:
    """What ``load_articles`` read and what it had to skip, by file name."""

    articles: list[Article] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)
    warnings: list[tuple[str, str]] = field(default_factory=list)


def _parse_date(day: str, month: str, year: str) -> str | None:
    try:  # "Jun", "June" and "Sept" all start with the three-letter abbreviation
        return datetime.strptime(f"{day} {month[:3].title()} {year}", "%d %b %Y").date().isoformat()
    except ValueError:
        return None


def _decode(raw: bytes, name: str, report: LoadReport) -> str | None:
    if not raw.strip():
        report.skipped.append((name, "empty file"))
        return None
    if b"\x00" in raw:
        report.skipped.append((name, "binary file (contains NUL bytes)"))
        return None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        try:
            text = raw.decode("cp1252")
        except UnicodeDecodeError:
            report.skipped.append((name, f"not UTF-8 text (invalid byte at offset {exc.start})"))
            return None
        report.warnings.append((name, f"not UTF-8 (invalid byte at offset {exc.start}); decoded as Windows-1252"))
        return text


def clean_article(raw_text: str, article_id: str, source: str, content_hash: str = "") -> Article:
    """Split metadata from body and strip boilerplate; return the cleaned ``Article``."""
    text = unicodedata.normalize("NFC", raw_text).replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\u00a0", " ").replace("\ufeff", "")
    date: str | None = None
    title: str | None = None

    match = _DATE_PREFIX.match(text)
    if match:
        date = match.group(1)
        text = text[match.end():]

    lines = text.split("\n")
    # Dateline on the first non-empty line, optionally followed by a headline line.
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is not None:
        dl = _DATELINE.match(lines[first])
        if dl:
            date = date or _parse_date(dl.group(1), dl.group(2), dl.group(3))
            lines = lines[first + 1:]
            nxt = next((i for i, line in enumerate(lines) if line.strip()), None)
            if nxt is not None and _looks_like_headline(lines[nxt]):
                title = lines[nxt].strip()
                lines = lines[nxt + 1:]

    # Trailing boilerplate: repeat until the tail is article text.
    while lines:
        tail = lines[-1].strip()
        if not tail:
            lines.pop()
        elif _BOILERPLATE.match(tail) or _SIGNATURE.match(tail) or (title and tail == title):
            lines.pop()
        else:
            break
    # Boilerplate lines inside the body ("Share your opinion" between paragraphs) go as well.
    lines = [line for line in lines if not _BOILERPLATE.match(line)]

    body = "\n".join(line.rstrip() for line in lines)
    body = _TRAILING_SPACE.sub("\n", body)
    body = _MANY_NEWLINES.sub("\n\n", body).strip()
    return Article(id=article_id, source=source, title=title, date=date, text=body, content_hash=content_hash)


def _looks_like_headline(line: str) -> bool:
    stripped = line.strip()
    words = stripped.split()
    # A headline is one short line that does not end like a sentence.
    return 2 <= len(words) <= 30 and not stripped.endswith((".", ":", ";"))


def load_article(path: Path, report: LoadReport | None = None) -> Article | None:
    """Read one file; return None (and say why in ``report``) when it cannot be used."""
    report = report if report is not None else LoadReport()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        report.skipped.append((path.name, f"cannot read file ({exc.strerror})"))
        return None
    text = _decode(raw, path.name, report)
    if text is None:
        return None
    article = clean_article(text, path.stem, path.name, hashlib.sha256(raw).hexdigest())
    if not article.text:
        report.skipped.append((path.name, "no article text after removing metadata and boilerplate"))
        return None
    return article


def load_articles(folder: Path | str, pattern: str = "*.txt") -> LoadReport:
    """Load every article in ``folder`` (sorted by name); unusable files are reported, never fatal."""
    folder = Path(folder)
    report = LoadReport()
    if not folder.is_dir():
        raise FileNotFoundError(f"articles folder {folder} does not exist")
    for path in sorted(folder.glob(pattern)):
        if not path.is_file():
            continue
        article = load_article(path, report)
        if article is not None:
            report.articles.append(article)
    for name, reason in report.skipped:
        logger.warning("skipped %s: %s", name, reason)
    for name, reason in report.warnings:
        logger.warning("%s: %s", name, reason)
    return report
