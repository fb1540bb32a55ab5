"""The ``fast_path`` tuning: ``POST /api/ask``'s common case answered by WSGI middleware in front of Flask.

It answers only a request Flask would answer with 200 from ``api.ask_post`` with nothing else on the way (JSON
body within the limit that validates, no key needed, the app's hooks unchanged), with the same status, headers
and body; everything else goes to Flask unchanged, and errors are rendered by the app's own handlers. It skips
Flask's per-request machinery, which is cheap warm but costly in the caches the encoder leaves
(docs/decisions/post-fast-path.md). Flask's request signals are not sent for the requests answered here.
"""

from __future__ import annotations

import inspect
import io
from typing import Any, Callable, Iterable

from ..errors import InvalidRequest
from . import missing_hook

ASK_PATH = "/api/ask"
JSON_TYPE = "application/json"
# The Flask app methods this middleware calls, with the parameters it passes.
FLASK_HOOKS = {"request_context": ("environ",), "handle_user_exception": ("e",), "handle_exception": ("e",),
               "finalize_request": ("rv",)}
HOOK_REGISTRIES = ("before_request_funcs", "after_request_funcs", "teardown_request_funcs", "url_value_preprocessors")


def check_hooks(app) -> None:
    """Raise ``TuningUnavailable`` unless the Flask app has every method and hook registry this middleware uses."""
    for name, params in FLASK_HOOKS.items():
        method = getattr(app, name, None)
        if not callable(method):
            raise missing_hook("fast_path", f"Flask apps have no {name}()")
        if tuple(inspect.signature(method).parameters)[:len(params)] != params:
            raise missing_hook("fast_path", f"Flask's {name}() no longer takes {', '.join(params)}")
    for name in HOOK_REGISTRIES:
        if not isinstance(getattr(app, name, None), dict):
            raise missing_hook("fast_path", f"Flask apps have no {name} registry")


def _hooks(app) -> tuple:
    """The app's request hooks, to notice one added after the fast path was set up (it would not run them)."""
    return tuple({key: tuple(funcs) for key, funcs in getattr(app, registry).items()} for registry in HOOK_REGISTRIES)


class AskFastPath:
    """WSGI middleware: answers ``POST /api/ask``'s common case itself, hands everything else to ``wsgi_app``.

    ``parse``: ``(model, body) -> request``, raising ``InvalidRequest`` (``web.schemas.parse_json_body``).
    """

    def __init__(self, app, state, security_headers: dict[str, str], parse: Callable[[Any, bytes], Any]):
        check_hooks(app)
        self.app = app
        self.state = state
        self.parse = parse
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
            req = self.parse(self.state.ask_model, body)
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
