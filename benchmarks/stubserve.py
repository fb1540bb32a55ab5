"""gunicorn set up exactly as ``qa-service serve``, around an app that only encodes the question (bench ``query``).

``python benchmarks/stubserve.py ANSWER_FILE serve --index-dir DIR --host HOST --port PORT --workers N`` (the
arguments ``load.Server`` gives ``qa-service serve``) serves with ``qa-service serve``'s gunicorn settings and
``QA_TUNING``, an app that encodes the request's question with the index's own encoder and answers with the
recorded body of a real answer (ANSWER_FILE) plus an ``X-Encode-Ms`` header. A round trip less that encode is what
gunicorn, the kernel and the client cost around an answer, with nothing of qa-service's own app in it. Nothing here
is used by the service itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from gunicorn.app.base import BaseApplication

from qa_service.config import Settings
from qa_service.web import SECURITY_HEADERS
from qa_service.web.server import apply_options, check_gunicorn, gunicorn_options, install_tuning


def make_app(index_dir: str, body: bytes):
    from qa_service.retrieval import Searcher  # in the worker, after the fork, as the service loads it

    searcher = Searcher(Settings(index_dir=index_dir))
    searcher.encode_questions(["warm up"])
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *SECURITY_HEADERS.items()]

    def app(environ, start_response):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        question = json.loads(environ["wsgi.input"].read(length))["question"]
        started = time.perf_counter()
        searcher.encode_questions([question])
        took = (time.perf_counter() - started) * 1000
        start_response("200 OK", [*headers, ("X-Encode-Ms", f"{took:.4f}")])
        return [body]

    return app


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="stubserve.py")
    parser.add_argument("answer_file")
    parser.add_argument("command", choices=["serve"])
    for name in ("--index-dir", "--host", "--port", "--workers"):
        parser.add_argument(name, required=True)
    args = parser.parse_args(argv)
    body = Path(args.answer_file).read_bytes()
    tuning = Settings.from_env().tuning

    class StubServer(BaseApplication):
        def load_config(self):
            apply_options(self.cfg, gunicorn_options(args.host, int(args.port), int(args.workers), tuning=tuning))

        def load(self):
            return make_app(args.index_dir, body)

    check_gunicorn()
    install_tuning(tuning)
    StubServer().run()


if __name__ == "__main__":
    main(sys.argv[1:])
