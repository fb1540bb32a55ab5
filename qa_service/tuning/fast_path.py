"""``POST /api/ask``'s common case answered without Flask's per-request machinery (WSGI middleware).

Why. After the question encoder has streamed its ~43 MB of weights through a 32 MB L3 cache, everything else a
request touches is a cache miss. Flask's request handling (request and app contexts, routing, the view's
proxies, the response object and its header bookkeeping, the hooks) costs 0.12 ms warm but 0.51 ms after such
a flush, against 0.02 and 0.19 ms for the same request validated, answered and encoded here (searcher stubbed). Over HTTP, paired with the
Flask path inside one server, this answers 0.43-0.53 ms sooner (11-27, benchmarks/HISTORY.md).

What it takes. Only a request Flask would answer with 200 from ``api.ask_post`` with nothing else on the way:
``POST`` to ``/api/ask`` at the application's root, ``Content-Type: application/json`` (parameters allowed), a
``Content-Length`` within the body limit, a body that validates, no key needed for reading, and the app's hooks
still the ones ``create_app`` installed. Everything else (other routes and methods, chunked bodies, invalid
bodies, keys) goes to Flask unchanged, with the body handed on if it was read, so errors are rendered in one
place. An error raised while answering is rendered by the app's own error handlers inside a request context.

What it does is what Flask does for that request: the app's ``before_request`` work (``QAState.maybe_reload``),
``QAState.ask``, the app's JSON encoding (``OrjsonProvider.encode``) and the same headers in the same order
(``Content-Type``, ``Content-Length``, then ``SECURITY_HEADERS`` from the ``after_request`` hook). A test sends
the same requests both ways and compares status, headers and body.

This is standard Flask WSGI middleware (``app.wsgi_app = Middleware(app.wsgi_app)``, as ProxyFix is installed),
so ``app.test_client()`` and gunicorn both go through it, and middleware a deployment adds later (ProxyFix with a
path prefix, say) wraps this one. Flask's request signals (``request_started``, ``request_finished``) are not sent
for the requests answered here; the app connects none.
"""

from __future__ import annotations

import io
from typing import Any, Callable, Iterable

from ..errors import InvalidRequest
from .schemas import parse_json_body

ASK_PATH = "/api/ask"
JSON_TYPE = "application/json"


def _hooks(app) -> tuple:
    """The app's request hooks, to notice one added after the fast path was set up (it would not run them)."""
    return tuple({key: tuple(funcs) for key, funcs in registry.items()}
                 for registry in (app.before_request_funcs, app.after_request_funcs, app.teardown_request_funcs,
                                  app.url_value_preprocessors))


class AskFastPath:
    """WSGI middleware: answers ``POST /api/ask``'s common case itself, hands everything else to ``wsgi_app``."""

    def __init__(self, app, state, security_headers: dict[str, str]):
        self.app = app
        self.state = state
        self.wsgi_app = app.wsgi_app  # Flask's own, which this wraps
        self.headers = [(name, value) for name, value in security_headers.items()]
        encode = getattr(app.json, "encode", None)
        # A debug or indented JSON provider writes other bytes than ``encode``: then Flask answers everything.
        self.encode = encode if encode is not None and getattr(app.json, "compact", None) is not False \
            and not app.debug else None
        self.hooks = _hooks(app)

    def takes(self, environ: dict) -> bool:
        """Whether this request is one the fast path answers exactly as Flask would (before reading its body)."""
        if environ.get("REQUEST_METHOD") != "POST" or environ.get("PATH_INFO") != ASK_PATH:
            return False
        if environ.get("SCRIPT_NAME") or "HTTP_TRANSFER_ENCODING" in environ:
            return False
        content_type = environ.get("CONTENT_TYPE", "")
        # Parameters (``; charset=utf-8``) change nothing: the body is read as bytes and JSON is UTF-8.
        if content_type != JSON_TYPE and content_type.partition(";")[0].strip().lower() != JSON_TYPE:
            return False
        length = environ.get("CONTENT_LENGTH", "")
        limit = self.app.config["MAX_CONTENT_LENGTH"]
        if not (length.isascii() and length.isdigit()) or (limit is not None and int(length) > limit):
            return False
        return self.encode is not None and not self.state.settings.require_key_for_read \
            and _hooks(self.app) == self.hooks

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if not self.takes(environ):
            return self.wsgi_app(environ, start_response)
        length = int(environ["CONTENT_LENGTH"])
        try:
            body = environ["wsgi.input"].read(length) if length else b""
        except Exception as exc:  # noqa: BLE001 - the client went away mid-body: rendered as Flask would
            return self._error(environ, start_response, exc)
        environ["wsgi.input"] = io.BytesIO(body)  # Flask reads it again if it takes over below
        if len(body) != length:  # a short body: Flask's own error
            return self.wsgi_app(environ, start_response)
        try:
            req = parse_json_body(self.state.ask_model, body)
        except InvalidRequest:  # Flask validates it again and renders the error
            return self.wsgi_app(environ, start_response)
        try:
            self.state.maybe_reload()
            out = self.encode(self.state.ask(req, script_root=""))
        except Exception as exc:  # noqa: BLE001 - rendered by the app's error handlers, as Flask would
            return self._error(environ, start_response, exc)
        start_response("200 OK", [("Content-Type", JSON_TYPE), ("Content-Length", str(len(out))), *self.headers])
        return [out]

    def _error(self, environ: dict, start_response: Callable, exc: Exception) -> Any:
        app = self.app
        with app.request_context(environ):
            try:
                rv = app.handle_user_exception(exc)
            except Exception as unhandled:  # noqa: BLE001 - no handler for it: Flask's own 500
                rv = app.handle_exception(unhandled)
            response = app.finalize_request(rv)
        return response(environ, start_response)
