"""Plain-text articles: headline, dates and byline read from the top, boilerplate off the end, text kept exact.

The cleaned text is what every citation slices into, so cleaning only removes (metadata lines, boilerplate,
stray whitespace, Unicode compatibility forms) and never rewrites the outlet's words. Curly quotes are kept as
the outlet wrote them; search and evaluation fold them when comparing. Metadata lines (``Published …``,
``Updated …``, agency datelines such as ``NAIROBI, 2 April 2025 —`` or ``(AFP) —``) are read into the record and
never left in the text to cite. See docs/decisions/ingest-formats.md.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime

from ..types import Article
from .common import LoadReport, parse_date

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
# "Published 2025-03-14", "Updated: March 15, 2025 09:00 GMT", "First published on Wed 2 Apr 2025".
_STAMP = re.compile(r"^\s*(?:(first|last)\s+)?(published|updated|posted)(?:\s+on)?\s*:?\s+(\S.{0,80}?)\s*$",
                    re.IGNORECASE)
# What a stamp's date starts with: a digit, a weekday or a month ("Published on Wed 2 Apr", "Updated 14:05").
_DATE_LIKE = re.compile(r"(?:on\s+)?(?:\d|(?:mon|tue|wed|thu|fri|sat|sun|jan|feb|mar|apr|may|jun|jul|aug|sep|oct"
                        r"|nov|dec)[a-z]*\b)", re.IGNORECASE)
# "By Jane Mwangi", "By Jane Mwangi and Ali Hassan": a byline on its own line, just under the headline.
_BYLINE = re.compile(r"^\s*By\s+([A-Z][\w.'’-]+(?:\s+(?:[A-Z][\w.'’-]+|and|de|al|van|von)){0,7})\s*$")
# "NAIROBI, 2 April 2025 — ", "GAZA CITY (AFP) - ", "(Reuters) — ", "BEIRUT, Lebanon, April 2, 2025 (AP) — ".
_AGENCY_DATELINE = re.compile(
    r"^(?P<place>[A-Z][A-Z'’.\- ]{2,40}(?:,\s*[A-Z][A-Za-z.\- ]{1,30}?)?)?"
    r"(?:,\s*(?P<date>(?:[A-Za-z]+,?\s+)?(?:\d{1,2}\s+[A-Za-z]{3,9}\.?,?\s+\d{4}|[A-Za-z]{3,9}\.?\s+\d{1,2},?\s+\d{4})))?"
    r"\s*(?P<agency>\((?:AFP|AP|Reuters|UPI|dpa|ANSA|EFE|Xinhua|IRNA|MNA|WAFA|Anadolu|PTI|[A-Z]{2,6})\))?"
    r"\s*[—–-]{1,2}\s+(?=\S)")
_BOILERPLATE = re.compile(
    r"^\s*(share your opinion|share this( article)?|read more|follow us on .*|all rights reserved.*"
    r"|subscribe( now)?|comments?|print|email)\s*$",
    re.IGNORECASE,
)
# A lone agency signature at the end: "MNA", "AFP", "IRNA/PressTV".
_SIGNATURE = re.compile(r"^\s*[A-Z]{2,6}(?:\s*/\s*[A-Z][A-Za-z]{1,10})?\s*$")
_TRAILING_SPACE = re.compile(r"[ \t\u00a0]+\n")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def _parse_date(day: str, month: str, year: str) -> str | None:
    try:  # "Jun", "June" and "Sept" all start with the three-letter abbreviation
        return datetime.strptime(f"{day} {month[:3].title()} {year}", "%d %b %Y").date().isoformat()
    except ValueError:
        return None


def _looks_like_headline(line: str) -> bool:
    stripped = line.strip()
    words = stripped.split()
    # A headline is one short line that does not end like a sentence.
    return 2 <= len(words) <= 30 and not stripped.endswith((".", ":", ";"))


def _first_line_headline(lines: list[str], i: int) -> bool:
    """Without a dateline, the first line is a headline only when short, not a sentence, set apart by an empty
    line (or a metadata line) and followed by more text."""
    line = lines[i].strip()
    if not (2 <= len(line.split()) <= 20) or line.endswith((".", ":", ";", ",")) or len(line) > 200:
        return False
    after = lines[i + 1:]
    if not after or not (not after[0].strip() or _STAMP.match(after[0]) or _BYLINE.match(after[0])):
        return False
    return any(rest.strip() for rest in after)


def _header(lines: list[str], title: str | None, date: str | None, warn: list[str]):
    """Read metadata lines at the top (stamps, a byline, a first-line headline); return what is left."""
    author = updated = None
    while True:
        i = next((k for k, line in enumerate(lines) if line.strip()), None)
        if i is None:
            break
        line = lines[i]
        stamp = _STAMP.match(line)
        stamp = stamp if stamp and _DATE_LIKE.match(stamp.group(3)) else None  # "Updated figures show …" is text
        byline = _BYLINE.match(line)
        if stamp:
            iso = parse_date(stamp.group(3))
            if iso is None:
                warn.append(f"{stamp.group(2).lower()} date {stamp.group(3)[:40]!r} cannot be read; left empty")
            elif stamp.group(2).lower() == "updated" or (stamp.group(1) or "").lower() == "last":
                updated = updated or iso
            else:
                date = date or iso
        elif byline and author is None:
            author = byline.group(1)
        elif title is None and _first_line_headline(lines, i):
            title = line.strip()
        else:
            break
        lines = lines[i + 1:]
    return lines, title, date or updated, author


def _agency_dateline(body: str) -> tuple[str, str | None]:
    """Cut an agency dateline off the first paragraph; return the rest and the dateline's date, if any."""
    m = _AGENCY_DATELINE.match(body)
    place = ((m.group("place") or "") if m else "").split(",")[0].strip()
    if not m or (place and not place.isupper()) or not (m.group("agency") or m.group("date") or len(place) >= 4):
        return body, None
    if not (m.group("agency") or m.group("date")) and not re.search(r"[—–]|--", m.group(0)):
        return body, None  # a bare place needs a real dash: "NATO - the alliance" is a sentence
    return body[m.end():], parse_date(m.group("date")) if m.group("date") else None


def clean_article(raw_text: str, article_id: str, source: str, content_hash: str = "",
                  warnings: list[str] | None = None) -> Article:
    """Split metadata from body and strip boilerplate; return the cleaned ``Article``.

    Problems that do not stop the article (a date that cannot be read) are appended to ``warnings``.
    """
    warn = warnings if warnings is not None else []
    text = unicodedata.normalize("NFC", raw_text).replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\u00a0", " ").replace("\ufeff", "")
    date: str | None = None
    title: str | None = None

    match = _DATE_PREFIX.match(text)
    if match:
        date = parse_date(match.group(1))
        if date is None:
            warn.append(f"date {match.group(1)!r} cannot be read; left empty")
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
    lines, title, date, author = _header(lines, title, date, warn)

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
    body, dateline_date = _agency_dateline(body)
    return Article(id=article_id, source=source, title=title, date=date or dateline_date, text=body.strip(),
                   content_hash=content_hash, author=author, title_from="headline" if title else "lead")


def read(raw: bytes, text: str, article_id: str, source: str, content_hash: str,
         report: LoadReport) -> list[Article]:
    """The article of one ``.txt`` file (already decoded), or none when nothing is left to cite."""
    warnings: list[str] = []
    article = clean_article(text, article_id, source, content_hash, warnings)
    report.warnings.extend((source, w) for w in warnings)
    if not article.text:
        report.skipped.append((source, "no article text after removing metadata and boilerplate"))
        return []
    return [article]
