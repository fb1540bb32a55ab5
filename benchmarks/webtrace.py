"""Where an answer over HTTP spends its time outside the searcher: ``qa-service serve`` with timers (bench ``web``).

``python benchmarks/webtrace.py TRACE_FILE serve ARGS...`` runs ``qa-service serve ARGS...`` with timers wrapped
around gunicorn's threaded worker, the app's WSGI entry, the access log and the searcher (``QA_TUNING`` applies as
served). Each worker records per request when each stage began or ended (``time.perf_counter``, the monotonic clock
every process shares) and writes its records to ``TRACE_FILE.<pid>`` (JSON) every half second. The bench's client
records its own marks on the same clock, so the two line up request by request; requests must come one at a time.
The wrappers only time; a gunicorn that renames the wrapped methods fails loudly here. Nothing here is used by the
service itself.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import gunicorn.workers.gthread as gthread
from gunicorn.glogging import Logger as GunicornLogger

from qa_service.cli import cli
from qa_service.files import write_text_atomically
from qa_service.tuning.keepalive import KeepAliveThreadWorker

# The stages of one request, in order: (mark, the mark after it, what happens between them).
STAGES = (
    ("start", "send", "the client builds the request (JSON, http.client) until its first send"),
    ("send", "poll", "the client's send until the worker notices it (kernel, waking the worker's poller, or the "
                     "thread that answered the connection's last request and waits on it, Python's dispatch)"),
    ("poll", "handle", "poller hands the connection to a worker thread (next to nothing when a thread waited on it)"),
    ("handle", "parsed", "reading and parsing the request (gunicorn)"),
    ("parsed", "app", "gunicorn's WSGI environ"),
    ("app", "ask", "the app before the searcher (reading and validating the body; Flask's request handling unless the "
                   "fast_path tuning answers it)"),
    ("ask", "asked", "Searcher.ask (the in-process answer)"),
    ("asked", "app_done", "the app after the searcher (URLs, JSON, headers)"),
    ("app_done", "written", "writing the response (gunicorn)"),
    ("written", "logged", "the access log"),
    ("logged", "recv", "until the client has read the answer"),
)


def _install(trace_file: str) -> None:
    clock = time.perf_counter
    current: dict[str, float] = {}
    records: list[dict[str, float]] = []

    def mark_before(owner, name: str, key: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            current[key] = clock()
            return original(*args, **kwargs)

        setattr(owner, name, timed)

    def mark_after(owner, name: str, key: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            try:
                return original(*args, **kwargs)
            finally:
                current[key] = clock()

        setattr(owner, name, timed)

    mark_before(gthread.ThreadWorker, "on_client_socket_readable", "poll")
    # With the keepalive tuning, a worker with nothing else to do waits for the next request on the answering thread.
    mark_after(KeepAliveThreadWorker, "_next_request_comes", "poll")
    mark_before(gthread.ThreadWorker, "handle_request", "parsed")
    mark_before(GunicornLogger, "access", "written")  # gunicorn logs right after the response is written
    mark_after(GunicornLogger, "access", "logged")
    handle = gthread.ThreadWorker.handle

    def timed_handle(self, conn):
        current["handle"] = clock()
        try:
            return handle(self, conn)
        finally:
            records.append(dict(current))
            current.clear()

    gthread.ThreadWorker.handle = timed_handle
    init_process = gthread.ThreadWorker.init_process

    def traced_init_process(self):
        # In the worker, after the fork: the app's classes, and a thread that saves the records.
        from flask import Flask

        from qa_service.retrieval.searcher import Searcher

        # The app's WSGI entry (the fast_path tuning, when on, is the app's wsgi_app behind it).
        mark_before(Flask, "__call__", "app")
        mark_before(Searcher, "ask", "ask")
        mark_after(Searcher, "ask", "asked")
        call = Flask.__call__

        def timed_call(app, environ, start_response):
            try:
                return call(app, environ, start_response)
            finally:
                current["app_done"] = clock()

        Flask.__call__ = timed_call
        path = Path(f"{trace_file}.{os.getpid()}")

        def save() -> None:
            while True:
                time.sleep(0.5)
                write_text_atomically(path, json.dumps(records[:]))

        threading.Thread(target=save, name="webtrace", daemon=True).start()
        return init_process(self)

    gthread.ThreadWorker.init_process = traced_init_process


def read_records(trace_file: Path) -> list[dict[str, float]]:
    """The records of the one worker that answered (the file with the most records), requests or not."""
    files = sorted(trace_file.parent.glob(trace_file.name + ".*"))
    found = [json.loads(f.read_text(encoding="utf-8")) for f in files if not f.name.endswith(".tmp")]
    return max(found, key=len) if found else []


def stage_times(client: list[tuple[float, float, float]], records: list[dict[str, float]]) -> dict[str, list[float]]:
    """Per stage (``STAGES``), its duration in ms for every request where both its marks were recorded.

    ``client`` holds (started, sent, read) per request: before building it, at its first socket send, after
    reading the answer. The worker's last ``len(client)`` records of a request are those requests (a
    connection's close also passes through the worker's ``handle``, with no request: not counted).
    """
    out: dict[str, list[float]] = {label: [] for _, _, label in STAGES}
    requests = [r for r in records if "parsed" in r]
    for (started, sent, read), record in zip(client, requests[-len(client):] if client else []):
        marks = {**record, "start": started, "send": sent, "recv": read}
        if not started <= sent <= marks.get("poll", sent) <= marks.get("asked", read) <= read:
            raise ValueError("the worker's records do not line up with the client's requests")
        for start, end, label in STAGES:
            if start in marks and end in marks:
                out[label].append((marks[end] - marks[start]) * 1000)
    return out


def main(argv: list[str]) -> None:
    trace_file, args = argv[0], argv[1:]
    _install(trace_file)
    sys.argv = ["qa-service", *args]
    cli()


if __name__ == "__main__":
    main(sys.argv[1:])
