"""Run the web app under gunicorn (embedded with ``BaseApplication``), never Flask's development server.

gunicorn's stock ``gthread`` worker (2 processes x 4 threads by default): threads keep idle keep-alive or slow
connections from blocking a worker, while the searcher's lock runs one encoding at a time per process
(docs/decisions/worker-processes.md). Each worker builds its own app after the fork (``preload_app`` off): the
master never loads the model and ``--build`` runs in a spawned process, because the encoder's thread pools and locks
do not survive a fork (docs/decisions/fork-after-model.md). The master only checks the index manifest, so a missing
or mismatched index fails with a sentence. Logs (errors and access) go to stderr.
Opt-in tuning (``Settings.tuning``, ``qa_service/tuning/``) is checked and installed here, in the master.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import multiprocessing
import os
import socket
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from inspect import signature
from pathlib import Path

import gunicorn.util
from flask import Flask
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.glogging import Logger as GunicornLogger
from gunicorn.http.message import Message
from gunicorn.http.wsgi import Response as GunicornResponse
from gunicorn.workers.base import Worker

from ..articles import recover, writer_lock
from ..config import Settings
from ..errors import ConfigError, QAError, WriteBusy
from ..indexing import ensure_index
from ..tuning import fast_path, keepalive, one_write
from . import create_app, warm_up
from .errors import ERROR_CODES, error_body
from .headers import SECURITY_HEADERS

# gunicorn answers these itself, before the app runs (request line or headers too long, malformed requests).
TRANSPORT_CODES = {400: "bad_request", 414: "request_uri_too_large", 431: "header_fields_too_large"}
# gunicorn (>= 25) drains at most this much of a request body the app left unread before it gives up on the
# connection (docs/decisions/unread-body-close.md).
UNREAD_BODY_LIMIT = 64 * 1024


class StderrAccessLogger(GunicornLogger):
    """gunicorn's logger and access-log format, with the access log on stderr beside the error log (gunicorn
    sends ``accesslog = "-"`` to stdout; docs/decisions/access-log.md)."""

    def setup(self, cfg):
        super().setup(cfg)
        for handler in self.access_log.handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
                handler.setStream(sys.stderr)


def gunicorn_options(host: str, port: int, workers: int, threads: int = 4, timeout: int = 30,
                     tuning: frozenset[str] = frozenset()) -> dict:
    """The gunicorn settings this service runs with; ``tuning`` picks the keep-alive worker when named."""
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return {
        "bind": [bind],
        "workers": workers,
        "worker_class": keepalive.WORKER_CLASS if "keepalive" in tuning else "gthread",
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
        "logger_class": StderrAccessLogger,
        "proc_name": "qa-service",
        "forwarded_allow_ips": "127.0.0.1,::1",
        "pre_request": close_after_large_body,
        "post_fork": _remember_worker,
        "control_socket_disable": True,  # gunicorn >= 25: no runtime-control socket in $HOME
    }


def apply_options(cfg, options: dict) -> None:
    """Set ``options`` on a gunicorn config; settings newer than the installed gunicorn are skipped."""
    for key, value in options.items():
        if key in cfg.settings:
            cfg.set(key, value)


def check_gunicorn() -> None:
    """Raise ``ConfigError`` unless gunicorn still has the two hooks this service uses by default: its error page
    writer (``util.write_error``) and a request's ``must_close`` (docs/decisions/gunicorn-error-pages.md)."""
    write_error = getattr(gunicorn.util, "write_error", None)
    if not callable(write_error) or tuple(signature(write_error).parameters) != ("sock", "status_int", "reason",
                                                                                  "mesg") \
            or "write_error" not in Worker.handle_error.__code__.co_names:
        raise ConfigError("The installed gunicorn no longer writes its own error answers through "
                          "util.write_error(sock, status_int, reason, mesg); install the gunicorn version "
                          "pyproject.toml names.")
    if "must_close" not in Message.should_close.__code__.co_names \
            or "should_close" not in GunicornResponse.should_close.__code__.co_names:
        raise ConfigError("The installed gunicorn no longer closes a connection for a request marked must_close; "
                          "install the gunicorn version pyproject.toml names.")


def install_tuning(tuning: frozenset[str]) -> None:
    """Check every named tuning's hooks (``TuningUnavailable`` if one is gone) and install the gunicorn ones."""
    if "keepalive" in tuning:
        keepalive.check_hooks()
    if "one_write" in tuning:
        one_write.install()  # in the master: every worker forked from it builds OneWriteResponse
    if "fast_path" in tuning:
        fast_path.check_hooks(Flask(__name__))


def close_after_large_body(worker, req) -> None:
    """gunicorn's ``pre_request`` hook: answer a request whose body is ``UNREAD_BODY_LIMIT`` or more with
    ``Connection: close``, as gunicorn would otherwise promise keep-alive for a body refused unread (a 413, a 401
    for an upload without its key), give up draining it and close the connection under the client's next request."""
    for name, value in req.headers:
        if name == "CONTENT-LENGTH":
            if value.isdigit() and int(value) >= UNREAD_BODY_LIMIT:
                req.must_close = True
            return


