"""Errors a user or client can see: each has a stable code, a human message and an HTTP status."""

from __future__ import annotations


class QAError(Exception):
    """Base error: ``code`` is stable snake_case, ``message`` is a sentence for a person."""

    code = "error"
    status = 400
    headers: dict[str, str] = {}  # extra HTTP headers for the response (Retry-After, WWW-Authenticate)

    def __init__(self, message: str, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class IndexNotBuilt(QAError):
    code = "index_not_built"
    status = 503


class IndexCorrupt(QAError):
    code = "index_corrupt"
    status = 503


class IndexMismatch(QAError):
    code = "index_mismatch"
    status = 503


class ModelNotFound(QAError):
    code = "model_not_found"
    status = 500


class ArticleNotFound(QAError):
    code = "article_not_found"
    status = 404


class InvalidRequest(QAError):
    code = "invalid_request"
    status = 400


class InvalidArticle(QAError):
    """An uploaded article's id or text cannot be used (``code`` says which)."""

    code = "article_text_invalid"
    status = 400


class LastArticle(QAError):
    code = "last_article"
    status = 409


class SeedsOutOfSync(QAError):
    """The articles folder and the live index disagree: a write would change more than one article."""

    code = "seeds_out_of_sync"
    status = 409


class WriteBusy(QAError):
    """Another writer holds the index's writer lock for longer than we wait."""

    code = "write_busy"
    status = 503
    headers = {"Retry-After": "5"}


class WritesUnavailable(QAError):
    code = "writes_unavailable"
    status = 503


class Overloaded(QAError):
    """More questions are waiting than this process takes, or one waited too long for its turn."""

    code = "overloaded"
    status = 503
    headers = {"Retry-After": "1"}


class Unauthorized(QAError):
    code = "unauthorized"
    status = 401
    headers = {"WWW-Authenticate": 'Bearer realm="qa-service"'}


class WritesDisabled(QAError):
    code = "writes_disabled"
    status = 403


class ConfigError(QAError):
    """The settings are unsafe or contradictory; the service refuses to start."""

    code = "config_error"
    status = 500
