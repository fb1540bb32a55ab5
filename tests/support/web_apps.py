"""Helpers for the web tests: searcher stand-ins that wrap a real ``Searcher`` and a threaded test server."""

from __future__ import annotations

import threading
from contextlib import contextmanager


class WrappedSearcher:
    """Delegates to a real ``Searcher``; subclasses change ``ask``."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[dict] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)


class NoModeSearcher(WrappedSearcher):
    """A searcher whose ``ask`` has no ``mode`` parameter (the API must not pass one)."""

    def ask(self, question, k=5, filters=None):
        self.calls.append({"question": question, "k": k, "filters": filters})
        return self.inner.ask(question, k=k, filters=filters)


class ModeSearcher(WrappedSearcher):
    """A searcher that takes ``mode`` and adds extra keys the API must pass through unchanged."""

    def ask(self, question, k=5, filters=None, mode="hybrid"):
        self.calls.append({"question": question, "k": k, "filters": filters, "mode": mode})
        result = self.inner.ask(question, k=k, filters=filters)
        result["mode"] = mode
        result["answerable"] = True
        for hit in result["results"]:
            c = hit["citation"]
            first = hit["text"].split(". ")[0]
            # article-relative offsets, like citations
            hit["answer"] = {"text": first, "start": c["start"], "end": c["start"] + len(first)}
            hit["also_reported_by"] = [{"article_id": c["article_id"], "title": "Another <b>outlet</b>"}]
            hit["custom"] = {"nested": [1, 2, 3]}
        return result


class FailingSearcher(WrappedSearcher):
    """``ask`` raises ``exc`` (to check 5xx answers leak nothing)."""

    def __init__(self, inner, exc):
        super().__init__(inner)
        self.exc = exc

    def ask(self, question, k=5, filters=None):
        raise self.exc


@contextmanager
def serve_in_thread(app):
    """Serve ``app`` on a free loopback port with werkzeug's threaded server; yield the base URL."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(5)
