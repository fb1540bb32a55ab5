"""The web app: a JSON API blueprint and an HTML form blueprint over one ``Searcher`` per process.

``create_app(settings)`` loads the index and the query encoder once (into ``app.extensions``); every
request, JSON or HTML, goes through ``QAState.ask`` and so through ``Searcher.ask``. This package never
imports faiss or torch itself: the ``Searcher`` does, and only when the app is created.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flask import Flask, url_for

from ..config import Settings
from .errors import register_error_handlers
from .schemas import AskRequestBase, ask_request_model

if TYPE_CHECKING:  # pragma: no cover
    from ..retrieval import Searcher

logger = logging.getLogger(__name__)

# No inline script or style anywhere; the only script and style sources are our own static files.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                           "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class DebugRefused(RuntimeError):
    """Flask's debug mode serves an interactive debugger that runs code: never in this service."""


def passage_anchor(start: int, end: int) -> str:
    return f"p-{start}-{end}"


def article_url(article_id: str, start: int | None = None, end: int | None = None) -> str:
    """Return the article page's address; with a span, highlighted and scrolled to (``#p-START-END``)."""
    if start is None or end is None:
        return url_for("pages.article", article_id=article_id)
    return url_for("pages.article", article_id=article_id, start=start, end=end, _anchor=passage_anchor(start, end))


@dataclass
class QAState:
    """What the app holds for its process: the searcher and how to call it."""

    settings: Settings
    searcher: "Searcher"
    ask_model: type[AskRequestBase]
    supports_mode: bool
    # The query encoder (a Rust tokenizer, torch) is not safe to call from two threads at once.
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ask(self, req: AskRequestBase) -> dict:
        """Run ``Searcher.ask`` for a validated request; return its structure plus ``ok``, ``took_ms``, urls."""
        kwargs = {}
        if req.mode is not None and self.supports_mode:
            kwargs["mode"] = req.mode
        filters = req.filters.to_filters() if req.filters is not None else None
        started = time.perf_counter()
        with self.lock:
            result = self.searcher.ask(req.question, k=req.k, filters=filters, **kwargs)
        took_ms = round((time.perf_counter() - started) * 1000, 3)
        out = {"ok": True, **result}
        results = []
        for hit in result.get("results", []):
            hit = dict(hit)
            c = hit["citation"] = dict(hit["citation"])
            c["url"] = article_url(c["article_id"], c["start"], c["end"])
            results.append(hit)
        out["results"] = results
        out["took_ms"] = took_ms
        return out


def _accepts_mode(searcher) -> bool:
    try:
        return "mode" in inspect.signature(searcher.ask).parameters
    except (TypeError, ValueError):
        return False


def create_app(settings: Settings | None = None, searcher: "Searcher | None" = None) -> Flask:
    """Build the app; load the index and model now (unless a ready ``searcher`` is given, as tests do)."""
    if settings is None:
        settings = searcher.settings if searcher is not None else Settings.from_env()
    app = Flask(__name__)
    if app.debug:
        raise DebugRefused("Refusing to start with Flask debug mode on (FLASK_DEBUG): its debugger can run "
                           "arbitrary code. Unset FLASK_DEBUG.")
    app.config.update(MAX_CONTENT_LENGTH=settings.max_body_bytes, MAX_FORM_MEMORY_SIZE=settings.max_body_bytes)
    app.json.sort_keys = False
    app.json.ensure_ascii = False

    if searcher is None:
        from ..retrieval import Searcher

        searcher = Searcher(settings)
    app.extensions["qa_service"] = QAState(
        settings=settings, searcher=searcher,
        ask_model=ask_request_model(settings.max_question_chars, settings.max_k),
        supports_mode=_accepts_mode(searcher),
    )

    from . import api, pages

    app.register_blueprint(api.bp)
    app.register_blueprint(pages.bp)
    register_error_handlers(app)

    @app.after_request
    def _security_headers(response):
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    logger.info("web app ready: %d articles, %d passages, model %s",
                len(searcher.articles()), searcher.passage_count, searcher.model_name)
    return app


def get_state() -> QAState:
    from flask import current_app

    return current_app.extensions["qa_service"]


__all__ = ["create_app", "QAState", "DebugRefused", "article_url", "get_state"]
