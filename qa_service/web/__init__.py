"""The web app: a JSON API blueprint and an HTML form blueprint over one ``Searcher`` per process.

``create_app(settings)`` loads the index and the query encoder once (into ``app.extensions``); every request,
JSON or HTML, goes through ``QAState.ask`` (``state.py``) and so through ``Searcher.ask``. This package never
imports faiss or torch itself: the ``Searcher`` does, and only when the app is created.
"""

from __future__ import annotations

import inspect
import logging
from typing import TYPE_CHECKING, Any, Callable

from flask import Flask, request

from ..config import Settings
from ..tuning import fast_path
from . import api, pages
from .auth import OPEN_ENDPOINTS, check_security_settings, require_key
from .errors import register_error_handlers
from .headers import CONTENT_SECURITY_POLICY, SECURITY_HEADERS
from .jsonio import OrjsonProvider
from .schemas import ask_request_model, parse_json_body
from .state import QAState, get_state, warm_up
from .urls import article_url, passage_anchor

if TYPE_CHECKING:  # pragma: no cover
    from ..retrieval import Searcher

logger = logging.getLogger(__name__)


class DebugRefused(RuntimeError):
    """Flask's debug mode serves an interactive debugger that runs code: never in this service."""


def _accepts_mode(searcher) -> bool:
    try:
        return "mode" in inspect.signature(searcher.ask).parameters
    except (TypeError, ValueError):
        return False


def create_app(settings: Settings | None = None, searcher: "Searcher | None" = None, *,
               load_searcher: Callable[[], "Searcher"] | None = None, write_embedder: Any = None,
               activity: Any = None, share_cores: Callable[[Any, Any], None] | None = None) -> Flask:
    """Build the app; load the index and model now (unless a ready ``searcher`` is given, as tests do).

    Args:
        load_searcher: loads the live index again when it changes; by default ``Searcher(settings)``
            when no ``searcher`` is given, and no reloads when one is.
        write_embedder: embeds uploaded articles (tests pass a fake); None: the index's own encoder.
        activity, share_cores: the encoder_cores tuning's ``WorkerActivity`` and ``share_cores``
            (``qa_service.tuning.encoder_cores``); None when it is off.
    """
    if settings is None:
        settings = searcher.settings if searcher is not None else Settings.from_env()
    app = Flask(__name__)
    if app.debug:
        raise DebugRefused("Refusing to start with Flask debug mode on (FLASK_DEBUG): its debugger can run "
                           "arbitrary code. Unset FLASK_DEBUG.")
    check_security_settings(settings)
    if "fast_path" in settings.tuning:
        fast_path.check_hooks(app)  # before the model loads: a missing hook fails at once
    app.config.update(MAX_CONTENT_LENGTH=settings.max_body_bytes, MAX_FORM_MEMORY_SIZE=settings.max_body_bytes,
                      SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Strict")
    app.json = OrjsonProvider(app)

    if searcher is None:
        from ..retrieval import Searcher  # faiss and the encoder load here, in the worker

        if load_searcher is None:
            def load_searcher():
                return Searcher(settings)

        searcher = load_searcher()
    state = app.extensions["qa_service"] = QAState(
        settings=settings, searcher=searcher,
        ask_model=ask_request_model(settings.max_question_chars, settings.max_k),
        supports_mode=_accepts_mode(searcher), load_searcher=load_searcher, write_embedder=write_embedder,
        activity=activity, share_cores=share_cores, url_map=app.url_map,
    )

    @app.before_request
    def _before_request():
        state.maybe_reload()
        if settings.require_key_for_read and request.endpoint not in OPEN_ENDPOINTS:
            require_key(settings, write=False)

    app.register_blueprint(api.bp)
    app.register_blueprint(pages.bp)
    register_error_handlers(app)

    @app.after_request
    def _security_headers(response):
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    if "fast_path" in settings.tuning:
        app.wsgi_app = fast_path.AskFastPath(app, state, SECURITY_HEADERS, parse_json_body)

    logger.info("web app ready: %d articles, %d passages, model %s",
                searcher.article_count, searcher.passage_count, searcher.model_name)
    return app


__all__ = ["create_app", "QAState", "DebugRefused", "article_url", "passage_anchor", "get_state", "warm_up",
           "SECURITY_HEADERS", "CONTENT_SECURITY_POLICY"]
