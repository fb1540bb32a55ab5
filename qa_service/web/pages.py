"""The HTML blueprint: the question form at ``/`` and article pages with the cited passage highlighted.

Everything works without JavaScript: the form is a GET to ``/?q=...``, and a citation link
``/articles/<id>?start=S&end=E#p-S-E`` tells the server which span to wrap in ``<mark id="p-S-E">``
(a URL fragment never reaches the server) while the fragment makes the browser scroll to it and
CSS ``:target`` emphasise it.
"""

from __future__ import annotations

import datetime as dt

from flask import Blueprint, render_template, request

from ..errors import QAError
from ..ingest import UNTITLED
from ..types import MODES
from .openapi import operation
from .schemas import parse_query
from .state import get_state
from .urls import article_url, passage_anchor

bp = Blueprint("pages", __name__)

K_CHOICES = (3, 5, 10, 20)
FORM_ERRORS = ("question_empty", "question_too_long", "wrong_type", "k_out_of_range", "date_malformed",
               "date_range_inverted", "unknown_source", "mode_unknown", "too_many_sources", "parameter_repeated")


@bp.app_template_filter("nice_date")
def nice_date(value: str | None) -> str:
    """Render ``2025-01-31`` as ``31 Jan 2025``; keep anything else as it is."""
    if not value:
        return "undated"
    try:
        day = dt.date.fromisoformat(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{day.day} {day:%b %Y}"


def answer_span(hit: dict) -> tuple[int, int] | None:
    """Return the answer sentence's span inside the passage text, if the hit carries a usable ``answer``.

    ``answer`` is ``{"text", "start", "end"}``; offsets may be article-relative (like the citation) or
    passage-relative, so both are tried and checked against ``answer.text`` when it is given.
    """
    answer = hit.get("answer")
    if not isinstance(answer, dict):
        return None
    text = hit.get("text") or ""
    want = answer.get("text") if isinstance(answer.get("text"), str) else None
    start, end = answer.get("start"), answer.get("end")
    if isinstance(start, int) and isinstance(end, int):
        for offset in (hit["citation"]["start"], 0):
            a, b = start - offset, end - offset
            if 0 <= a < b <= len(text) and (want is None or text[a:b] == want):
                return a, b
    if want and want.strip():
        found = text.find(want)
        if found >= 0:
            return found, found + len(want)
    return None


def passage_parts(hit: dict) -> list[tuple[str, bool]]:
    """Split the passage into ``(text, is_answer)`` runs for the template."""
    text = hit.get("text") or ""
    span = answer_span(hit)
    if span is None:
        return [(text, False)]
    a, b = span
    return [(text[:a], False), (text[a:b], True), (text[b:], False)]


# Up to this many articles the form offers them in a menu; above, the source is typed (an id or a file name, as the
# API takes it): a menu of every article of a large archive would be megabytes of HTML on every page.
SOURCE_MENU_LIMIT = 200
ARTICLES_PER_PAGE = 100  # the article list's page size


def _label(searcher, article) -> str:
    """The title a page shows for an article (an ``Article``, ``ArticleInfo`` or id): its headline, else its lead
    sentence shortened (``Searcher.display_title``), never its file name."""
    try:
        return searcher.display_title(article)
    except QAError:  # a citation of an article deleted since it was found
        return UNTITLED


def _cited_label(searcher, cited: dict) -> str:
    """The title for a citation or an ``also_reported_by`` entry: the one it carries, else the article's."""
    title = cited.get("title")
    if isinstance(title, str) and title.strip():
        return title
    return _label(searcher, cited["article_id"]) if isinstance(cited.get("article_id"), str) else UNTITLED


def _other(searcher, entry) -> dict:
    """An ``also_reported_by`` entry for the template: its title and a link to its own passage, highlighted."""
    if not isinstance(entry, dict):
        return {"label": str(entry)}
    out = {**entry, "label": _cited_label(searcher, entry), "href": None}
    if isinstance(entry.get("article_id"), str):
        start, end = entry.get("start"), entry.get("end")
        spanned = isinstance(start, int) and isinstance(end, int)
        out["href"] = article_url(entry["article_id"], start if spanned else None, end if spanned else None)
    return out


@bp.get("/")
@operation(summary="The question form; with ?q=, the answers", tag="pages", html=True, query=True,
           errors=FORM_ERRORS)
def index():
    state = get_state()
    searcher = state.searcher
    args = request.args
    form = {name: args.get(name, "") for name in ("q", "k", "source", "date_from", "date_to", "mode")}
    result = error = None
    status = 200
    if "q" in args:
        try:
            result = state.ask(parse_query(state.ask_model, args, refuse_unknown=False))
        except QAError as exc:
            if exc.status >= 500:
                raise
            error, status = exc, exc.status
    hits = []
    for hit in (result or {}).get("results", []):
        c = hit["citation"]
        others = [_other(searcher, o) for o in hit.get("also_reported_by") or []]
        hits.append({**hit, "label": _cited_label(searcher, c), "lead": not c.get("title"), "parts": passage_parts(hit),
                     "others": others})
    k_choices = set(K_CHOICES)
    if form["k"].isdigit() and 1 <= int(form["k"]) <= state.settings.max_k:
        k_choices.add(int(form["k"]))
    articles = None  # None: a text field instead of a menu
    if searcher.article_count <= SOURCE_MENU_LIMIT:  # (catalog() would build every article's entry)
        articles = [{"id": a.id, "label": _label(searcher, a), "date": a.date} for a in searcher.catalog()]
    html = render_template(
        "index.html", form=form, result=result, hits=hits, error=error, articles=articles,
        k_choices=sorted(k_choices), default_k=5, max_chars=state.settings.max_question_chars,
        modes=MODES if state.supports_mode else (),
        filters_open=any(form[n] for n in ("k", "source", "date_from", "date_to", "mode")),
        passage_total=searcher.passage_count, article_total=searcher.article_count,
    )
    return html, status


@bp.get("/articles")
@operation(summary="The indexed articles", tag="pages", html=True)
def articles():
    """Newest first, ``ARTICLES_PER_PAGE`` to a page (``?page=N``; a page past the end shows the last one)."""
    searcher = get_state().searcher
    catalog = sorted(searcher.catalog(), key=lambda a: (a.date or "", a.id), reverse=True)
    pages = max(1, -(-len(catalog) // ARTICLES_PER_PAGE))
    raw = request.args.get("page", "1")
    page = min(int(raw), pages) if raw.isdigit() and int(raw) >= 1 else 1
    first = (page - 1) * ARTICLES_PER_PAGE
    items = [{"id": a.id, "label": _label(searcher, a), "lead": not a.title, "source": a.source, "outlet": a.outlet,
              "date": a.date, "passages": searcher.passage_count_for(a.id)}
             for a in catalog[first:first + ARTICLES_PER_PAGE]]
    return render_template("articles.html", articles=items, total=len(catalog), page=page, pages=pages,
                           first=first + 1, last=first + len(items))


def _span(text_length: int) -> tuple[int, int] | None:
    try:
        start, end = int(request.args["start"]), int(request.args["end"])
    except (KeyError, ValueError):
        return None
    return (start, end) if 0 <= start < end <= text_length else None


@bp.get("/articles/<article_id>")
@operation(summary="One article; ?start=&end= highlights a cited passage (#p-START-END)", tag="pages",
           html=True, errors=("article_not_found",))
def article(article_id: str):
    searcher = get_state().searcher
    found = searcher.article(article_id)  # a dict lookup: ids never reach the filesystem
    span = _span(len(found.text))
    if span:
        s, e = span
        parts = {"before": found.text[:s], "cited": found.text[s:e], "after": found.text[e:],
                 "anchor": passage_anchor(s, e), "start": s, "end": e}
    else:
        parts = None
    return render_template("article.html", article=found, label=_label(searcher, found), lead=not found.title,
                           parts=parts, passages=searcher.passage_count_for(found.id))