_worker = None  # the gunicorn worker of this process, for the heartbeat while the model loads


def _remember_worker(server, worker) -> None:
    global _worker
    _worker = worker
    gunicorn.util.write_error = write_error_body  # gunicorn's own error answers in our error shape


def write_error_body(sock, status_int: int, reason: str, mesg: str) -> None:
    """Replacement for ``gunicorn.util.write_error``: the JSON error body instead of gunicorn's HTML page.

    gunicorn's message (it may quote the raw request line) is logged by gunicorn, not echoed to the client.
    """
    code = TRANSPORT_CODES.get(status_int) or ("internal_error" if status_int >= 500 else "bad_request")
    status, message = ERROR_CODES[code]
    body = json.dumps(error_body(code, message)).encode("utf-8")
    head = [f"HTTP/1.1 {status} {reason if status == status_int else 'Bad Request'}", "Connection: close",
            "Content-Type: application/json", f"Content-Length: {len(body)}",
            *(f"{name}: {value}" for name, value in SECURITY_HEADERS.items())]
    gunicorn.util.write_nonblock(sock, ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)


class _Heartbeat:
    """Tell the gunicorn master this worker is alive while it loads, so a slow start is not killed.

    gunicorn counts a worker's boot against ``timeout``; loading the model on a busy 2-core machine can take
    longer than a request ever should.
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


def _encoder_cores(workers: int):
    """The encoder_cores tuning's ``WorkerActivity`` (made in the master, before any fork) and ``share_cores``."""
    from ..tuning.encoder_cores import WorkerActivity, share_cores  # opt-in: loaded only when named

    return WorkerActivity(workers), share_cores


class QAServer(BaseApplication):
    """gunicorn, configured in code, serving ``create_app(settings)`` in each worker."""

    def __init__(self, settings: Settings, options: dict):
        check_gunicorn()
        install_tuning(settings.tuning)
        self.settings = settings
        self.options = options
        self.activity = self.share_cores = None
        if "encoder_cores" in settings.tuning:
            self.activity, self.share_cores = _encoder_cores(options.get("workers", 1))
        super().__init__()

    def load_config(self):
        apply_options(self.cfg, self.options)
        activity = self.activity
        if activity is None:
            return
        post_fork = self.cfg.post_fork

        def adopt_then(server, worker):
            activity.adopt(worker)
            post_fork(server, worker)

        self.cfg.set("pre_fork", lambda server, worker: activity.assign(worker))
        self.cfg.set("post_fork", adopt_then)
        self.cfg.set("child_exit", lambda server, worker: activity.release(worker))

    def load(self):
        with _Heartbeat():
            try:
                app = create_app(self.settings, activity=self.activity, share_cores=self.share_cores)
            except QAError as exc:
                logging.getLogger("gunicorn.error").error("cannot start: %s", exc.message)
                sys.exit(Arbiter.WORKER_BOOT_ERROR)  # gunicorn stops the whole server
            warm_up(app.extensions["qa_service"].searcher)  # logs, never raises
        return app


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


def _note(line: str) -> None:
    """A build's notes (why it rebuilds, files skipped) on stderr, where ``qa-service index`` shows them."""
    print(line, file=sys.stderr, flush=True)


def _build(settings: Settings, seeds_dir: Path) -> str:
    return ensure_index(settings, seeds_dir, progress=False, notes=_note)


def build_in_subprocess(settings: Settings, seeds_dir: Path) -> str:
    """Run ``ensure_index`` in a spawned process, so this one never runs the model before forking.

    An executor's worker, not a ``multiprocessing.Pool``'s: it is not daemonic, so the build can cut a large
    folder's articles on every core, and a worker that dies raises here instead of leaving the call waiting.
    """
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_build, settings, seeds_dir).result()


def recover_writes(settings: Settings) -> str | None:
    """Settle an article write that a crash interrupted (see ``articles``); return what was done."""
    if not Path(settings.index_dir).is_dir():
        return None
    try:
        with writer_lock(settings.index_dir, timeout=0):
            seeds = settings.seeds_dir if settings.seeds_dir is not None and Path(settings.seeds_dir).is_dir() else None
            return recover(settings.index_dir, seeds)
    except WriteBusy:  # a writer is at work; it settles any interrupted write itself before its own
        return None


def check_index(settings: Settings) -> dict:
    """Raise a ``QAError`` unless the index is there, whole, and built with ``settings.model``."""
    from ..backends import read_index_manifest  # the manifest only: the master stays free of the encoder
    from ..store import check_model

    manifest, where = read_index_manifest(settings)
    check_model(manifest, settings.model, where)
    return manifest


def run(settings: Settings, host: str, port: int, workers: int) -> None:
    """Serve until stopped (SIGINT/SIGTERM)."""
    QAServer(settings, gunicorn_options(host, port, workers, tuning=settings.tuning)).run()
