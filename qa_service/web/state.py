"""What the app holds for its process (``QAState``): the searcher, how to ask it, reloads and writes.

Reloads: at most once per ``reload_interval`` a worker stats ``index/CURRENT``; when it names another build, a
background thread loads a fresh ``Searcher`` and swaps it in with one assignment, so no request waits for or is
dropped by a reload, and a build that fails to load is logged and the old one kept. Overload: at most ``max_queue``
questions wait for the encoder, each at most ``queue_timeout`` s, beyond which the client gets 503 ``overloaded``
at once (docs/decisions/overload-queue.md).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from flask import current_app, request
from werkzeug.routing import Map

from ..articles import JOURNAL, delete_article, put_article, recover_if_idle
from ..config import Settings
from ..errors import Overloaded, QAError
from .schemas import AskRequestBase
from .urls import article_url

if TYPE_CHECKING:  # pragma: no cover
    from ..retrieval import Searcher

logger = logging.getLogger(__name__)


@dataclass
class QAState:
    """The searcher of this process and how to call it."""

    settings: Settings
    searcher: "Searcher"
    ask_model: type[AskRequestBase]
    supports_mode: bool
    # The query encoder (a Rust tokenizer, ONNX or torch) is not safe to call from two threads at once.
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Loads the live index again (reloads); None: serve ``searcher`` for good.
    load_searcher: Callable[[], "Searcher"] | None = None
    write_embedder: Any = None  # embeds uploaded articles; None: the live index's own encoder
    # The encoder_cores tuning (qa_service.tuning.encoder_cores): the workers' ``WorkerActivity`` and
    # ``share_cores``; None when that tuning is off.
    activity: Any = None
    share_cores: Callable[[Any, Any], None] | None = None
    url_map: Map | None = None  # the app's routes, for the article URLs; None: the current app's

    def __post_init__(self):
        self._waiting = threading.BoundedSemaphore(max(1, self.settings.max_queue))
        self._reload_lock = threading.Lock()
        self._next_check = 0.0
        self._seen: tuple | None = None  # (inode, mtime, size) of index/CURRENT when last looked at
        self.reloads = 0
        self._share_cores(self.searcher)

    def _share_cores(self, searcher) -> None:
        if self.share_cores is not None and self.activity is not None:
            self.share_cores(getattr(searcher, "embedder", None), self.activity)

    def ask(self, req: AskRequestBase, script_root: str | None = None) -> dict:
        """Run ``Searcher.ask`` for a validated request; return its structure plus ``ok``, ``took_ms`` and URLs.

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
        from ..store import CURRENT  # the index store (numpy, the encoders) loads only in workers

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
    def put_article(self, article_id: str, data: bytes, metadata: dict | None = None):
        result = put_article(self.settings, article_id, data, embedder=self.write_embedder, metadata=metadata)
        self.reload()
        return result

    def delete_article(self, article_id: str):
        result = delete_article(self.settings, article_id, embedder=self.write_embedder)
        self.reload()
        return result


def warm_up(searcher) -> None:
    """Ask one question so the first real one does not pay for lazy initialisation (logs, never raises)."""
    try:
        from ..retrieval.lexical import background_idfs  # the retrieval stack loads only in workers

        background_idfs("warm up")  # hybrid's English word list (docs/decisions/background-idf.md)
        searcher.ask("warm up", k=1)
        vocabulary = getattr(searcher, "vocabulary", None)
        if hasattr(vocabulary, "has_prefix"):
            vocabulary.has_prefix("")  # sorts the indexed words for the name check (docs/decisions/name-check.md)
    except Exception:  # a failed warm-up must not stop anything; a real request will show the error
        logger.warning("warm-up question failed", exc_info=True)


def get_state() -> QAState:
    """The current app's ``QAState``."""
    return current_app.extensions["qa_service"]
