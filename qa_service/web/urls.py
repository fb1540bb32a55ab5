"""Article page addresses, built without a request context so the API, the pages and the fast path share them."""

from __future__ import annotations

from functools import lru_cache

from flask import current_app, request
from werkzeug.routing import Map


def passage_anchor(start: int, end: int) -> str:
    return f"p-{start}-{end}"


@lru_cache(maxsize=4096)
def _article_path(url_map: Map, script_root: str, article_id: str) -> str:
    """The article page's path under ``script_root``, built by the app's route map as ``url_for`` would."""
    return url_map.bind("localhost", script_name=script_root or "/").build("pages.article", {"article_id": article_id})


def article_url(article_id: str, start: int | None = None, end: int | None = None, *,
                script_root: str | None = None, url_map: Map | None = None) -> str:
    """The article page's address; with a span, highlighted and scrolled to (``#p-START-END``).

    An answer carries five URLs, so each article's path is remembered per mount point and the span appended
    directly (docs/decisions/hot-path-caches.md). ``script_root`` and ``url_map`` default to the current
    request's and app's.
    """
    if script_root is None:
        script_root = request.script_root
    base = _article_path(current_app.url_map if url_map is None else url_map, script_root, article_id)
    if start is None or end is None:
        return base
    return f"{base}?start={int(start)}&end={int(end)}#{passage_anchor(int(start), int(end))}"
