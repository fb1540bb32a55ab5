"""RSS and Atom feed files: one article per item, with its link, date, title and author, the channel as outlet.

feedparser reads the file's bytes (never a URL, so nothing is fetched) and already strips scripts and unsafe
markup from item content; the content's HTML is then reduced to text by trafilatura, as saved pages are. An item
without text is skipped by its number; the others are read. See docs/decisions/ingest-formats.md.
"""

from __future__ import annotations

import hashlib

import feedparser

from ..types import Article
from .common import LoadReport, clean_field, normalise, record_article
from .html import to_text


def _item_text(entry) -> str:
    """The fullest text an item has: its content, else its summary, HTML cleaned to text."""
    for part in list(entry.get("content") or []) + [{"value": entry.get("summary"),
                                                       "type": (entry.get("summary_detail") or {}).get("type")}]:
        value = part.get("value") if isinstance(part, dict) else None
        if not value or not value.strip():
            continue
        kind = part.get("type") or "text/html"
        text = to_text(value) if "html" in kind else normalise(value)
        if text:
            return text
    return ""


def read(raw: bytes, text: str, article_id: str, source: str, content_hash: str,
         report: LoadReport) -> list[Article]:
    """Every item of one feed file; a file that is no feed is skipped as such."""
    try:
        parsed = feedparser.parse(raw, sanitize_html=True, resolve_relative_uris=False)
    except Exception as exc:  # one broken feed must not stop the folder
        report.skipped.append((source, f"cannot read the feed ({type(exc).__name__})"))
        return []
    if not parsed.get("version") and not parsed.entries:
        report.skipped.append((source, "not an RSS or Atom feed"))
        return []
    if parsed.get("bozo") and parsed.entries:
        report.warnings.append((source, f"feed is not well-formed ({parsed.get('bozo_exception')}); "
                                        "read what could be parsed"))
    outlet = clean_field(parsed.feed.get("title"))
    out = []
    for number, entry in enumerate(parsed.entries, start=1):
        where = f"{source} item {number}"
        body = _item_text(entry)
        if not body:
            report.skipped.append((where, "no text in the item"))
            continue
        published = entry.get("published_parsed") or entry.get("updated_parsed")
        fields = {"title": entry.get("title"), "url": entry.get("link"), "outlet": outlet,
                  "author": entry.get("author"),
                  "date": published or entry.get("published") or entry.get("updated")}
        key = repr(sorted((k, str(v)) for k, v in fields.items())) + body
        article = record_article(fields, where, source, report, text=body,
                                 content_hash=hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest())
        if article is not None:
            out.append(article)
    return out
