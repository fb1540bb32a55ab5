"""Request and response schemas of the JSON API (pydantic v2), and turning requests into them.

The same models validate requests and generate the OpenAPI document (``openapi.py``), so the
documented limits are the enforced ones. Requests are validated strictly (JSON ``"5"`` is not an int),
unknown fields are refused, and every pydantic error is translated to one stable error code.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from functools import lru_cache
from typing import Any, Literal, Mapping
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..articles import ARTICLE_ID_PATTERN
from ..errors import InvalidRequest
from ..types import MODES, Filters, is_blank

MAX_SOURCES = 100
MAX_ARTICLE_CHARS = 1_000_000
MAX_FIELD_CHARS = 500  # an uploaded title, outlet or author
MAX_URL_CHARS = 2000
DATE_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"


def _check_date(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        dt.date.fromisoformat(value)
    except ValueError:
        raise PydanticCustomError("date_malformed", "The date {value} is not a real calendar date (YYYY-MM-DD).",
                                  {"value": repr(value[:40])}) from None
    return value


class AskFilters(BaseModel):
    """Restrictions applied before ranking; all optional."""

    model_config = ConfigDict(extra="forbid")

    sources: list[str] | None = Field(
        None, max_length=MAX_SOURCES,
        description="Article ids or source file names (see GET /api/articles); only these are searched.")
    date_from: str | None = Field(None, pattern=DATE_PATTERN, json_schema_extra={"format": "date"},
                                  description="Earliest article date, inclusive (YYYY-MM-DD). "
                                              "Undated articles are excluded.")
    date_to: str | None = Field(None, pattern=DATE_PATTERN, json_schema_extra={"format": "date"},
                                description="Latest article date, inclusive (YYYY-MM-DD).")

    _dates = field_validator("date_from", "date_to")(_check_date)

    @model_validator(mode="after")
    def _ordered(self) -> "AskFilters":
        if self.date_from and self.date_to and self.date_from > self.date_to:
            raise PydanticCustomError("date_range_inverted",
                                      "The filter date_from ({date_from}) is after date_to ({date_to}).",
                                      {"date_from": self.date_from, "date_to": self.date_to})
        return self

    def to_filters(self) -> Filters | None:
        filters = Filters(tuple(self.sources) if self.sources else None, self.date_from, self.date_to)
        return None if filters.is_empty() else filters


class AskRequestBase(BaseModel):
    """A question for the index."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("question", check_fields=False)
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if is_blank(value):
            raise PydanticCustomError("question_empty", "The question is empty; type a question.")
        return value.strip()


@lru_cache(maxsize=8)
def ask_request_model(max_question_chars: int = 1000, max_k: int = 50) -> type[AskRequestBase]:
    """Return the ``AskRequest`` model for these limits (they come from ``Settings``)."""

    class AskRequest(AskRequestBase):
        question: str = Field(min_length=1, max_length=max_question_chars,
                              description=f"The question, 1 to {max_question_chars} characters.")
        k: int = Field(5, ge=1, le=max_k, description="How many passages to return.")
        filters: AskFilters | None = Field(None, description="Optional restrictions applied before ranking.")
        mode: Literal[MODES] | None = Field(
            None, description="Retrieval mode, when the index supports several; ignored otherwise.")

    return AskRequest


AskRequest = ask_request_model()


