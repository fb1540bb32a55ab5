"""Exports of many articles: JSON Lines, JSON (one record, a list, or ``{"articles": [...]}``) and CSV with a header.

Each record has the text under ``text``, ``content`` or ``body`` and may have ``id``, ``title``, ``date``, ``url``,
``outlet`` and ``author`` (with the aliases news APIs use, see ``common.record_article``). A record that cannot be
read is skipped by its line or row number and the others are read. Text holding HTML markup is cleaned to text
the way feed items are. See docs/decisions/ingest-formats.md.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re

from ..types import Article
from .common import LoadReport, record_article

_MARKUP = re.compile(r"<(?:p|div|br|span|a|em|strong|b|i|li|h[1-6])\b[^>]*>", re.IGNORECASE)
_LISTS = ("articles", "items", "records", "data", "results")


def _one(fields, where: str, source: str, report: LoadReport, content_hash: str) -> Article | None:
    if not isinstance(fields, dict):
        report.skipped.append((where, f"not an object (a JSON {type(fields).__name__})"))
        return None
    fields = {str(k): v for k, v in fields.items()}
    raw = next((fields[k] for k in ("text", "content", "body") if isinstance(fields.get(k), str)
                and fields[k].strip()), None)
    text = None
    if raw is not None and _MARKUP.search(raw):
        from .html import to_text  # trafilatura, imported only when a record holds markup

        text = to_text(raw)
    return record_article(fields, where, source, report, text=text, content_hash=content_hash)


def _digest(data: str) -> str:
    return hashlib.sha256(data.encode("utf-8", "surrogatepass")).hexdigest()


def read_jsonl(raw: bytes, text: str, article_id: str, source: str, content_hash: str,
               report: LoadReport) -> list[Article]:
    """One article per non-empty line; a line that is not JSON or not an object is skipped by number."""
    out = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{source} line {number}"
        try:
            fields = json.loads(line)
        except ValueError as exc:
            report.skipped.append((where, f"not JSON ({exc.msg})"))
            continue
        article = _one(fields, where, source, report, _digest(line))
        if article is not None:
            out.append(article)
    return out


def read_json(raw: bytes, text: str, article_id: str, source: str, content_hash: str,
              report: LoadReport) -> list[Article]:
    """One record, a list of records, or an object holding the list under articles/items/records/data/results."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        report.skipped.append((source, f"not JSON ({exc})"))
        return []
    if isinstance(data, dict):
        key = next((k for k in _LISTS if isinstance(data.get(k), list)), None)
        if key is None:
            article = _one(data, source, source, report, content_hash)
            return [article] if article is not None else []
        data = data[key]
    if not isinstance(data, list):
        report.skipped.append((source, f"not an object or a list of objects (a JSON {type(data).__name__})"))
        return []
    out = []
    for number, fields in enumerate(data, start=1):
        where = f"{source} record {number}"
        article = _one(fields, where, source, report, _digest(json.dumps(fields, sort_keys=True, default=str)))
        if article is not None:
            out.append(article)
    return out


def read_csv(raw: bytes, text: str, article_id: str, source: str, content_hash: str,
             report: LoadReport) -> list[Article]:
    """A header row, then one article per row; quoted fields may hold newlines. Row numbers count the header."""
    csv.field_size_limit(1 << 30)  # a long article is one field; the file's own size cap bounds it
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip().lower() for h in next(reader)]
    except (StopIteration, csv.Error) as exc:
        report.skipped.append((source, f"no header row ({exc})" if str(exc) else "no header row"))
        return []
    if not {"text", "content", "body"} & set(header):
        report.skipped.append((source, "no text, content or body column in the header row"))
        return []
    out = []
    number = 1
    while True:
        number += 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            report.skipped.append((f"{source} row {number}", f"not CSV ({exc})"))
            break  # the reader cannot resynchronise after a broken quote
        if not any(cell.strip() for cell in row):
            continue
        where = f"{source} row {number}"
        if len(row) != len(header):
            report.warnings.append((where, f"{len(row)} fields where the header has {len(header)}"))
        fields = {h: v for h, v in zip(header, row) if h}
        article = _one(fields, where, source, report, _digest("\x1f".join(row)))
        if article is not None:
            out.append(article)
    return out

