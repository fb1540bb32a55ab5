"""Errors a user or client can see: each has a stable code, a human message and an HTTP status."""

from __future__ import annotations


class QAError(Exception):
    """Base error: ``code`` is stable snake_case, ``message`` is a sentence for a person."""

    code = "error"
    status = 400

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


class NoArticles(QAError):
    code = "no_articles"
    status = 400


class ArticleNotFound(QAError):
    code = "article_not_found"
    status = 404


class InvalidRequest(QAError):
    code = "invalid_request"
    status = 400
