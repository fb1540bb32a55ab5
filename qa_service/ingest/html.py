"""Saved news pages: the article's main text and its metadata, extracted by trafilatura, never fetched.

trafilatura keeps the article body and drops navigation, cookie banners, "most read" boxes, footers, scripts and
event-handler attributes; its metadata pass gives the title, publication date (htmldate, without the extensive
search that guesses from any date in the page), canonical URL, site name and author. Nothing here touches the
network: the page is parsed from its bytes. See docs/decisions/ingest-formats.md.
"""

from __future__ import annotations

import logging
import re
import warnings

import trafilatura

from ..types import Article
from .common import LoadReport, normalise, record_article

_DATES = {"extensive_search": False, "original_date": True}
_DOCUMENT = re.compile(r"<(?:html|body)\b", re.IGNORECASE)


def _paragraphs(text: str) -> str:
    """trafilatura's one-line-per-block text with an empty line between blocks, as plain-text articles have."""
    return "\n\n".join(line.strip() for line in normalise(text).split("\n") if line.strip())


def to_text(html: str | bytes) -> str:
    """The readable text of an HTML fragment or page (a feed item's content), or "" when there is none."""
    if isinstance(html, bytes):
        html = html.decode("utf-8", "replace")
    if not _DOCUMENT.search(html):
        html = f"<html><body>{html}</body></html>"  # lxml reads a bare fragment as an empty tree
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # A fragment is already the article's body: no fallback extractors (fast), which only cost time here.
            # A short one can fall under trafilatura's minimum for a main text; its baseline text is then used.
            text = (trafilatura.extract(html, fast=True, include_comments=False, include_tables=True,
                                        favor_recall=True) or trafilatura.html2txt(html))
        except Exception:  # a fragment that trafilatura cannot parse has no text to cite
            logging.getLogger(__name__).debug("trafilatura could not read a fragment", exc_info=True)
            return ""
    return _paragraphs(text or "")


def read(raw: bytes, text: str, article_id: str, source: str, content_hash: str,
         report: LoadReport) -> list[Article]:
    """The article of one saved page; trafilatura reads the bytes itself so the page's own charset is used."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            doc = trafilatura.bare_extraction(raw, with_metadata=True, include_comments=False,
                                              include_tables=True, date_extraction_params=_DATES)
        except Exception as exc:  # one page trafilatura cannot parse must not stop the folder
            report.skipped.append((source, f"cannot read the page ({type(exc).__name__})"))
            return []
    meta = doc.as_dict() if doc is not None else {}
    body = _paragraphs(meta.get("text") or "")
    title = meta.get("title")
    if title and body.split("\n", 1)[0].strip() == " ".join(str(title).split()):
        body = body.split("\n", 1)[1].strip() if "\n" in body else ""  # the headline is metadata, not body
    if not body:
        report.skipped.append((source, "no article text found in the page"))
        return []
    fields = {"id": article_id, "title": title, "date": meta.get("date"), "url": meta.get("url"),
              "outlet": meta.get("sitename"), "author": meta.get("author")}
    article = record_article(fields, source, source, report, text=body, content_hash=content_hash)
    return [article] if article is not None else []
