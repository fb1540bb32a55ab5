"""The web app: a JSON API blueprint and an HTML form blueprint over one ``Searcher`` per process.

``create_app(settings)`` loads the index and the query encoder once (into ``app.extensions``); every
request, JSON or HTML, goes through ``QAState.ask`` and so through ``Searcher.ask``. This package never
imports faiss or torch itself: the ``Searcher`` does, and only when the app is created. ``POST /api/ask``'s
common case is answered by a WSGI middleware in front of Flask (``fastpath.py``) with the same response bytes.

Reloads: before a request, at most once per ``reload_interval`` (1 s), a worker stats ``index/CURRENT``.
When it names another build, a background thread loads a fresh ``Searcher`` and swaps it in with one
attribute assignment; requests already running keep the searcher they started with, and new ones use
the old searcher until the new one is ready, so no request waits for or is dropped by a reload. A
build that fails to load is logged and the old one kept. Writes go through ``articles`` (the only
write path); the worker that wrote swaps in the new index before it answers.

Overload: a process lets at most ``max_queue`` questions wait for its encoder, each for at most
``queue_timeout`` seconds; past either limit the client gets 503 ``overloaded`` with ``Retry-After``
at once, instead of a connection that hangs.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
from contextlib import nullcontext
from functools import lru_cache
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from flask import Flask, current_app, request
from werkzeug.routing import Map

from ..config import Settings
from ..errors import Overloaded, QAError
from .auth import OPEN_ENDPOINTS, check_security_settings, require_key
from .errors import register_error_handlers
from .fastpath import AskFastPath
from .jsonio import OrjsonProvider
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


@lru_cache(maxsize=4096)
def _article_path(url_map: Map, script_root: str, article_id: str) -> str:
    """The article page's path under ``script_root`` (the key: the same article under another mount differs).

    Built by the app's route map, as ``url_for`` builds it, but bound to the mount point here so that no request
    context is needed (``fastpath`` answers without one).
    """
    return url_map.bind("localhost", script_name=script_root or "/").build("pages.article", {"article_id": article_id})


def article_url(article_id: str, start: int | None = None, end: int | None = None, *,
                script_root: str | None = None, url_map: Map | None = None) -> str:
    """Return the article page's address; with a span, highlighted and scrolled to (``#p-START-END``).

    Flask's ``url_for`` costs ~0.04 ms a call (the route map's builder, URL quoting, context lookups) and an
    answer carries five URLs, so each article's path is built once per script root and remembered.
    ``script_root`` and ``url_map`` default to the current request's and app's.
    """
    if script_root is None:
        script_root = request.script_root
    base = _article_path(current_app.url_map if url_map is None else url_map, script_root, article_id)
    if start is None or end is None:
        return base
    # Flask's own query and anchor building costs ~0.15 ms a URL; five per answer made it a visible share of
    # the HTTP overhead. Integers need no quoting, so the span is appended directly.
    return f"{base}?start={int(start)}&end={int(end)}#{passage_anchor(int(start), int(end))}"


@dataclass
class QAState:
    """What the app holds for its process: the searcher and how to call it."""

    settings: Settings
    searcher: "Searcher"
    ask_model: type[AskRequestBase]
    supports_mode: bool
    # The query encoder (a Rust tokenizer, torch) is not safe to call from two threads at once.
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Loads the live index again (reloads); None: serve ``searcher`` for good.
    load_searcher: Callable[[], "Searcher"] | None = None
    write_embedder: Any = None  # embeds uploaded articles; None: the live index's own encoder
    # Under gunicorn: how many questions each worker holds (``server.WorkerActivity``); None outside a server.
    activity: Any = None
    url_map: Map | None = None  # the app's routes, for the article URLs; None: the current app's

    def __post_init__(self):
        self._waiting = threading.BoundedSemaphore(max(1, self.settings.max_queue))
        self._reload_lock = threading.Lock()
        self._next_check = 0.0
        self._seen: tuple | None = None  # (inode, mtime) of index/CURRENT when last looked at
        self.reloads = 0
        self._share_cores(self.searcher)

    def _share_cores(self, searcher) -> None:
        """Let the searcher's encoder drop to one thread while other workers are answering (``share_cores``)."""
        share = getattr(getattr(searcher, "embedder", None), "share_cores", None)
        if self.activity is not None and share is not None:
            share(self.activity.others_answering)

    def ask(self, req: AskRequestBase, script_root: str | None = None) -> dict:
        """Run ``Searcher.ask`` for a validated request; return its structure plus ``ok``, ``took_ms``, urls.

        ``script_root``: where the app is mounted, for the article URLs; by default the current request's.
        """
        kwargs = {}
        if req.mode is not None and self.supports_mode:
            kwargs["mode"] = req.mode
        filters = req.filters.to_filters() if req.filters is not None else None
        searcher = self.searcher  # this request finishes on this searcher, even if a reload swaps another in
        started = time.perf_counter()
        if not self._waiting.acquire(blocking=False):
            raise Overloaded("Too many questions are waiting; try again in a moment.")
        try:
            with self.activity.answering() if self.activity is not None else nullcontext():
                if not self.lock.acquire(timeout=self.settings.queue_timeout):
                    raise Overloaded("The question waited too long for its turn; try again in a moment.")
                try:
                    result = searcher.ask(req.question, k=req.k, filters=filters, **kwargs)
                finally:
                    self.lock.release()
        finally:
            self._waiting.release()
        took_ms = round((time.perf_counter() - started) * 1000, 3)
        out = {"ok": True, **result}
        results = []
        if script_root is None:
            script_root = request.script_root
        for hit in result.get("results", []):
            hit = dict(hit)
            c = hit["citation"] = dict(hit["citation"])
            c["url"] = article_url(c["article_id"], c["start"], c["end"], script_root=script_root,
                                   url_map=self.url_map)
            results.append(hit)
        out["results"] = results
        out["took_ms"] = took_ms
        return out

    # ------------------------------------------------------------------ reloads
    def _pointer(self) -> tuple[tuple | None, str | None]:
        from ..store import CURRENT

        path = Path(self.settings.index_dir) / CURRENT
        try:
            st = os.stat(path)
            return (st.st_ino, st.st_mtime_ns, st.st_size), path.read_text(encoding="utf-8").strip()
        except OSError:
            return None, None

    def maybe_reload(self) -> None:
        """At most once per ``reload_interval``: start loading the live index if it is not the one served."""
        if self.load_searcher is None:
            return
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self.settings.reload_interval
        from ..articles import JOURNAL, recover_if_idle

        if (Path(self.settings.index_dir) / JOURNAL).exists():  # a writer died mid-write: settle it
            try:
                recover_if_idle(self.settings.index_dir)
            except Exception:
                logger.exception("recovering an interrupted write failed")
        key, _ = self._pointer()
        if key is None or key == self._seen or not self._reload_lock.acquire(blocking=False):
            return

        def run():
            try:
                self._swap()
            finally:
                self._reload_lock.release()

        threading.Thread(target=run, name="index-reload", daemon=True).start()

    def reload(self) -> bool:
        """Load the live index now unless it is already served; return whether another one was swapped in."""
        if self.load_searcher is None:
            return False
        with self._reload_lock:
            return self._swap()

    def _swap(self) -> bool:
        key, build_id = self._pointer()
        served = (getattr(self.searcher, "manifest", None) or {}).get("build_id")
        if key is None or build_id == served:
            self._seen = key
            return False
        try:
            searcher = self.load_searcher()
            self._share_cores(searcher)
            warm_up(searcher)  # its own encoder, not yet shared with any request: no need for self.lock
        except Exception as exc:  # a broken build: keep answering from the one we have
            message = exc.message if isinstance(exc, QAError) else f"{type(exc).__name__}: {exc}"
            logger.error("not switching to index build %s: %s", build_id, message)
            self._seen = key
            return False
        self.searcher = searcher  # one assignment: atomic for the threads reading it
        self._seen = key
        self.reloads += 1
        logger.info("now serving index build %s", searcher.manifest.get("build_id"))
        return True

    # ------------------------------------------------------------------ writes
    def put_article(self, article_id: str, data: bytes):
        from ..articles import put_article

        result = put_article(self.settings, article_id, data, embedder=self.write_embedder)
        self.reload()
        return result

    def delete_article(self, article_id: str):
        from ..articles import delete_article

        result = delete_article(self.settings, article_id, embedder=self.write_embedder)
        self.reload()
        return result


