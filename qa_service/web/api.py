"""The JSON API blueprint: /api/ask, /api/articles, /healthz and /openapi.json."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from ..errors import InvalidRequest
from . import article_url, get_state
from .openapi import build_openapi, operation
from .schemas import ArticleDetail, ArticleList, AskResponse, Health, parse_json_body, parse_query

bp = Blueprint("api", __name__)

ASK_ERRORS = ("question_missing", "question_empty", "question_too_long", "wrong_type", "unknown_field",
              "k_out_of_range", "date_malformed", "date_range_inverted", "too_many_sources",
              "unknown_source", "mode_unknown")


def _ask_model(app):
    return app.extensions["qa_service"].ask_model


@bp.post("/api/ask")
@operation(summary="Ask a question", body=_ask_model, response=AskResponse, errors=ASK_ERRORS,
           description="Return the passages that best answer the question, best first, each with an exact "
                       "citation: `text == article.text[start:end]` for the article at `/api/articles/{id}`. "
                       "Filters are applied before ranking.")
def ask_post():
    state = get_state()
    if not request.is_json:
        raise InvalidRequest("Send the question as a JSON object with Content-Type: application/json.",
                             code="unsupported_media_type", status=415)
    req = parse_json_body(state.ask_model, request.get_data(cache=False))
    return jsonify(state.ask(req))


@bp.get("/api/ask")
@operation(summary="Ask a question (query string)", query=True, response=AskResponse, errors=ASK_ERRORS,
           description="The same as POST /api/ask, with the question in `q`; `source` may repeat.")
def ask_get():
    state = get_state()
    return jsonify(state.ask(parse_query(state.ask_model, request.args)))


def _summary(searcher, article) -> dict:
    return {"id": article.id, "source": article.source, "title": article.title, "date": article.date,
            "passage_count": searcher.passage_count_for(article.id), "url": article_url(article.id)}


@bp.get("/api/articles")
@operation(summary="List the indexed articles", response=ArticleList)
def articles():
    searcher = get_state().searcher
    items = [_summary(searcher, a) for a in searcher.articles()]
    return jsonify({"ok": True, "count": len(items), "articles": items})


@bp.get("/api/articles/<article_id>")
@operation(summary="One article with its full cleaned text", response=ArticleDetail,
           errors=("article_not_found",),
           description="`text` is the text every citation's `start`/`end` offsets slice into.")
def article(article_id: str):
    searcher = get_state().searcher
    found = searcher.article(article_id)  # a dict lookup: ids never reach the filesystem
    return jsonify({"ok": True, **_summary(searcher, found), "text": found.text})


@bp.get("/healthz")
@operation(summary="Health: is the index loaded, and what does it hold", response=Health)
def healthz():
    searcher = get_state().searcher
    manifest = getattr(searcher, "manifest", None) or {}
    return jsonify({"ok": True, "status": "ok", "index_loaded": True, "articles": len(searcher.articles()),
                    "passages": searcher.passage_count, "model": searcher.model_name,
                    "build_id": manifest.get("build_id")})


@bp.get("/openapi.json")
@operation(summary="This OpenAPI document")
def openapi():
    doc = current_app.extensions.get("qa_service_openapi")
    if doc is None:
        doc = current_app.extensions["qa_service_openapi"] = build_openapi(current_app)
    return jsonify(doc)
