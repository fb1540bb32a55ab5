"""The JSON API blueprint: /api/ask, /api/articles (read; add and remove with an API key), /healthz, /openapi.json."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from ..backends.base import info_of
from ..errors import InvalidRequest
from ..types import ArticleInfo
from .auth import require_key
from .openapi import build_openapi, operation
from .schemas import (
    ArticleDetail,
    ArticleList,
    ArticleUpload,
    ArticleWritten,
    AskResponse,
    Health,
    parse_json_body,
    parse_query,
)
from .state import get_state
from .urls import article_url

bp = Blueprint("api", __name__)

ASK_ERRORS = ("question_missing", "question_empty", "question_too_long", "wrong_type", "unknown_field",
              "k_out_of_range", "date_malformed", "date_range_inverted", "too_many_sources",
              "unknown_source", "mode_unknown")


def _ask_model(app):
    return app.extensions["qa_service"].ask_model


def _require_json(what: str) -> None:
    if not request.is_json:
        raise InvalidRequest(f"Send the {what} as a JSON object with Content-Type: application/json.",
                             code="unsupported_media_type", status=415)


def _body() -> bytes:
    """Return the request body, refusing one over the request's size cap (413 ``body_too_large``)."""
    data = request.get_data(cache=False)
    limit = request.max_content_length
    if request.content_length is None and limit is not None and len(data) >= limit:
        # A chunked body has no Content-Length to check up front, and werkzeug stops reading it at the cap
        # instead of refusing it: a body that filled the cap is treated as over it.
        raise RequestEntityTooLarge()
    return data


@bp.post("/api/ask")
@operation(summary="Ask a question", body=_ask_model, response=AskResponse, errors=ASK_ERRORS,
           description="Return the passages that best answer the question, best first, each with an exact "
                       "citation: `text == article.text[start:end]` for the article at `/api/articles/{id}`. "
                       "Filters are applied before ranking.")
def ask_post():
    state = get_state()
    _require_json("question")
    req = parse_json_body(state.ask_model, _body())
    return jsonify(state.ask(req))


@bp.get("/api/ask")
@operation(summary="Ask a question (query string)", query=True, response=AskResponse,
           errors=ASK_ERRORS + ("parameter_repeated",),
           description="The same as POST /api/ask, with the question in `q`; `source` may repeat.")
def ask_get():
    state = get_state()
    return jsonify(state.ask(parse_query(state.ask_model, request.args)))


def _described(searcher, info: ArticleInfo) -> dict:
    """An article's id, file, title and provenance. Without a headline, ``title`` is its lead sentence shortened
    (``Searcher.display_title``, as the pages show it) and ``title_from`` says "lead"; the stored headline stays
    null, so its passages are embedded with the lead as before."""
    title_from = info.title_from if info.title else "lead"
    return {"id": info.id, "source": info.source, "title": searcher.display_title(info), "title_from": title_from,
            "date": info.date, "source_url": info.source_url, "outlet": info.outlet, "author": info.author,
            "story": info.story}


def _summary(searcher, info: ArticleInfo) -> dict:
    """An article as lists show it: ``_described`` with its passage count and page."""
    return {**_described(searcher, info), "passage_count": searcher.passage_count_for(info.id),
            "url": article_url(info.id)}


@bp.get("/api/articles")
@operation(summary="List the indexed articles", response=ArticleList)
def articles():
    searcher = get_state().searcher
    items = [_summary(searcher, a) for a in searcher.catalog()]
    return jsonify({"ok": True, "count": len(items), "articles": items})


@bp.get("/api/articles/<article_id>")
@operation(summary="One article with its full cleaned text", response=ArticleDetail,
           errors=("article_not_found",),
           description="`text` is the text every citation's `start`/`end` offsets slice into.")
def article(article_id: str):
    searcher = get_state().searcher
    found = searcher.article(article_id)  # a dict lookup: ids never reach the filesystem
    return jsonify({"ok": True, **_summary(searcher, info_of(found)), "text": found.text})


WRITE_ERRORS = ("unauthorized", "writes_disabled", "write_busy", "writes_unavailable", "seeds_out_of_sync",
                "index_not_built")


def _written(searcher, result) -> dict:
    url = article_url(result.article_id) if result.action != "deleted" else None
    stored = {**_described(searcher, info_of(result.article)), "url": url} if result.article is not None else None
    return {"ok": True, "id": result.article_id, "action": result.action, "build_id": result.build_id,
            "articles": result.articles, "embedded_articles": result.embedded_articles, "url": url,
            "article": stored}


@bp.post("/api/articles")
@operation(summary="Add an article, or replace the one with this id", body=ArticleUpload, response=ArticleWritten,
           created=True, security=True,
           errors=("article_id_invalid", "article_text_invalid", "article_field_invalid", "date_malformed",
                   "url_invalid", "article_not_writable", "duplicate_key", "unknown_field", "wrong_type",
                   "invalid_request", *WRITE_ERRORS),
           description="Needs the API key. Stores the text as `<id>.txt` in the articles folder, or, when any of "
                       "`title`, `date`, `url` (`source_url`), `outlet` or `author` is given, as `<id>.md` with "
                       "them as YAML front matter, so re-indexing the folder gives the same article; either file "
                       "replaces the other. Indexes it (only this article is embedded); the file and the index "
                       "change together or not at all. Returns the stored article with its metadata. 201 when "
                       "the article is new, 200 when it replaced (or equalled) the old one. Bodies may be up to "
                       "2 MB.")
def add_article():
    state = get_state()
    require_key(state.settings, write=True)  # before reading the body: no key, no upload
    request.max_content_length = state.settings.max_upload_bytes
    _require_json("article")
    upload = parse_json_body(ArticleUpload, _body())
    try:
        data = upload.text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest("The article text is not valid Unicode.", code="article_text_invalid") from None
    result = state.put_article(upload.id, data, upload.metadata())
    return jsonify(_written(state.searcher, result)), 201 if result.action == "created" else 200


@bp.delete("/api/articles/<article_id>")
@operation(summary="Remove an article", response=ArticleWritten, security=True,
           errors=("article_id_invalid", "article_not_found", "last_article", *WRITE_ERRORS),
           description="Needs the API key. Removes `<id>.txt` (or `<id>.md`) from the articles folder and the "
                       "article from the index, together or not at all.")
def remove_article(article_id: str):
    state = get_state()
    require_key(state.settings, write=True)
    return jsonify(_written(state.searcher, state.delete_article(article_id)))


@bp.get("/healthz")
@operation(summary="Health: is the index loaded, and what does it hold", response=Health)
def healthz():
    searcher = get_state().searcher
    manifest = getattr(searcher, "manifest", None) or {}
    return jsonify({"ok": True, "status": "ok", "index_loaded": True, "articles": searcher.article_count,
                    "passages": searcher.passage_count, "model": searcher.model_name,
                    "build_id": manifest.get("build_id")})


@bp.get("/openapi.json")
@operation(summary="This OpenAPI document")
def openapi():
    doc = current_app.extensions.get("qa_service_openapi")
    if doc is None:
        doc = current_app.extensions["qa_service_openapi"] = build_openapi(current_app)
    return jsonify(doc)