class ArticleUpload(BaseModel):
    """One article to add, or to replace when the id exists (POST /api/articles)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=100, pattern=ARTICLE_ID_PATTERN,
                    description="The article id; the file is stored as `<id>.txt` in the articles folder. "
                                "1 to 100 ASCII letters, digits, `-` or `_`, starting with a letter or digit.")
    text: str = Field(min_length=1, max_length=MAX_ARTICLE_CHARS,
                      description="The article's text. Without metadata, the file's text as in the articles folder "
                                  "(an optional `date YYYY-MM-DD` prefix or dateline and headline, then the body), "
                                  "stored as `<id>.txt`; with any metadata field, the body itself, stored as "
                                  "`<id>.md` under YAML front matter. No NUL characters.")
    title: str | None = Field(None, min_length=1, max_length=MAX_FIELD_CHARS, description="The headline.")
    date: str | None = Field(None, pattern=DATE_PATTERN, json_schema_extra={"format": "date"},
                             description="The publication date, a real calendar date written YYYY-MM-DD.")
    url: str | None = Field(None, max_length=MAX_URL_CHARS, json_schema_extra={"format": "uri"},
                            description="The original page (http or https); `source_url` is another name for it.")
    source_url: str | None = Field(None, max_length=MAX_URL_CHARS, json_schema_extra={"format": "uri"},
                                   description="The same as `url`; give one of the two.")
    outlet: str | None = Field(None, min_length=1, max_length=MAX_FIELD_CHARS, description="Who published it.")
    author: str | None = Field(None, min_length=1, max_length=MAX_FIELD_CHARS, description="Who wrote it.")

    _date = field_validator("date")(_check_date)

    @field_validator("url", "source_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc or any(c.isspace() for c in value):
            raise PydanticCustomError("url_invalid", "The url {value} is not an http(s) address.",
                                      {"value": repr(value[:80])})
        return value

    @field_validator("title", "outlet", "author")
    @classmethod
    def _one_line(cls, value: str | None, info) -> str | None:
        if value is not None and (is_blank(value) or any(ord(c) < 32 or c == "\x7f" for c in value)):
            raise PydanticCustomError("article_field_invalid", "The {field} must be one line of visible text.",
                                      {"field": info.field_name})
        return value

    @model_validator(mode="after")
    def _one_url(self) -> "ArticleUpload":
        if self.url and self.source_url and self.url != self.source_url:
            raise PydanticCustomError("url_invalid",
                                      "The url and source_url fields name different pages; give one of them.")
        return self

    def metadata(self) -> dict:
        """The metadata fields given (url under its one name), as ``articles.put_article`` takes them."""
        fields = {"title": self.title, "date": self.date, "url": self.url or self.source_url,
                  "outlet": self.outlet, "author": self.author}
        return {k: v for k, v in fields.items() if v is not None}


# --------------------------------------------------------------------------- responses (documentation)

class Citation(BaseModel):
    article_id: str
    source: str = Field(description="The file the article came from.")
    title: str | None
    date: str | None = Field(description="YYYY-MM-DD, or null when the article is undated.")
    start: int = Field(description="Character offset of the passage in the article's text.")
    end: int = Field(description="End offset (exclusive): text[start:end] is the passage.")
    url: str = Field(description="The article page, with the passage highlighted and scrolled to.")
    source_url: str | None = Field(None, description="The original page the article came from (its canonical "
                                                     "URL, link or `url` field), or null when unknown.")
    outlet: str | None = Field(None, description="The outlet that published it, or null when unknown.")


class Result(BaseModel):
    """One passage. Extra keys added by the searcher (e.g. ``answer``, ``also_reported_by``) pass through."""

    model_config = ConfigDict(extra="allow")

    rank: int
    score: float = Field(description="Similarity of question and passage; higher is better.")
    text: str = Field(description="The passage, exactly as it appears in the article's text.")
    citation: Citation


class AskResponse(BaseModel):
    """The searcher's result structure, plus ``ok`` and ``took_ms``; extra top-level keys pass through."""

    model_config = ConfigDict(extra="allow")

    ok: Literal[True]
    question: str
    answerable: bool | None = Field(None, description="Whether the articles seem to answer the question; the "
                                                      "closest passages are listed either way.")
    answer_confidence: float | None = Field(None, description="0-1; capped when the answer's type (a time, a "
                                                              "number, a name) is missing or the question names "
                                                              "something no article mentions.")
    names_not_in_articles: list[str] = Field(default_factory=list,
                                             description="Names in the question that no article mentions "
                                                         "(each makes `answerable` false).")
    results: list[Result]
    took_ms: float


class ArticleSummary(BaseModel):
    id: str
    source: str = Field(description="The file the article came from (with its record, in a file of many).")
    title: str | None = Field(description="The headline; for an article without one, its lead sentence shortened "
                                          "(then `title_from` is `lead`).")
    title_from: Literal["headline", "metadata", "lead"] | None = Field(
        None, description="Where the title comes from: a headline in the text, the file's or record's metadata, "
                          "or the lead sentence (no headline).")
    date: str | None = Field(description="YYYY-MM-DD, or null when the article is undated.")
    source_url: str | None = Field(None, description="The original page, or null when unknown.")
    outlet: str | None = Field(None, description="The outlet that published it, or null when unknown.")
    author: str | None = Field(None, description="The author, or null when unknown.")
    story: str | None = Field(None, description="Shared by syndicated copies of one story (the same wire story "
                                                "carried by several outlets); an article alone has its own.")
    passage_count: int
    url: str = Field(description="The article's page.")


