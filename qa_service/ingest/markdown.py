"""Markdown notes: YAML front matter (title, date, url, outlet, author) as metadata, the body as the text to cite.

Front matter is read with ``yaml.safe_load`` (no tags, no code). A leading ``# Heading`` stands for the title when
the front matter has none. The body is kept as written (Markdown marks included), so every citation still slices
the file's own words. See docs/decisions/ingest-formats.md.
"""

from __future__ import annotations

import re
from dataclasses import replace

import yaml

from ..types import Article
from .common import LoadReport, clean_field, normalise, record_article

_FRONT_MATTER = re.compile(r"\A---[ \t]*\n(.*?\n)?(?:---|\.\.\.)[ \t]*(?:\n|\Z)", re.DOTALL)
_HEADING = re.compile(r"\A#[ \t]+(.+?)[ \t#]*(?:\n|\Z)")


def read(raw: bytes, text: str, article_id: str, source: str, content_hash: str,
         report: LoadReport) -> list[Article]:
    """The article of one Markdown file (already decoded), or none when it has no body."""
    text = normalise(text) + "\n"
    fields: dict = {}
    m = _FRONT_MATTER.match(text)
    if m:
        text = text[m.end():]
        try:
            meta = yaml.safe_load(m.group(1) or "")
        except ValueError:  # a date YAML reads as a timestamp but the calendar refuses ("2025-02-30")
            meta = yaml.load(m.group(1), Loader=yaml.BaseLoader)  # every value a string; constructs nothing
        except yaml.YAMLError as exc:
            report.warnings.append((source, f"front matter is not valid YAML ({str(exc).splitlines()[0]}); "
                                            "read without metadata"))
            meta = None
        if isinstance(meta, dict):
            fields = {str(k).lower(): v for k, v in meta.items()}
        elif meta is not None:
            report.warnings.append((source, "front matter is not a mapping of fields; read without metadata"))
    body = normalise(text)
    heading = _HEADING.match(body)
    title_from = "metadata"
    if heading and not clean_field(fields.get("title")):
        fields["title"] = heading.group(1)
        title_from = "headline"
    if heading and clean_field(fields.get("title")) == clean_field(heading.group(1)):
        body = body[heading.end():].strip()  # the headline is metadata, not text to cite
    fields["id"] = article_id  # the file's path names the article; an id in front matter would not be stable
    if not body:
        report.skipped.append((source, "no article text after the front matter"))
        return []
    article = record_article(fields, source, source, report, text=body, content_hash=content_hash)
    if article is None:
        return []
    if article.title and title_from == "headline":
        article = replace(article, title_from="headline")
    return [article]
