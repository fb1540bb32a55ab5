"""One error shape for the whole web layer: every failure becomes ``{"ok": false, "error": {code, message}}``.

``ERROR_CODES`` is the registry of codes a client can see (status and a default sentence); the OpenAPI
document lists it, the handlers use its sentences, and the test that walks every error path checks
that nothing outside it is ever returned. ``error_response`` is the one helper that renders an error:
JSON for API clients, the ``error.html`` template for people browsing the pages.
"""

from __future__ import annotations

import logging
import re

from flask import Flask, Response, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from ..errors import QAError
from ..types import MODES

logger = logging.getLogger(__name__)

# code -> (HTTP status, a sentence for a person). Validation messages are usually more specific.
ERROR_CODES: dict[str, tuple[int, str]] = {
    "invalid_json": (400, "The request body is not valid JSON."),
    "body_not_object": (400, "The request body must be a JSON object."),
    "unknown_field": (400, "The request has a field this endpoint does not know."),
    "wrong_type": (400, "A field has the wrong type."),
    "question_missing": (400, "The question is missing."),
    "question_empty": (400, "The question is empty; type a question."),
    "question_too_long": (400, "The question is too long."),
    "k_out_of_range": (400, "k, the number of passages, is out of range."),
    "date_malformed": (400, "A date is not a valid YYYY-MM-DD calendar date."),
    "date_range_inverted": (400, "date_from is after date_to."),
    "too_many_sources": (400, "The sources filter lists too many sources."),
    "unknown_source": (400, "A source in the filter is not in the index."),
    "mode_unknown": (400, f"The search mode is not one of {', '.join(MODES[:-1])} or {MODES[-1]}."),
    "invalid_request": (400, "The request is not valid."),
    "bad_request": (400, "The request could not be understood."),
    "duplicate_key": (400, "A key appears twice in the same JSON object."),
    "parameter_repeated": (400, "A query parameter that takes one value is given more than once."),
    "article_id_invalid": (400, "The article id is not allowed: use ASCII letters, digits, '-' and '_'."),
    "article_text_invalid": (400, "The article text cannot be used."),
    "article_field_invalid": (400, "A title, outlet or author is not one line of 1 to 500 characters."),
    "url_invalid": (400, "A url is not an http(s) address."),
    "article_not_writable": (409, "The article is read from a file that writes do not change."),
    "unauthorized": (401, "A valid API key is needed: send it in the X-API-Key header."),
    "writes_disabled": (403, "Writing articles is disabled on this service."),
    "article_not_found": (404, "There is no article with that id."),
    "not_found": (404, "There is nothing at this address."),
    "method_not_allowed": (405, "This address does not accept that HTTP method."),
    "body_too_large": (413, "The request body is too large."),
    "request_uri_too_large": (414, "The address is too long."),
    "header_fields_too_large": (431, "The request headers are too large."),
    "unsupported_media_type": (415, "Send the request body as JSON with Content-Type: application/json."),
    "last_article": (409, "The only article cannot be removed; the index cannot be empty."),
    "seeds_out_of_sync": (409, "The articles folder and the index disagree; the index must be rebuilt first."),
    "internal_error": (500, "Something went wrong on our side; the error has been logged."),
    "overloaded": (503, "The service is busy; try again in a moment."),
    "write_busy": (503, "Another change to the articles is in progress; try again in a few seconds."),
    "writes_unavailable": (503, "Articles cannot be written right now."),
    "index_not_built": (503, "The search index is not available right now."),
    "index_corrupt": (503, "The search index is not available right now."),
    "index_mismatch": (503, "The search index is not available right now."),
    "model_not_found": (500, "The embedding model is not available right now."),
}

_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large",
               414: "request_uri_too_large", 415: "unsupported_media_type", 431: "header_fields_too_large"}


def error_body(code: str, message: str) -> dict:
    return {"ok": False, "error": {"code": code, "message": message}}


def wants_json() -> bool:
    """True for API routes and for clients that do not prefer HTML (curl, programs)."""
    if request.blueprint == "api" or request.path.startswith("/api/"):
        return True
    if request.blueprint == "pages":
        return False
    return request.accept_mimetypes.best_match(["application/json", "text/html"]) != "text/html"


def error_response(code: str, message: str | None = None, status: int | None = None,
                   headers: dict | None = None) -> Response:
    """Render an error: the JSON error shape for programs, the error page for people."""
    default_status, default_message = ERROR_CODES.get(code, (400, "The request is not valid."))
    status = status or default_status
    message = message or default_message
    if wants_json():
        response = jsonify(error_body(code, message))
    else:
        response = Response(render_template("error.html", code=code, message=message, status=status),
                            mimetype="text/html")
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _snake(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "error"


def handle_qa_error(exc: QAError) -> Response:
    if exc.status >= 500:
        # Server-side failures carry paths and internals in their message: log it, answer generically.
        logger.error("%s: %s", exc.code, exc.message)
        return error_response(exc.code if exc.code in ERROR_CODES else "internal_error", None, exc.status,
                              exc.headers)
    return error_response(exc.code, exc.message, exc.status, exc.headers)


def handle_http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    code = _HTTP_CODES.get(status) or _snake(exc.name or "error")
    message = ERROR_CODES[code][1] if code in ERROR_CODES else (exc.description or "The request failed.")
    headers = {}
    if status == 405 and getattr(exc, "valid_methods", None):
        headers["Allow"] = ", ".join(exc.valid_methods)
    if status >= 500:
        logger.error("HTTP %s on %s %s", status, request.method, request.path)
    return error_response(code, message, status, headers)


def handle_unexpected(exc: Exception) -> Response:
    if isinstance(exc, HTTPException):  # Flask routes these here only if no HTTPException handler exists
        return handle_http_error(exc)
    logger.exception("unexpected error on %s %s", request.method, request.path)
    return error_response("internal_error", status=500)


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(QAError, handle_qa_error)
    app.register_error_handler(HTTPException, handle_http_error)
    app.register_error_handler(Exception, handle_unexpected)
