"""What every format's reader shares: decoding, text normalisation, dates, ids, lead titles, and ``LoadReport``.

Normalisation only removes (stray whitespace, Unicode compatibility forms) and never rewrites the outlet's words,
because the normalised text is what every citation slices into. Readers report by name and never raise: one
unreadable file or record is a line in ``LoadReport.skipped`` and the rest is read. See
docs/decisions/ingest-formats.md.
"""

from __future__ import annotations

import email.utils
import hashlib
import re
import time
import unicodedata
from dataclasses import dataclass, field
from datetime import date, datetime

from ..types import Article

# The same allow-list as ``articles.ARTICLE_ID`` (which imports ingest, so it cannot be imported from here);
# a test keeps the two equal.
ARTICLE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}", re.ASCII)
_NOT_ID = re.compile(r"[^A-Za-z0-9_-]+", re.ASCII)
_DASHES = re.compile(r"-{2,}")
_TRAILING_SPACE = re.compile(r"[ \t\u00a0]+\n")
_MANY_NEWLINES = re.compile(r"\n{3,}")
_LEAD_END = re.compile(r"(?<=[.!?])[\"'”’)]*\s")
LEAD_TITLE_CHARS = 90
UNTITLED = "Untitled article"  # the title to show for an article with neither headline nor lead sentence
_GENERIC_PAGES = {"index", "default", "amp", "article", "story", "print"}  # ".../floods/index.html" is "floods"


@dataclass
class LoadReport:
    """What ``load_articles`` read and what it had to skip, by file name (and record, for files of many)."""

    articles: list[Article] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)
    warnings: list[tuple[str, str]] = field(default_factory=list)


def decode(raw: bytes, name: str, report: LoadReport) -> str | None:
    """Bytes to text: UTF-8 (with or without BOM), else Windows-1252 with a warning; None when neither fits."""
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


def normalise(text: str) -> str:
    """NFC, ``\\n`` line ends, no NBSP/BOM, no trailing spaces, at most one empty line in a row, stripped."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\u00a0", " ").replace("\ufeff", "").replace("\x00", "")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = _TRAILING_SPACE.sub("\n", text)
    return _MANY_NEWLINES.sub("\n\n", text).strip()


def clean_field(value) -> str | None:
    """A metadata value as one line of text, or None when it is missing or blank."""
    if value is None or isinstance(value, (dict, list, tuple, set)):
        return None
    text = " ".join(unicodedata.normalize("NFC", str(value)).split())
    return text or None


# ---------------------------------------------------------------------------- dates

_ISO = re.compile(r"^(\d{4})-(\d{1,2})-(\d{1,2})(?:$|[T\s])")
_SLASHED = re.compile(r"^(\d{4})/(\d{1,2})/(\d{1,2})(?:$|\s)")
_DAY_MONTH = re.compile(r"^(?:[A-Za-z]+,?\s+)?(\d{1,2})(?:st|nd|rd|th)?\s+([A-Za-z]{3,9})\.?,?\s+(\d{4})\b")
_MONTH_DAY = re.compile(r"^(?:[A-Za-z]+,?\s+)?([A-Za-z]{3,9})\.?\s+(\d{1,2})(?:st|nd|rd|th)?,?\s+(\d{4})\b")
_MONTHS = {m: i for i, m in enumerate(("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov",
                                       "dec"), start=1)}


def _ymd(year, month, day) -> str | None:
    try:
        return date(int(year), int(month), int(day)).isoformat()
    except (ValueError, TypeError):
        return None


def _month(name: str) -> int | None:
    return _MONTHS.get(name[:3].lower())


def parse_date(value) -> str | None:
    """An ISO ``YYYY-MM-DD`` for a date in any of the forms news files use, or None when it cannot be read.

    Accepts date/datetime objects (YAML front matter), ``time.struct_time`` (feedparser), ISO dates and
    timestamps, ``2025/04/02``, ``2 April 2025``, ``April 2, 2025`` and RFC 2822 (``Wed, 02 Apr 2025 08:30 GMT``).
    The calendar is checked: ``2024-99-99`` is None, never a crash.
    """
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.date().isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, time.struct_time):
        return _ymd(value.tm_year, value.tm_mon, value.tm_mday)
    text = clean_field(value)
    if not text:
        return None
    for pattern in (_ISO, _SLASHED):
        m = pattern.match(text)
        if m:
            return _ymd(*m.groups())
    m = _DAY_MONTH.match(text)
    if m and _month(m.group(2)):
        return _ymd(m.group(3), _month(m.group(2)), m.group(1))
    m = _MONTH_DAY.match(text)
    if m and _month(m.group(1)):
        return _ymd(m.group(3), _month(m.group(1)), m.group(2))
    try:
        parsed = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    return parsed.date().isoformat() if parsed else None


def read_date(value, where: str, report: LoadReport) -> str | None:
    """``parse_date`` that says so in ``report`` when a date was given but cannot be read."""
    iso = parse_date(value)
    if iso is None and clean_field(value) is not None:
        report.warnings.append((where, f"date {clean_field(value)[:40]!r} cannot be read; left empty"))
    return iso


# ---------------------------------------------------------------------------- ids

def slug(text: str, limit: int) -> str:
    """``text`` reduced to ARTICLE_ID characters (runs of others become one ``-``), at most ``limit`` long."""
    bare = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))  # é -> e
    out = _DASHES.sub("-", _NOT_ID.sub("-", bare)).strip("-_")
    return out[:limit].rstrip("-_")


def hashed_id(readable: str, key: str) -> str:
    """A stable id: a readable slug (up to 80 characters) and 12 hex digits of sha256(``key``)."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    head = slug(readable, 80)
    return f"{head}-{digest}" if head else digest