class ArticleList(BaseModel):
    ok: Literal[True]
    count: int
    articles: list[ArticleSummary]


class ArticleDetail(ArticleSummary):
    ok: Literal[True]
    text: str = Field(description="The full cleaned text; every citation's start/end slice into it.")


class Health(BaseModel):
    ok: Literal[True]
    status: Literal["ok"]
    index_loaded: bool
    articles: int
    passages: int
    model: str
    build_id: str | None


class ArticleStored(BaseModel):
    """The article a write stored, as lists show it (``ArticleSummary`` without the passage count)."""

    id: str
    source: str = Field(description="The file it is stored as: `<id>.txt`, or `<id>.md` when metadata was given.")
    title: str | None
    title_from: Literal["headline", "metadata", "lead"] | None
    date: str | None
    source_url: str | None
    outlet: str | None
    author: str | None
    story: str | None
    url: str


class ArticleWritten(BaseModel):
    """What a write did; ``build_id`` is the index build that now holds the change."""

    ok: Literal[True]
    id: str
    action: Literal["created", "replaced", "unchanged", "deleted"]
    build_id: str | None
    articles: int = Field(description="Articles in the index after the write.")
    embedded_articles: int = Field(description="Articles whose text was embedded for this write (0 or 1): "
                                               "unchanged articles keep their vectors.")
    url: str | None = Field(description="The article's page (null after a removal).")
    article: ArticleStored | None = Field(None, description="The article as stored and indexed, with its "
                                                            "metadata (null after a removal).")


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable snake_case code; see the error codes in this document.")
    message: str = Field(description="A sentence for a person.")


class ErrorResponse(BaseModel):
    ok: Literal[False]
    error: ErrorDetail


# --------------------------------------------------------------------------- parsing requests

# GET /api/ask and the form take query parameters; each maps onto a field of AskRequest.
QUERY_PARAMS: dict[str, tuple[str, ...]] = {
    "q": ("question",),
    "k": ("k",),
    "source": ("filters", "sources"),
    "date_from": ("filters", "date_from"),
    "date_to": ("filters", "date_to"),
    "mode": ("mode",),
}
_PARAM_NAMES = {path: name for name, path in QUERY_PARAMS.items()}


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def check_json(body: bytes) -> None:
    """Refuse a body that is not JSON, or whose objects repeat a key (parsers disagree on which one wins)."""
    try:
        json.loads(body, object_pairs_hook=_refuse_duplicates)
    except _DuplicateKey as exc:
        raise InvalidRequest(f"The key {exc.key[:40]!r} appears twice in one JSON object; send it once.",
                             code="duplicate_key") from None
    except (ValueError, RecursionError):  # ValueError covers bad UTF-8; RecursionError very deep nesting
        raise InvalidRequest("The request body is not valid JSON.", code="invalid_json") from None


def parse_json_body(model: type[BaseModel], body: bytes) -> BaseModel:
    """Validate a JSON request body against ``model``; raise ``InvalidRequest`` with a stable code."""
    check_json(body)
    try:
        return model.model_validate_json(body, strict=True)
    except ValidationError as exc:
        raise translate(exc, model) from None


def parse_query(model: type[BaseModel], args: Mapping[str, Any], refuse_unknown: bool = True) -> BaseModel:
    """Validate query parameters (``QUERY_PARAMS``) against ``model``; empty optional values count as absent."""
    if refuse_unknown:
        unknown = sorted(set(args) - set(QUERY_PARAMS))
        if unknown:
            raise InvalidRequest(f"Unknown parameter {unknown[0][:40]!r}; this endpoint takes "
                                 f"{', '.join(QUERY_PARAMS)}.", code="unknown_field")
    data: dict[str, Any] = {}
    for name, path in QUERY_PARAMS.items():
        if path == ("filters", "sources"):  # may repeat: ?source=a&source=b
            values = args.getlist(name) if hasattr(args, "getlist") else [args.get(name)]
            value: Any = [v for v in values if v] or None
        else:
            if hasattr(args, "getlist") and len(args.getlist(name)) > 1:  # ?k=3&k=4: which one was meant?
                raise InvalidRequest(f"The parameter {name!r} is given more than once; give it once.",
                                     code="parameter_repeated")
            value = args.get(name)
            if value == "" and name != "q":
                value = None
        if value is None:
            continue
        target = data
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = value
    try:
        return model.model_validate(data)  # lax: "5" from a query string is the int 5
    except ValidationError as exc:
        raise translate(exc, model, names=_PARAM_NAMES) from None