def warm_up(searcher) -> None:
    """Ask one question so the first real one does not pay for lazy initialisation."""
    try:
        from ..retrieval.lexical import background_idfs

        background_idfs("warm up")  # hybrid's English word list (lexical.blended_idf): 0.1 s to import and read
        searcher.ask("warm up", k=1)
        vocabulary = getattr(searcher, "vocabulary", None)
        if hasattr(vocabulary, "has_prefix"):
            vocabulary.has_prefix("")  # sorts the indexed words for the name check (answer.unfamiliar_names)
    except Exception:  # a failed warm-up must not stop anything; a real request will show the error
        logger.warning("warm-up question failed", exc_info=True)


def _accepts_mode(searcher) -> bool:
    try:
        return "mode" in inspect.signature(searcher.ask).parameters
    except (TypeError, ValueError):
        return False


def create_app(settings: Settings | None = None, searcher: "Searcher | None" = None, *,
               load_searcher: Callable[[], "Searcher"] | None = None, write_embedder: Any = None,
               activity: Any = None) -> Flask:
    """Build the app; load the index and model now (unless a ready ``searcher`` is given, as tests do).

    Args:
        load_searcher: loads the live index again when it changes; by default ``Searcher(settings)``
            when no ``searcher`` is given, and no reloads when one is.
        write_embedder: embeds uploaded articles (tests pass a fake); None: the index's own encoder.
        activity: the gunicorn workers' ``server.WorkerActivity``; the encoder then uses its second core only
            while no other worker is answering.
    """
    if settings is None:
        settings = searcher.settings if searcher is not None else Settings.from_env()
    app = Flask(__name__)
    if app.debug:
        raise DebugRefused("Refusing to start with Flask debug mode on (FLASK_DEBUG): its debugger can run "
                           "arbitrary code. Unset FLASK_DEBUG.")
    check_security_settings(settings)
    app.config.update(MAX_CONTENT_LENGTH=settings.max_body_bytes, MAX_FORM_MEMORY_SIZE=settings.max_body_bytes,
                      SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Strict")
    app.json = OrjsonProvider(app)  # Flask's compact JSON, ~15x cheaper to encode (web/jsonio.py)

    if searcher is None:
        from ..retrieval import Searcher

        if load_searcher is None:
            def load_searcher():
                return Searcher(settings)

        searcher = load_searcher()
    state = app.extensions["qa_service"] = QAState(
        settings=settings, searcher=searcher,
        ask_model=ask_request_model(settings.max_question_chars, settings.max_k),
        supports_mode=_accepts_mode(searcher), load_searcher=load_searcher, write_embedder=write_embedder,
        activity=activity, url_map=app.url_map,
    )

    @app.before_request
    def _before_request():
        state.maybe_reload()
        if settings.require_key_for_read and request.endpoint not in OPEN_ENDPOINTS:
            require_key(settings, write=False)

    from . import api, pages

    app.register_blueprint(api.bp)
    app.register_blueprint(pages.bp)
    register_error_handlers(app)

    @app.after_request
    def _security_headers(response):
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    # POST /api/ask's common case without Flask's per-request machinery; the same response (web/fastpath.py).
    app.wsgi_app = AskFastPath(app, state, SECURITY_HEADERS)

    logger.info("web app ready: %d articles, %d passages, model %s",
                searcher.article_count, searcher.passage_count, searcher.model_name)
    return app


def get_state() -> QAState:
    from flask import current_app

    return current_app.extensions["qa_service"]


__all__ = ["create_app", "QAState", "DebugRefused", "article_url", "get_state"]