def file_id(parts: tuple[str, ...]) -> str:
    """The id of a one-article file from its path inside the folder, ``parts`` ending with the file's stem.

    A top-level stem that is already a valid id is the id (``a.md`` is ``a``). Nested files join their folders
    and stem with ``--`` (``2025/kenya-floods.md`` is ``2025--kenya-floods``) when every part is made of id
    characters without ``--``; otherwise the id is a slug of the path and 12 hex digits of the path's sha256.
    Either way it depends on the path alone, so it stays the same however the rest of the folder changes.
    """
    joined = "--".join(parts)
    if (all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", p, re.ASCII) and "--" not in p for p in parts)
            and ARTICLE_ID.fullmatch(joined)):
        return joined
    return hashed_id("-".join(parts), "/".join(parts))


def record_id(given, url: str | None, text: str, where: str, report: LoadReport) -> str:
    """A record's id: its own when valid; otherwise one derived from its URL, else from its text."""
    given = clean_field(given)
    if given is not None:
        if ARTICLE_ID.fullmatch(given):
            return given
        report.warnings.append((where, f"id {given[:40]!r} is not a valid article id; derived one from it"))
        return hashed_id(given, "id:" + given)
    if url:
        path = re.sub(r"^[a-z][a-z0-9+.-]*://", "", url, flags=re.IGNORECASE).split("?")[0].split("#")[0]
        names = [re.sub(r"\.[A-Za-z0-9]{2,5}$", "", part) for part in path.split("/") if part]
        tail = next((n for n in reversed(names) if n.lower() not in _GENERIC_PAGES), "")
        return hashed_id(tail, "url:" + url)
    return hashed_id(" ".join(text.split()[:8]), "text:" + text)


# ---------------------------------------------------------------------------- titles and records

def lead_title(text: str, limit: int = LEAD_TITLE_CHARS) -> str:
    """The title to show for an article without a headline: its first sentence, cut at a word with an ellipsis."""
    first = text.strip().split("\n", 1)[0]
    m = _LEAD_END.search(first)
    sentence = first[:m.start()].strip() if m else first.strip()
    if len(sentence) <= limit:
        return sentence
    cut = sentence[:limit - 1].rsplit(" ", 1)[0].rstrip(",;:-–— ")
    return cut + "…"


def record_article(fields: dict, where: str, source: str, report: LoadReport, text: str | None = None,
                   content_hash: str | None = None) -> Article | None:
    """One ``Article`` from a record's fields (id, title, date, url, outlet, author, text/content/body).

    ``text`` overrides the fields' text (already cleaned, e.g. from HTML). A record without text is skipped with
    ``where`` as its name; a bad date or id is a warning and the record is still read.
    """
    if text is None:
        raw = next((fields[k] for k in ("text", "content", "body") if isinstance(fields.get(k), str)
                    and fields[k].strip()), None)
        if raw is None:
            report.skipped.append((where, "no text (expected a text, content or body field)"))
            return None
        text = normalise(raw)
    if not text:
        report.skipped.append((where, "no article text"))
        return None
    url = clean_field(first_of(fields, "url", "source_url", "link", "canonical_url"))
    outlet = first_of(fields, "outlet", "source", "site_name", "sitename", "publisher")
    if isinstance(outlet, dict):  # {"source": {"name": "..."}} as news APIs export it
        outlet = outlet.get("name")
    title = clean_field(fields.get("title") or fields.get("headline"))
    date_value = first_of(fields, "date", "published", "published_at", "publishedAt", "pubDate", "datetime")
    article_id = record_id(fields.get("id"), url, text, where, report)
    if content_hash is None:
        content_hash = hashlib.sha256(repr(sorted((str(k), str(v)) for k, v in fields.items())).encode(
            "utf-8", "surrogatepass")).hexdigest()
    return Article(id=article_id, source=source, title=title, date=read_date(date_value, where, report),
                   text=text, content_hash=content_hash, source_url=url, outlet=clean_field(outlet),
                   author=clean_field(_names(fields.get("author") or fields.get("authors"))),
                   title_from="metadata" if title else "lead")


def first_of(fields: dict, *keys):
    """The first of ``keys`` that ``fields`` has with a non-empty value."""
    for key in keys:
        value = fields.get(key)
        if value not in (None, "", [], {}):
            return value
    return None


def _names(value):
    if isinstance(value, (list, tuple)):
        names = [clean_field(v.get("name") if isinstance(v, dict) else v) for v in value]
        return ", ".join(n for n in names if n) or None
    if isinstance(value, dict):
        return value.get("name")
    return value
