"""The ``keepalive`` tuning: gunicorn's ``gthread`` worker, except that a worker with nothing else to do keeps a
keep-alive connection on the thread that answered it, waiting there for its next request.

Stock ``gthread`` hands the connection back to its poller after each answer and to a pool thread again for the
next request; a client asking again soon pays those hand-offs every time (docs/decisions/keepalive-worker.md).
Only while this thread holds the worker's only busy or queued connection (at most one thread per worker, never its
only thread); never for HTTP/2, TLS, bytes of a next request already read, or a stopping worker. It waits in
slices of ``LINGER_SLICE`` s up to the keep-alive timeout and then closes the connection, as the poller would.
"""

from __future__ import annotations

import inspect
import select
import threading
import time

from gunicorn.http.unreader import Unreader
from gunicorn.workers.gthread import TConn, ThreadWorker

from . import missing_hook

WORKER_CLASS = "qa_service.tuning.keepalive.KeepAliveThreadWorker"
# The gthread methods this worker overrides or calls, with their parameters (after self).
HOOKS = {"init_process": (), "enqueue_req": ("conn",), "handle": ("conn",)}


def check_hooks() -> None:
    """Raise ``TuningUnavailable`` unless gunicorn's gthread worker still has what this worker builds on."""
    for name, params in HOOKS.items():
        method = getattr(ThreadWorker, name, None)
        if not callable(method):
            raise missing_hook("keepalive", f"gunicorn's gthread worker has no {name}()")
        if tuple(inspect.signature(method).parameters)[1:] != params:
            raise missing_hook("keepalive", f"gunicorn's gthread {name}() no longer takes ({', '.join(params)})")
    for owner, attributes in ((TConn.__init__, ("is_http2", "parser", "sock")), (Unreader.__init__, ("buf",))):
        missing = [a for a in attributes if a not in owner.__code__.co_names]
        if missing:
            raise missing_hook("keepalive", f"gunicorn's {owner.__qualname__} sets no {', '.join(missing)}")


class KeepAliveThreadWorker(ThreadWorker):
    """gunicorn's ``gthread`` worker that keeps an idle worker's keep-alive connection on its answering thread."""

    LINGER_SLICE = 0.25

    def init_process(self):
        self._held = 0  # connections handed to the pool and not finished (queued or being answered)
        self._lingering = False
        self._count_lock = threading.Lock()
        super().init_process()

    def enqueue_req(self, conn):
        with self._count_lock:
            self._held += 1
        super().enqueue_req(conn)

    def handle(self, conn):
        try:
            keep = super().handle(conn)
            while keep is True and self._linger_on(conn):
                try:
                    ready = self._next_request_comes(conn)
                finally:
                    with self._count_lock:
                        self._lingering = False
                if ready is None:  # the worker is stopping: gunicorn's own stop handles the connection
                    break
                if not ready:  # idle for the whole keep-alive: closed, as the poller would have closed it
                    return False
                keep = super().handle(conn)
            return keep
        finally:
            with self._count_lock:
                self._held -= 1

    def _linger_on(self, conn) -> bool:
        if not self.alive or self.cfg.threads < 2 or conn.is_http2 or self.cfg.is_ssl or conn.parser is None \
                or conn.parser.unreader.buf.getvalue():
            return False
        with self._count_lock:
            if self._held != 1 or self._lingering:
                return False
            self._lingering = True
            return True

    def _next_request_comes(self, conn) -> bool | None:
        """Wait until the connection is readable (a request, or the client closing it): True; False when the
        keep-alive timeout passes first; None when the worker begins to stop."""
        poll = select.poll()
        poll.register(conn.sock.fileno(), select.POLLIN)
        deadline = time.monotonic() + self.cfg.keepalive
        while self.alive:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if poll.poll(min(left, self.LINGER_SLICE) * 1000):
                return True
        return None