def _field_name(loc: tuple, names: dict | None) -> str:
    if names and tuple(loc) in names:
        return names[tuple(loc)]
    return ".".join(str(part) for part in loc) or "body"


def translate(exc: ValidationError, model: type[BaseModel], names: dict | None = None) -> InvalidRequest:
    """Turn the first pydantic error into an ``InvalidRequest`` with a stable code and a plain sentence."""
    err = exc.errors(include_url=False, include_input=False)[0]
    kind, loc = err["type"], tuple(err["loc"])
    field = _field_name(loc, names)
    last = loc[-1] if loc else None
    if kind in ("question_empty", "date_malformed", "date_range_inverted", "url_invalid", "article_field_invalid"):
        return InvalidRequest(err["msg"], code=kind)
    if kind == "json_invalid":
        return InvalidRequest("The request body is not valid JSON.", code="invalid_json")
    if kind in ("model_type", "model_attributes_type", "dict_type") and not loc:
        return InvalidRequest("The request body must be a JSON object.", code="body_not_object")
    if kind == "extra_forbidden":
        return InvalidRequest(f"Unknown field {field[:60]!r}; see /openapi.json for the fields this endpoint takes.",
                              code="unknown_field")
    if loc == ("id",) and kind in ("string_pattern_mismatch", "string_too_short", "string_too_long"):
        return InvalidRequest("The article id is not allowed: use 1 to 100 ASCII letters, digits, '-' or '_', "
                              "starting with a letter or digit.", code="article_id_invalid")
    if loc and loc[0] in ("title", "outlet", "author") and kind in ("string_too_short", "string_too_long"):
        return InvalidRequest(f"The {loc[0]} must be 1 to {MAX_FIELD_CHARS} characters.", code="article_field_invalid")
    if loc and loc[0] in ("url", "source_url") and kind == "string_too_long":
        return InvalidRequest(f"The {loc[0]} must be at most {MAX_URL_CHARS} characters.", code="url_invalid")
    if loc == ("text",) and kind in ("string_too_short", "string_too_long"):
        return InvalidRequest(f"The article text must be 1 to {MAX_ARTICLE_CHARS:,} characters.",
                              code="article_text_invalid")
    if kind == "missing" and loc == ("question",):
        return InvalidRequest(f"The {field!r} field is required: send the question to ask.", code="question_missing")
    if last == "question" and kind == "string_too_short":
        return InvalidRequest("The question is empty; type a question.", code="question_empty")
    if last == "question" and kind == "string_too_long":
        limit = (err.get("ctx") or {}).get("max_length")
        return InvalidRequest(f"The question is too long: at most {limit} characters.", code="question_too_long")
    if last == "k" and kind in ("greater_than_equal", "less_than_equal"):
        props = model.model_json_schema()["properties"]["k"]
        return InvalidRequest(f"The number of passages ({field}) must be between {props['minimum']} and "
                              f"{props['maximum']}.", code="k_out_of_range")
    if last in ("date_from", "date_to", "date") and kind == "string_pattern_mismatch":
        return InvalidRequest(f"The date {field} must be written YYYY-MM-DD.", code="date_malformed")
    if last == "sources" and kind == "too_long":
        return InvalidRequest(f"At most {MAX_SOURCES} sources can be given.", code="too_many_sources")
    if last == "mode" and kind == "literal_error":
        return InvalidRequest(f"The search mode ({field}) must be one of {', '.join(MODES)}.", code="mode_unknown")
    if kind.endswith("_type") or kind.endswith("_parsing") or kind == "int_from_float":
        expected = re.sub(r"^Input should be ", "", err["msg"])
        return InvalidRequest(f"The field {field!r} has the wrong type: it should be {expected}.", code="wrong_type")
    return InvalidRequest(f"The field {field!r} is not valid: {err['msg']}.", code="invalid_request")
