"""The ``one_write`` tuning: gunicorn's response with the header block sent in the same ``sendall`` as the first
body bytes, so a client is woken once per answer, not twice (docs/decisions/one-write-responses.md).

Body framing stays gunicorn's (``_emit_body``, the hook its ``write`` calls); held headers go out before anything
written otherwise: a chunked body, a file sent with ``sendfile``, or no body at all (``close``). ``install`` makes
gunicorn's HTTP/1 workers build it (``wsgi.create`` takes the module's ``Response``); run it in the master.
"""

from __future__ import annotations

import inspect

import gunicorn.http.wsgi as gunicorn_wsgi

from . import missing_hook

STOCK = gunicorn_wsgi.Response


def check_hooks() -> None:
    """Raise ``TuningUnavailable`` unless gunicorn's response still writes its body through ``_emit_body`` and
    ``wsgi.create`` still builds the module's ``Response`` by default."""
    emit = getattr(STOCK, "_emit_body", None)
    if not callable(emit) or tuple(inspect.signature(emit).parameters) != ("self", "data"):
        raise missing_hook("one_write", "gunicorn's Response has no _emit_body(data)")
    if "_emit_body" not in STOCK.write.__code__.co_names:
        raise missing_hook("one_write", "gunicorn's Response.write no longer sends through _emit_body")
    for name in ("send_headers", "sendfile", "close"):
        if not callable(getattr(STOCK, name, None)):
            raise missing_hook("one_write", f"gunicorn's Response has no {name}()")
    create = inspect.signature(gunicorn_wsgi.create).parameters.get("response_class")
    if create is None or create.default is not None or "Response" not in gunicorn_wsgi.create.__code__.co_names:
        raise missing_hook("one_write", "gunicorn's wsgi.create no longer builds the module's Response by default")


class _Held:
    """Stands in for the socket while gunicorn writes a header block: keeps the bytes instead of sending them."""

    def __init__(self):
        self.data = b""

    def sendall(self, data) -> None:
        self.data += bytes(data)


class OneWriteResponse(STOCK):
    """gunicorn's response, with the header block sent in the same ``sendall`` as the first body bytes."""

    _held: bytes | None = None

    def send_headers(self):
        if self.headers_sent:
            return
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


def install() -> None:
    """Check the hooks, then make gunicorn's workers build ``OneWriteResponse``."""
    check_hooks()
    gunicorn_wsgi.Response = OneWriteResponse
