"""A gunicorn server set up as ``qa-service serve`` (``gunicorn_options`` and ``QA_TUNING``) around a tiny app, for
the worker's tests: ``python tests/support/keepalive_server.py PORT THREADS [KEEPALIVE]``. Each answer names the
thread that wrote it; ``/slow`` takes 0.3 s; ``/refuse`` answers 413 without reading the body."""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from gunicorn.app.base import BaseApplication

from qa_service.tuning import parse_tuning
from qa_service.web.server import apply_options, check_gunicorn, gunicorn_options, install_tuning

TUNING = parse_tuning(os.environ.get("QA_TUNING", ""))


def app(environ, start_response):
    length = int(environ.get("CONTENT_LENGTH") or 0)
    if environ["PATH_INFO"] == "/refuse":  # answered without reading the body, as a 413 or a 401 is
        start_response("413 Request Entity Too Large", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"no"]
    if length:
        environ["wsgi.input"].read(length)
    if environ["PATH_INFO"] == "/slow":
        time.sleep(0.3)
    body = json.dumps({"thread": threading.get_ident(), "path": environ["PATH_INFO"]}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


class Server(BaseApplication):
    def __init__(self, port: int, threads: int, keepalive: int | None = None):
        self.options = gunicorn_options("127.0.0.1", port, workers=1, threads=threads, tuning=TUNING)
        if keepalive is not None:
            self.options["keepalive"] = keepalive
        super().__init__()

    def load_config(self):
        apply_options(self.cfg, self.options)

    def load(self):
        return app


if __name__ == "__main__":
    check_gunicorn()
    install_tuning(TUNING)
    Server(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None).run()
