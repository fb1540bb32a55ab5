"""Run the web app under gunicorn (embedded with ``BaseApplication``), never Flask's development server.

Choices, for a CPU-bound service on a small machine:

* ``gthread`` workers (default 2 processes x 4 threads): threads keep idle keep-alive or slow connections
  (browsers open spare sockets) from blocking a whole worker, while the searcher's lock runs one
  encoding at a time per process, which is all a core can do anyway. A worker with nothing else to do keeps
  a keep-alive connection on the thread that answered it (``KeepAliveThreadWorker``), so a client asking again
  soon skips the poller's two hand-offs.
* Each worker builds its own app, so the index and the model load once per worker process, after the
  fork (``preload_app`` off). torch's OpenMP pool and onnxruntime's thread pools do not survive a
  fork, so nothing that has run the model may be forked; for the same reason ``--build`` embeds the
  seeds in a separate, spawned process and the server process itself never loads the model.
* The master only checks the index manifest (cheap, no torch) so a missing or mismatched index fails
  fast with a sentence instead of a worker traceback.
* Logs (errors and access) go to stderr.
* Workers tell each other how many questions they hold (``WorkerActivity``, counters in memory shared across
  the fork), so a worker encodes a question on two threads only while no other worker needs a core.
* A response's header block leaves in the same write as its body (``OneWriteResponse``), so a client is woken
  once per answer, not twice.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import multiprocessing
import os
import select
import socket
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import gunicorn.http.wsgi as gunicorn_wsgi
from gunicorn.app.base import BaseApplication
from gunicorn.config import AccessLogFormat
from gunicorn.glogging import Logger as GunicornLogger
from gunicorn.http.body import LengthReader
from gunicorn.workers.gthread import ThreadWorker

from ..config import Settings
from ..errors import QAError

WORKER_BOOT_ERROR = 3  # gunicorn stops the whole server when a worker exits with this code

try:  # the most of an unread request body gunicorn drains to keep a connection (gunicorn >= 25)
    from gunicorn.http.parser import _DRAIN_MAX_BYTES as DRAIN_MAX_BYTES
except ImportError:  # an older gunicorn drains without a cap
    DRAIN_MAX_BYTES = float("inf")


# gunicorn's default access-log line (Apache's combined format); ``StderrLogger.access`` writes it more cheaply.
DEFAULT_ACCESS_FORMAT = AccessLogFormat.default


class StderrLogger(GunicornLogger):
    """gunicorn's logger, with the access log on stderr (gunicorn sends ``-`` to stdout).

    The access line of the default format is built from the nine values that format shows, not from gunicorn's
    ~50 (every request and response header and environ entry, each escaped): the same line, byte for byte (a
    test compares them), for 11 instead of 28 us of CPU a request (warm). Over loopback the log is on the
    client's path (a client woken on the core that wrote the answer runs once the worker's thread has finished
    the request; the whole log cost 0.18 ms of p50, 11-26), but the saving was below what an A/B of two servers
    resolves (11-27). A custom ``access_log_format`` keeps gunicorn's own code.
    """

    def setup(self, cfg):
        super().setup(cfg)
        for handler in self.access_log.handlers:
            if getattr(handler, "_gunicorn", False) and isinstance(handler, logging.StreamHandler) \
                    and getattr(handler, "stream", None) is sys.stdout:
                handler.setStream(sys.stderr)

    def access(self, resp, req, environ, request_time):
        if not self.access_log_enabled:
            return
        if self.cfg.access_log_format != DEFAULT_ACCESS_FORMAT:
            super().access(resp, req, environ, request_time)
            return
        try:
            status = resp.status
            if isinstance(status, str):
                status = status.split(None, 1)[0]
            sent = getattr(resp, "sent", None)
            atoms = {"h": environ.get("REMOTE_ADDR", "-"), "l": "-", "u": self._get_user(environ) or "-",
                     "t": self.now(),
                     "r": f"{environ['REQUEST_METHOD']} {environ['RAW_URI']} {environ['SERVER_PROTOCOL']}",
                     "s": status, "b": sent is not None and str(sent) or "-",
                     "f": environ.get("HTTP_REFERER", "-"), "a": environ.get("HTTP_USER_AGENT", "-")}
            for key, value in atoms.items():  # as gunicorn's ``SafeAtoms``
                if isinstance(value, str) and '"' in value:
                    atoms[key] = value.replace('"', '\\"')
            self.access_log.info(DEFAULT_ACCESS_FORMAT, atoms)
        except Exception:
            self.error(traceback.format_exc())


class KeepAliveThreadWorker(ThreadWorker):
    """gunicorn's ``gthread`` worker, except that a worker with nothing else to do keeps a keep-alive connection on
    the thread that answered it, waiting there for its next request, instead of handing it back to the poller.

    Why. After an answer, ``gthread`` wakes its main thread (a pipe write) to put the connection back on the poller;
    the next request wakes the main thread again, which hands the connection to a pool thread (a third wake-up,
    often of the other, halted vCPU on this VM). A client asking again soon after an answer (a script in a loop,
    the web form's page and style sheet, the bench) pays those hand-offs every time, cold after the encode. Paired
    against the stock worker (11-28, third session; ``benchmarks/HISTORY.md``): −0.16 and −0.25 ms a round trip
    around an encode-only app (``benchmarks/stubserve.py``), −0.17 and −0.30 ms with the real app. gunicorn's
    ``gevent`` worker gets the same by keeping a greenlet per connection, but monkey-patches every thread.

    When. Only while this thread holds the worker's only connection that is busy or queued (``_held``), at most
    one thread per worker at a time and never its only thread; never for an HTTP/2 or TLS connection, nor with
    bytes of a next request already read (gunicorn's own path re-queues those), nor once the worker is stopping.
    It waits in slices of ``LINGER_SLICE`` seconds (a stopping worker hands the connection to gunicorn's own stop
    within one) up to the keep-alive timeout, the time the poller would have kept the connection, and then closes
    it as the poller would. So under load (other questions in flight) every connection goes through the poller as
    before and none waits behind one that is held; a held connection costs one of the pool's threads, parked
    without CPU, while the worker is otherwise idle.
    """

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


class WorkerActivity:
    """How many questions each of the server's worker processes holds at this moment (answering or waiting).

    One counter per worker in a shared-memory array the master makes before it forks: each worker writes only its
    own counter (under a thread lock, around the whole of a question: waiting for the encoder included) and reads
    the others', with no lock. The master hands out a counter before each fork (``pre_fork``) and zeroes it when
    the worker exits (``child_exit``), so a worker killed mid-answer does not look busy for ever. The encoder
    uses ``others_answering`` to choose between its two-thread session (fast alone) and its one-thread session
    (cheaper once the other core is taken; ``OnnxEmbedder.share_cores``). Counting waiting questions too keeps a
    loaded worker's counter from dropping to zero between two answers, when the other worker would otherwise
    take both cores for a moment (measured: 0.3-0.4 ms more CPU an answer at 8 clients when only answering
    counted). gunicorn starts a new worker before an old one is gone when it reloads, so there are twice as many
    counters as workers, plus two; a worker that finds none free does not publish (others see it as idle).
    """

    def __init__(self, workers: int):
        self._counts = multiprocessing.RawArray(ctypes.c_int, 2 * max(1, workers) + 2)
        self._free = list(range(len(self._counts)))  # master-side bookkeeping
        self._slot: int | None = None  # this worker's counter (after the fork)
        self._lock = threading.Lock()  # the worker's threads share its counter

    # master side (gunicorn hooks)
    def assign(self, worker) -> None:
        worker.qa_activity_slot = self._free.pop(0) if self._free else None

    def release(self, worker) -> None:
        slot = getattr(worker, "qa_activity_slot", None)
        if slot is not None:
            self._counts[slot] = 0
            self._free.append(slot)

    # worker side
    def adopt(self, worker) -> None:
        self._slot = getattr(worker, "qa_activity_slot", None)

    @contextmanager
    def answering(self):
        slot = self._slot
        if slot is None:
            yield
            return
        with self._lock:
            self._counts[slot] += 1
        try:
            yield
        finally:
            with self._lock:
                self._counts[slot] -= 1

    def others_answering(self) -> bool:
        own = self._slot
        return any(count for i, count in enumerate(self._counts) if i != own)


def gunicorn_options(host: str, port: int, workers: int, threads: int = 4, timeout: int = 30) -> dict:
    """Return the gunicorn settings this service runs with (``QAServer`` adds the ``WorkerActivity`` hooks)."""
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return {
        "bind": [bind],
        "workers": workers,
        "worker_class": "qa_service.web.server.KeepAliveThreadWorker",  # gthread, keeping an idle worker's connection
        "threads": threads,
        "timeout": timeout,
        "graceful_timeout": 10,
        "keepalive": 5,
        # Connections a worker holds at once (idle keep-alive ones included); beyond them new connections wait
        # in the listen backlog. Questions themselves are bounded in the app (Settings.max_queue/queue_timeout).
        "worker_connections": 100,
        "preload_app": False,
        "limit_request_line": 8190,  # gunicorn's maximum: fits a 1,000-character ASCII question, URL-encoded
        "limit_request_fields": 64,
        "limit_request_field_size": 8190,
        "accesslog": "-",
        "errorlog": "-",
        "loglevel": "info",
        "logger_class": StderrLogger,
        "proc_name": "qa-service",
        "forwarded_allow_ips": "127.0.0.1,::1",
        "post_fork": _remember_worker,
        "control_socket_disable": True,  # gunicorn >= 25: no runtime-control socket in $HOME
    }


_worker = None  # the gunicorn worker of this process, for the heartbeat while the model loads


def _remember_worker(server, worker) -> None:
    global _worker
    _worker = worker
    # gunicorn answers some malformed requests itself, before the app runs: give those our error shape too.
    import gunicorn.util

    gunicorn.util.write_error = write_error_body


# Statuses gunicorn answers without the app (request line or headers too long, malformed requests).
_TRANSPORT_CODES = {400: "bad_request", 414: "request_uri_too_large", 431: "header_fields_too_large"}


def write_error_body(sock, status_int: int, reason: str, mesg: str) -> None:
    """Replacement for ``gunicorn.util.write_error``: the JSON error body instead of gunicorn's HTML page.

    gunicorn's message (it may quote the raw request line) is logged by gunicorn, not echoed to the client.
    """
    import json

    from gunicorn.util import write_nonblock

    from . import SECURITY_HEADERS
    from .errors import ERROR_CODES, error_body

    code = _TRANSPORT_CODES.get(status_int) or ("internal_error" if status_int >= 500 else "bad_request")
    status, message = ERROR_CODES[code]
    body = json.dumps(error_body(code, message)).encode("utf-8")
    head = [f"HTTP/1.1 {status} {reason if status == status_int else 'Bad Request'}", "Connection: close",
            "Content-Type: application/json", f"Content-Length: {len(body)}",
            *(f"{name}: {value}" for name, value in SECURITY_HEADERS.items())]
    write_nonblock(sock, ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)


class _Heartbeat:
    """Tell the gunicorn master this worker is alive while it loads, so a slow start is not killed.

    gunicorn counts a worker's boot against ``timeout``; loading torch and the model on a busy
    2-core machine can take longer than a request ever should.
    """

    def __enter__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="boot-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self):
        while _worker is not None and not self._stop.wait(1.0):
            _worker.notify()

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class _Held:
    """Stands in for the socket while gunicorn writes a header block: keeps the bytes instead of sending them."""

    def __init__(self):
        self.data = b""

    def sendall(self, data) -> None:
        self.data += bytes(data)


class OneWriteResponse(gunicorn_wsgi.Response):
    """gunicorn's response, with the header block sent in the same ``sendall`` as the first body bytes.

    gunicorn writes the headers, then the body: two loopback segments. A client woken by the first (on this
    2-vCPU VM, on the core that wrote it) parsed the headers while the worker's thread was held off its core, and
    the body came 0.29 ms (p50) after the headers. One write: 0.06-0.27 ms less p50 over HTTP (11-27, 90-120
    paired questions per run, a toggle per request in one server, six runs; a placebo toggle -0.03 / +0.02).
    Body framing stays gunicorn's (``_emit_body``, its hook for subclasses); headers held back go out before
    anything written otherwise: a chunked body, a file sent with ``sendfile``, or no body at all (``close``).

    One more change: an answer given while more of the request's body is unread than gunicorn will drain before
    the next request (``_DRAIN_MAX_BYTES``, 64 KiB, or as much) says ``Connection: close``. gunicorn would otherwise promise
    keep-alive, give up draining and close the connection, and the client's next request on it failed (a 413 for
    a body over the limit, a 401 for an upload without its key: the body is refused unread; 11-28, third session).
    """

    _held: bytes | None = None

    def send_headers(self):
        if self.headers_sent:
            return
        reader = getattr(getattr(self.req, "body", None), "reader", None)
        if isinstance(reader, LengthReader) and reader.length >= DRAIN_MAX_BYTES:  # gunicorn gives up at the cap
            self.force_close()
        sock, self.sock = self.sock, _Held()
        try:
            super().send_headers()
        finally:
            self._held, self.sock = self.sock.data, sock

    def _release(self) -> None:
        held, self._held = self._held, None
        if held:
            self.sock.sendall(held)

    def _emit_body(self, data):
        held = self._held
        if held is not None and not self.chunked:
            self._held = None
            self.sock.sendall(held + data)
            return
        self._release()
        super()._emit_body(data)

    def sendfile(self, respiter):
        self.send_headers()  # gunicorn's sendfile writes on the socket itself: the headers go first
        self._release()
        return super().sendfile(respiter)

    def close(self):
        self.send_headers()
        self._release()
        super().close()


def use_one_write_responses() -> bool:
    """Make gunicorn's HTTP/1 workers build ``OneWriteResponse`` (``wsgi.create`` takes the module's ``Response``).

    Skipped (False) for a gunicorn without the ``_emit_body`` hook: its ``write`` would send the body itself, and
    the held headers only after it."""
    if not hasattr(OneWriteResponse.__bases__[0], "_emit_body"):
        return False
    gunicorn_wsgi.Response = OneWriteResponse
    return True


def apply_options(cfg, options: dict) -> None:
    """Set ``options`` (``gunicorn_options``) on a gunicorn config; settings newer than the installed gunicorn are
    skipped."""
    for key, value in options.items():
        if key in cfg.settings:
            cfg.set(key, value)


class QAServer(BaseApplication):
    """gunicorn, configured in code, serving ``create_app(settings)`` in each worker."""

    def __init__(self, settings: Settings, options: dict):
        self.settings = settings
        self.options = options
        self.activity = WorkerActivity(options.get("workers", 1))  # made here, in the master, before any fork
        use_one_write_responses()  # in the master: every worker forked from it builds them
        super().__init__()

    def load_config(self):
        apply_options(self.cfg, self.options)
        post_fork = self.cfg.post_fork

        def adopt_then(server, worker):
            self.activity.adopt(worker)
            post_fork(server, worker)

        self.cfg.set("pre_fork", lambda server, worker: self.activity.assign(worker))
        self.cfg.set("post_fork", adopt_then)
        self.cfg.set("child_exit", lambda server, worker: self.activity.release(worker))

    def load(self):
        from . import create_app

        with _Heartbeat():
            try:
                app = create_app(self.settings, activity=self.activity)
            except QAError as exc:
                logging.getLogger("gunicorn.error").error("cannot start: %s", exc.message)
                sys.exit(WORKER_BOOT_ERROR)
            warm_up(app)
        return app


def warm_up(app) -> None:
    """Ask one question at start-up so the first real one does not pay for lazy initialisation."""
    from . import warm_up as warm_up_searcher

    warm_up_searcher(app.extensions["qa_service"].searcher)  # logs, never raises


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def debug_requested() -> bool:
    return os.environ.get("FLASK_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _build(settings: Settings, seeds_dir: Path) -> str:
    from ..cli import ensure_index

    return ensure_index(settings, seeds_dir, progress=False)


def build_in_subprocess(settings: Settings, seeds_dir: Path) -> str:
    """Run ``ensure_index`` in a spawned process, so this one never runs the model before forking.

    An executor's worker, not a ``multiprocessing.Pool``'s: it is not daemonic, so the build can cut a large
    folder's articles on every core (``chunking.split_articles``), and a worker that dies raises here instead of
    leaving the call waiting.
    """
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_build, settings, seeds_dir).result()


def recover_writes(settings: Settings) -> str | None:
    """Settle an article write that a crash interrupted (see ``articles``); return what was done."""
    from ..articles import recover, writer_lock
    from ..errors import WriteBusy

    if not Path(settings.index_dir).is_dir():
        return None
    try:
        with writer_lock(settings.index_dir, timeout=0):
            return recover(settings.index_dir, settings.seeds_dir if Path(settings.seeds_dir).is_dir() else None)
    except WriteBusy:  # a writer is at work; it settles any interrupted write itself before its own
        return None


def check_index(settings: Settings) -> dict:
    """Raise a ``QAError`` unless the index is there, whole, and built with ``settings.model``."""
    from ..backends import read_index_manifest
    from ..store import check_model

    manifest, where = read_index_manifest(settings)
    check_model(manifest, settings.model, where)
    return manifest


def run(settings: Settings, host: str, port: int, workers: int) -> None:
    """Serve until stopped (SIGINT/SIGTERM)."""
    QAServer(settings, gunicorn_options(host, port, workers)).run()
