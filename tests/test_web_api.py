"""The JSON API: answers, citations that slice the article text, pass-through of extra keys, the error shape,
and the OpenAPI document generated from the validating models."""

from __future__ import annotations

import json
import logging
import re

import pytest

from qa_service.errors import IndexCorrupt, Overloaded
from qa_service.ingest import lead_title
from qa_service.tuning import parse_tuning
from qa_service.tuning.fast_path import AskFastPath
from qa_service.web import create_app
from qa_service.web.errors import ERROR_CODES

from .support.errors import WALKED_IN_WRITE_TESTS, assert_error_shape
from .support.web_apps import FailingSearcher, ModeSearcher, NoModeSearcher

QUESTION = "What did Pezeshkian say about rebuilding Gaza?"
FAST = parse_tuning("fast_path")  # QA_TUNING=fast_path: the opt-in tuning of the fast-path tests


@pytest.fixture(scope="module", params=["faiss", "postgres"])
def fake_index(request):
    """The whole API suite runs twice: on the FAISS folder and on PostgreSQL (same seeds, same fake model)."""
    return request.getfixturevalue("fake_faiss_index" if request.param == "faiss" else "fake_pg_index")


@pytest.fixture(scope="module")
def fake_searcher(fake_index, fake_embedder):
    from qa_service.retrieval import Searcher

    return Searcher(fake_index, embedder=fake_embedder)


@pytest.fixture(scope="module")
def app(fake_index, fake_searcher):
    return create_app(fake_index, searcher=NoModeSearcher(fake_searcher))


@pytest.fixture()
def client(app):
    return app.test_client()


@pytest.fixture(scope="module")
def mode_app(fake_index, fake_searcher):
    return create_app(fake_index, searcher=ModeSearcher(fake_searcher))


@pytest.fixture(scope="module")
def fast_app(fake_index, fake_searcher):
    return create_app(fake_index.with_(tuning=FAST), searcher=NoModeSearcher(fake_searcher))


@pytest.fixture(scope="module")
def fast_mode_app(fake_index, fake_searcher):
    return create_app(fake_index.with_(tuning=FAST), searcher=ModeSearcher(fake_searcher))


# --------------------------------------------------------------------------- answers

def test_ask_returns_cited_passages_that_slice_the_article_text(client):
    r = client.post("/api/ask", json={"question": QUESTION})
    assert r.status_code == 200 and r.mimetype == "application/json"
    body = r.get_json()
    assert body["ok"] is True and body["question"] == QUESTION
    assert isinstance(body["took_ms"], float)
    assert len(body["results"]) == 5
    for rank, hit in enumerate(body["results"], 1):
        assert hit["rank"] == rank
        c = hit["citation"]
        assert set(c) >= {"article_id", "source", "title", "date", "start", "end", "url", "source_url", "outlet"}
        assert c["url"] == f"/articles/{c['article_id']}?start={c['start']}&end={c['end']}#p-{c['start']}-{c['end']}"
        article = client.get(f"/api/articles/{c['article_id']}").get_json()
        assert article["text"][c["start"]:c["end"]] == hit["text"]
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True)

def test_citation_urls_follow_the_mount_point_of_each_request(client):
    """Article paths are remembered per script root: a service mounted under a prefix links under it."""
    plain = client.post("/api/ask", json={"question": QUESTION}).get_json()["results"][0]["citation"]
    mounted = client.post("/api/ask", json={"question": QUESTION},
                          base_url="http://localhost/qa").get_json()["results"][0]["citation"]
    again = client.post("/api/ask", json={"question": QUESTION}).get_json()["results"][0]["citation"]
    assert plain["url"].startswith(f"/articles/{plain['article_id']}?")
    assert mounted["url"] == "/qa" + plain["url"]
    assert again["url"] == plain["url"]



@pytest.mark.parametrize("question", ["What happened in January 0000?", "Where were they on Feb 30 2024?",
                                      "What was agreed on 32 March 2025?", "month 13 of 2024"])
def test_questions_naming_impossible_dates_are_answered(client, question):
    assert client.post("/api/ask", json={"question": question}).status_code == 200
    assert client.get("/api/ask", query_string={"q": question}).status_code == 200
    assert client.get("/", query_string={"q": question}).status_code == 200


def test_get_answers_the_same_as_post(client):
    posted = client.post("/api/ask", json={"question": QUESTION, "k": 3}).get_json()
    got = client.get("/api/ask", query_string={"q": QUESTION, "k": "3"}).get_json()
    assert [h["citation"] for h in got["results"]] == [h["citation"] for h in posted["results"]]
    assert got["question"] == posted["question"]


def test_question_is_trimmed_and_k_respected(client):
    body = client.post("/api/ask", json={"question": "  Gaza ceasefire \n", "k": 2}).get_json()
    assert body["question"] == "Gaza ceasefire" and len(body["results"]) == 2


def test_filters_apply_before_ranking(client, fake_searcher):
    article_id = fake_searcher.articles()[2].id
    body = client.post("/api/ask", json={"question": QUESTION, "k": 10,
                                         "filters": {"sources": [article_id]}}).get_json()
    assert body["results"] and {h["citation"]["article_id"] for h in body["results"]} == {article_id}
    body = client.post("/api/ask", json={"question": QUESTION, "filters": {"date_from": "2025-02-01",
                                                                          "date_to": "2025-12-31"}}).get_json()
    assert body["results"] and all("2025-02-01" <= h["citation"]["date"] <= "2025-12-31" for h in body["results"])
    body = client.get("/api/ask", query_string={"q": QUESTION, "date_from": "1990-01-01",
                                                "date_to": "1990-12-31"}).get_json()
    assert body["ok"] is True and body["results"] == []
    body = client.get("/api/ask", query_string=[("q", QUESTION), ("k", "20"), ("source", article_id),
                                                ("source", fake_searcher.articles()[0].source)]).get_json()
    assert {h["citation"]["article_id"] for h in body["results"]} <= {article_id, fake_searcher.articles()[0].id}


def test_extra_keys_from_the_searcher_pass_through_and_mode_is_passed(mode_app):
    client = mode_app.test_client()
    searcher = mode_app.extensions["qa_service"].searcher
    body = client.post("/api/ask", json={"question": QUESTION, "mode": "lexical", "k": 2}).get_json()
    assert searcher.calls[-1]["mode"] == "lexical"
    assert body["mode"] == "lexical" and body["answerable"] is True
    for hit in body["results"]:
        assert hit["custom"] == {"nested": [1, 2, 3]}
        assert hit["answer"]["start"] == hit["citation"]["start"]
        assert hit["also_reported_by"][0]["title"] == "Another <b>outlet</b>"
    client.get("/api/ask", query_string={"q": QUESTION, "mode": "dense"})
    assert searcher.calls[-1]["mode"] == "dense"
    client.post("/api/ask", json={"question": QUESTION})
    assert searcher.calls[-1]["mode"] == "hybrid"  # absent: the searcher's own default


def test_mode_is_not_passed_to_a_searcher_without_modes(app, client):
    r = client.post("/api/ask", json={"question": QUESTION, "mode": "dense"})
    assert r.status_code == 200
    assert "mode" not in app.extensions["qa_service"].searcher.calls[-1]


# --------------------------------------------------------------------------- the fast_path tuning (tuning/fast_path.py)

def test_the_fast_path_is_off_unless_named(app, fast_app):
    """By default Flask answers every request itself; ``QA_TUNING=fast_path`` puts the middleware in front."""
    assert not isinstance(app.wsgi_app, AskFastPath) and app.wsgi_app.__func__ is type(app).wsgi_app
    assert isinstance(fast_app.wsgi_app, AskFastPath)


def _wsgi(app_callable, body: bytes | None = None, path: str = "/api/ask", method: str = "POST",
          content_type: str = "application/json", **builder):
    """Call a WSGI callable directly; return (status, headers, body with ``took_ms`` blanked)."""
    from werkzeug.test import EnvironBuilder, run_wsgi_app

    environ = EnvironBuilder(path=path, method=method, data=body, content_type=content_type, **builder).get_environ()
    iterable, status, headers = run_wsgi_app(app_callable, environ, buffered=True)
    data = b"".join(iterable)
    assert headers.get("Content-Length") == str(len(data))
    data = re.sub(rb'"took_ms":[0-9.e-]+', b'"took_ms":0', data)  # the one value that differs between two asks
    return status, [(k, str(len(data)) if k == "Content-Length" else v) for k, v in headers.to_wsgi_list()], data


def _counting_view(app, monkeypatch) -> list:
    """Count the requests Flask's own ``api.ask_post`` view answers."""
    calls = []
    view = app.view_functions["api.ask_post"]

    def counted(*args, **kwargs):
        calls.append(1)
        return view(*args, **kwargs)

    monkeypatch.setitem(app.view_functions, "api.ask_post", counted)
    return calls


@pytest.mark.parametrize("which", ["fast_app", "fast_mode_app"])
def test_the_fast_path_answers_exactly_as_flask_does(which, request, fake_searcher, monkeypatch):
    """Every body, answered or refused, gives the same status, headers (in order) and bytes through the fast path
    as through Flask alone; the answerable ones never reach Flask's view, the others all do."""
    app = request.getfixturevalue(which)
    fast = app.wsgi_app
    assert isinstance(fast, AskFastPath)
    calls = _counting_view(app, monkeypatch)
    article = fake_searcher.articles()[2]
    answered = [{"question": QUESTION}, {"question": QUESTION, "k": 1}, {"question": "  Gaza ceasefire \n", "k": 10},
                {"question": "Qu'a dit Pezeshkian à Téhéran ?", "k": 3}, {"question": QUESTION, "mode": "dense"},
                {"question": QUESTION, "filters": {"sources": [article.id]}, "k": 50},
                {"question": QUESTION, "filters": {"sources": [article.source], "date_from": "2020-01-01"}},
                {"question": QUESTION, "filters": {"date_from": "1990-01-01", "date_to": "1990-12-31"}},
                {"question": "\u00e9\u00e8 \u4e2d\u6587 \U0001f600?", "filters": None}]
    for body in answered:
        raw = json.dumps(body, ensure_ascii=False).encode()
        before = len(calls)
        for content_type in ("application/json", "Application/JSON; charset=utf-8"):
            got = _wsgi(fast, raw, content_type=content_type)
            assert len(calls) == before, body  # the fast path answered it
            want = _wsgi(fast.wsgi_app, raw, content_type=content_type)
            assert len(calls) == before + 1
            before += 1
            assert got == want, body
            assert got[0] == "200 OK" and json.loads(got[2])["ok"] is True
    refused = [b'{"question": ""}', b'{"question": "x", "k": 0}', b'{"question": "x", "top_k": 3}', b"{not json",
               b'{"question": "a", "question": "b"}', b"", b"[1, 2]", b'{"question": "\xff"}',
               b'{"question": "x", "filters": {"sources": ["no-such-article"]}}',  # refused inside the searcher
               json.dumps({"question": "x" * 70_000}).encode()]
    for raw in refused:
        got, want = _wsgi(fast, raw), _wsgi(fast.wsgi_app, raw)
        assert got == want and got[0].startswith(("400", "413")), raw


@pytest.mark.parametrize("exc", [RuntimeError("disk /srv/secret.db on fire"),
                                 IndexCorrupt("The index in /srv/index cannot be read."),
                                 Overloaded("Too many questions are waiting; try again in a moment.")],
                         ids=["unexpected", "index_corrupt", "overloaded"])
def test_the_fast_path_renders_errors_from_the_searcher_as_flask_does(exc, fake_index, fake_searcher, caplog):
    """An error raised while answering goes through the app's own handlers: the same status, headers and body."""
    fast = create_app(fake_index.with_(tuning=FAST), searcher=FailingSearcher(fake_searcher, exc)).wsgi_app
    raw = json.dumps({"question": QUESTION}).encode()
    with caplog.at_level(logging.ERROR):
        got, want = _wsgi(fast, raw), _wsgi(fast.wsgi_app, raw)
    assert got == want
    assert got[0].startswith(("500", "503")) and b"secret" not in got[2] and b"/srv" not in got[2]
    assert isinstance(exc, Overloaded) == (("Retry-After", "1") in got[1])


def test_the_fast_path_leaves_other_requests_to_flask(fast_app, monkeypatch):
    """Requests it does not take are Flask's: they answer as before, through the view (counted)."""
    import io

    app, client = fast_app, fast_app.test_client()
    calls = _counting_view(app, monkeypatch)
    raw = json.dumps({"question": QUESTION, "k": 2}).encode()
    for kwargs in ({"data": raw, "content_type": "application/vnd.api+json"},  # JSON to Flask, not "application/json"
                   {"data": raw, "content_type": "application/json", "base_url": "http://localhost/qa"},  # mounted
                   # a chunked body, as gunicorn hands it on: de-chunked, no Content-Length, input terminated
                   {"input_stream": io.BytesIO(raw), "content_type": "application/json",
                    "headers": {"Transfer-Encoding": "chunked"}, "environ_overrides": {"wsgi.input_terminated": True}}):
        r = client.post("/api/ask", **kwargs)
        assert r.status_code == 200 and len(r.get_json()["results"]) == 2, kwargs
    assert len(calls) == 3


def test_the_fast_path_steps_aside_when_the_app_changes(fake_index, fake_searcher, monkeypatch):
    """A hook added after ``create_app`` runs on every request: the fast path hands all of them to Flask."""
    fresh = create_app(fake_index.with_(tuning=FAST), searcher=NoModeSearcher(fake_searcher))
    calls = _counting_view(fresh, monkeypatch)
    client = fresh.test_client()
    assert client.post("/api/ask", json={"question": QUESTION}).status_code == 200 and not calls
    checks = []  # it runs the app's before_request work itself: the reload check
    monkeypatch.setattr(fresh.extensions["qa_service"], "maybe_reload", lambda: checks.append(1))
    assert client.post("/api/ask", json={"question": QUESTION}).status_code == 200 and not calls and checks == [1]
    seen = []
    fresh.before_request(lambda: seen.append(1))
    assert client.post("/api/ask", json={"question": QUESTION}).status_code == 200
    assert calls == [1] and seen == [1] and checks == [1, 1]


# --------------------------------------------------------------------------- articles and health

def test_articles_list_and_detail(client, fake_searcher):
    body = client.get("/api/articles").get_json()
    assert body["ok"] is True and body["count"] == len(fake_searcher.articles()) == len(body["articles"])
    total = 0
    for item in body["articles"]:
        assert set(item) == {"id", "source", "title", "title_from", "date", "source_url", "outlet", "author",
                             "story", "passage_count", "url"}
        assert item["url"] == f"/articles/{item['id']}"
        # no list shows a file name for a title: without a headline, the lead sentence shortened, said so
        assert item["title"] and item["title"] != item["source"]
        if item["title_from"] == "lead":
            assert fake_searcher.article(item["id"]).title is None
            assert item["title"] == lead_title(fake_searcher.article(item["id"]).text)
        assert item["story"]
        total += item["passage_count"]
        detail = client.get(f"/api/articles/{item['id']}").get_json()
        assert detail["text"] == fake_searcher.article(item["id"]).text
        assert {k: detail[k] for k in item} == item
    assert total == fake_searcher.passage_count


@pytest.mark.parametrize("path", ["/api/articles/nope", "/api/articles/..", "/api/articles/%2e%2e%2fseeds",
                                  "/api/articles/..%2F..%2Fetc%2Fpasswd", "/api/articles/000_13c1da738e689733.txt",
                                  "/api/articles/%00"])
def test_unknown_article_ids_are_404(client, path):
    r = client.get(path)
    assert r.status_code == 404
    assert r.get_json()["error"]["code"] in ("article_not_found", "not_found")
    assert "/tmp" not in r.get_data(as_text=True) and "seeds/" not in r.get_data(as_text=True)


def test_healthz(client, fake_searcher):
    body = client.get("/healthz").get_json()
    assert body == {"ok": True, "status": "ok", "index_loaded": True, "articles": len(fake_searcher.articles()),
                    "passages": fake_searcher.passage_count, "model": "fake-hash-64",
                    "build_id": fake_searcher.manifest["build_id"]}


def test_security_headers_on_json(client):
    r = client.get("/healthz")
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert "script-src 'self'" in r.headers["Content-Security-Policy"]
    assert r.headers["Referrer-Policy"] == "no-referrer"


def test_json_bodies_are_flasks_compact_json_with_the_same_values(app, client):
    """The orjson provider (web/jsonio.py): the app's key order, UTF-8, compact, and Flask's values."""
    from flask.json.provider import DefaultJSONProvider

    question = "Qu'a dit Pezeshkian à Téhéran ?"
    r = client.post("/api/ask", json={"question": question})
    raw = r.get_data()
    body = json.loads(raw)
    assert raw.endswith(b"\n") and b"\n" not in raw[:-1]
    assert list(body)[:2] == ["ok", "question"] and list(body) != sorted(body)  # the app's order, not sorted keys
    assert "Téhéran".encode() in raw and b"\\u00e9" not in raw  # written as UTF-8, not escaped
    assert not re.search(rb"\s", re.sub(rb'"(?:[^"\\]|\\.)*"', b"", raw[:-1]))  # compact: no space outside strings
    # An answer as the searcher returns it reads back the same, float for float and key for key, from Flask's
    # standard encoder and from this one.
    answer = {"ok": True, **app.extensions["qa_service"].searcher.ask(question, k=5)}
    standard = DefaultJSONProvider(app)
    standard.sort_keys, standard.ensure_ascii = False, False
    ours, theirs = json.loads(app.json.dumps(answer)), json.loads(standard.dumps(answer))
    assert ours == theirs and json.dumps(ours) == json.dumps(theirs)  # equal values, and in the same order


def test_json_provider_keeps_flasks_handling_of_other_types(app):
    import datetime
    import decimal
    import uuid

    with app.app_context():
        value = {"when": datetime.datetime(2024, 6, 1, 12, 0, tzinfo=datetime.timezone.utc),
                 "day": datetime.date(2024, 6, 1), "amount": decimal.Decimal("1.50"),
                 "id": uuid.UUID(int=1), 7: "non-string key", "small": 1e-05, "nan": float("nan")}
        out = json.loads(app.json.dumps(value))
        assert out["when"] == "Sat, 01 Jun 2024 12:00:00 GMT"  # HTTP dates, as Flask writes them
        assert out["day"] == "Sat, 01 Jun 2024 00:00:00 GMT"
        assert out["amount"] == "1.50" and out["id"] == str(uuid.UUID(int=1)) and out["7"] == "non-string key"
        assert out["small"] == 1e-05 and out["nan"] is None  # valid JSON where json.dumps wrote NaN
        assert app.json.dumps({"b": 1, "a": 2}, sort_keys=True) == '{"a": 2, "b": 1}'  # options: Flask's encoder
        with pytest.raises(TypeError):
            app.json.dumps({"x": object()})


# --------------------------------------------------------------------------- every error path

BIG = json.dumps({"question": "x" * 70_000})

ERROR_CASES = [
    # (method, path, request kwargs, status, code)
    ("POST", "/api/ask", {"json": {"question": ""}}, 400, "question_empty"),
    ("POST", "/api/ask", {"json": {"question": "  \n\t "}}, 400, "question_empty"),
    ("POST", "/api/ask", {"json": {"question": "\u200b \u2060\u00a0"}}, 400, "question_empty"),
    ("POST", "/api/ask", {"json": {}}, 400, "question_missing"),
    ("POST", "/api/ask", {"json": {"k": 3}}, 400, "question_missing"),
    ("POST", "/api/ask", {"json": {"question": "x" * 1001}}, 400, "question_too_long"),
    ("POST", "/api/ask", {"json": {"question": 5}}, 400, "wrong_type"),
    ("POST", "/api/ask", {"json": {"question": None}}, 400, "wrong_type"),
    ("POST", "/api/ask", {"json": {"question": ["a"]}}, 400, "wrong_type"),
    ("POST", "/api/ask", {"json": {"question": "x", "k": "5"}}, 400, "wrong_type"),
    ("POST", "/api/ask", {"json": {"question": "x", "k": True}}, 400, "wrong_type"),
    ("POST", "/api/ask", {"json": {"question": "x", "k": 2.5}}, 400, "wrong_type"),
    ("POST", "/api/ask", {"json": {"question": "x", "filters": "abc"}}, 400, "wrong_type"),
    ("POST", "/api/ask", {"json": {"question": "x", "filters": {"sources": "abc"}}}, 400, "wrong_type"),
    ("POST", "/api/ask", {"json": {"question": "x", "filters": {"date_from": 20250101}}}, 400, "wrong_type"),
    ("POST", "/api/ask", {"json": {"question": "x", "k": 0}}, 400, "k_out_of_range"),
    ("POST", "/api/ask", {"json": {"question": "x", "k": 51}}, 400, "k_out_of_range"),
    ("POST", "/api/ask", {"json": {"question": "x", "k": -3}}, 400, "k_out_of_range"),
    ("POST", "/api/ask", {"json": {"question": "x", "top_k": 3}}, 400, "unknown_field"),
    ("POST", "/api/ask", {"json": {"question": "x", "filters": {"source": ["a"]}}}, 400, "unknown_field"),
    ("POST", "/api/ask", {"json": {"question": "x", "filters": {"date_from": "2025-13-01"}}}, 400, "date_malformed"),
    ("POST", "/api/ask", {"json": {"question": "x", "filters": {"date_to": "31/01/2025"}}}, 400, "date_malformed"),
    ("POST", "/api/ask", {"json": {"question": "x", "filters": {"date_to": "2025-02-30"}}}, 400, "date_malformed"),
    ("POST", "/api/ask", {"json": {"question": "x", "filters": {"date_from": "2025-1-5"}}}, 400, "date_malformed"),
    ("POST", "/api/ask", {"json": {"question": "x", "filters": {"date_from": "2025-02-01", "date_to": "2025-01-01"}}},
     400, "date_range_inverted"),
    ("POST", "/api/ask", {"json": {"question": "x", "filters": {"sources": ["no-such-article"]}}}, 400,
     "unknown_source"),
    ("POST", "/api/ask", {"json": {"question": "x", "filters": {"sources": ["a"] * 101}}}, 400, "too_many_sources"),
    ("POST", "/api/ask", {"json": {"question": "x", "mode": "fast"}}, 400, "mode_unknown"),
    ("POST", "/api/ask", {"json": {"question": "x", "mode": 1}}, 400, "mode_unknown"),
    ("POST", "/api/ask", {"data": "{not json", "content_type": "application/json"}, 400, "invalid_json"),
    ("POST", "/api/ask", {"data": "", "content_type": "application/json"}, 400, "invalid_json"),
    ("POST", "/api/ask", {"data": b'{"question": "\xff"}', "content_type": "application/json"}, 400, "invalid_json"),
    ("POST", "/api/ask", {"data": '{"question": "a", "question": ', "content_type": "application/json"}, 400,
     "invalid_json"),
    ("POST", "/api/ask", {"json": [1, 2]}, 400, "body_not_object"),
    ("POST", "/api/ask", {"json": "What?"}, 400, "body_not_object"),
    ("POST", "/api/ask", {"data": "question=x", "content_type": "application/x-www-form-urlencoded"}, 415,
     "unsupported_media_type"),
    ("POST", "/api/ask", {"data": '{"question": "x"}'}, 415, "unsupported_media_type"),
    ("POST", "/api/ask", {"data": '{"question": "x"}', "content_type": "text/plain"}, 415, "unsupported_media_type"),
    ("POST", "/api/ask", {"data": BIG, "content_type": "application/json"}, 413, "body_too_large"),
    ("GET", "/api/ask", {}, 400, "question_missing"),
    ("GET", "/api/ask?q=", {}, 400, "question_empty"),
    ("GET", "/api/ask?q=%20%20", {}, 400, "question_empty"),
    ("GET", "/api/ask?q=%E2%80%8B%EF%BB%BF", {}, 400, "question_empty"),  # a zero-width space and a BOM
    ("GET", "/api/ask?q=x&k=3&k=4", {}, 400, "parameter_repeated"),
    ("GET", "/api/ask?q=x&q=y", {}, 400, "parameter_repeated"),
    ("GET", "/api/ask?q=" + "x" * 1001, {}, 400, "question_too_long"),
    ("GET", "/api/ask?q=x&k=abc", {}, 400, "wrong_type"),
    ("GET", "/api/ask?q=x&k=2.5", {}, 400, "wrong_type"),
    ("GET", "/api/ask?q=x&k=0", {}, 400, "k_out_of_range"),
    ("GET", "/api/ask?q=x&k=1000", {}, 400, "k_out_of_range"),
    ("GET", "/api/ask?q=x&top_k=3", {}, 400, "unknown_field"),
    ("GET", "/api/ask?q=x&date_from=yesterday", {}, 400, "date_malformed"),
    ("GET", "/api/ask?q=x&date_from=2025-01-02&date_to=2025-01-01", {}, 400, "date_range_inverted"),
    ("GET", "/api/ask?q=x&source=nope", {}, 400, "unknown_source"),
    ("GET", "/api/ask?q=x&mode=fast", {}, 400, "mode_unknown"),
    ("GET", "/api/articles/nope", {}, 404, "article_not_found"),
    ("GET", "/api/nope", {}, 404, "not_found"),
    ("GET", "/nope", {}, 404, "not_found"),
    ("DELETE", "/api/ask", {}, 405, "method_not_allowed"),
    ("PUT", "/api/articles", {}, 405, "method_not_allowed"),
    ("POST", "/healthz", {}, 405, "method_not_allowed"),
    ("POST", "/openapi.json", {}, 405, "method_not_allowed"),
    ("POST", "/api/ask", {"data": '{"question": "a", "question": "b"}', "content_type": "application/json"}, 400,
     "duplicate_key"),
    ("POST", "/api/articles", {"json": {"id": "new", "text": "Some text."}}, 403, "writes_disabled"),
    ("DELETE", "/api/articles/nope", {}, 403, "writes_disabled"),
]

def test_every_error_path_has_the_one_shape(app, fake_index, fake_searcher, caplog):
    client = app.test_client()
    seen = set()
    for method, path, kwargs, status, code in ERROR_CASES:
        r = client.open(path, method=method, **kwargs)
        assert_error_shape(r, status, code)
        if status == 405:
            assert r.headers["Allow"]
        seen.add(code)

    # Unexpected exceptions: a generic 500, details only in the server log.
    boom = create_app(fake_index, searcher=FailingSearcher(fake_searcher, RuntimeError("disk /srv/secret.db on fire")))
    with caplog.at_level(logging.ERROR):
        r = boom.test_client().post("/api/ask", json={"question": "x"})
    assert_error_shape(r, 500, "internal_error")
    assert "secret" not in r.get_data(as_text=True) and "/srv/secret.db" in caplog.text
    seen.add("internal_error")

    # Server-side QAErrors carry paths in their message: the client gets the generic sentence.
    broken = create_app(fake_index, searcher=FailingSearcher(
        fake_searcher, IndexCorrupt("The index in /srv/index cannot be read.")))
    r = broken.test_client().get("/api/ask?q=x")
    assert_error_shape(r, 503, "index_corrupt")
    seen.add("index_corrupt")

    # Only codes no request can reach through this app are left: werkzeug- and gunicorn-level 400/414/431
    # (test_fuzz.py meets them on a real server) and the start-up failures (a worker that cannot load its
    # index never serves).
    assert set(ERROR_CODES) - seen - WALKED_IN_WRITE_TESTS == {
        "invalid_request", "bad_request", "request_uri_too_large", "header_fields_too_large", "index_not_built",
        "index_mismatch", "model_not_found"}


def test_error_messages_say_what_is_wrong(client):
    def message(**kwargs):
        return client.post("/api/ask", **kwargs).get_json()["error"]["message"]

    assert "1000" in message(json={"question": "x" * 1001})
    assert "between 1 and 50" in message(json={"question": "x", "k": 99})
    assert "'k'" in client.get("/api/ask?q=x&k=1.5").get_json()["error"]["message"]
    assert "'q'" in client.get("/api/ask").get_json()["error"]["message"]
    assert "'top_k'" in message(json={"question": "x", "top_k": 1})
    assert "'filters.sources'" in message(json={"question": "x", "filters": {"sources": 1}})
    assert "'no-such-article'" in message(json={"question": "x", "filters": {"sources": ["no-such-article"]}})
    assert "2025-02-30" in message(json={"question": "x", "filters": {"date_from": "2025-02-30"}})


def test_limits_come_from_settings(fake_index, fake_searcher):
    settings = fake_index.with_(max_k=7, max_question_chars=20, max_body_bytes=300)
    app = create_app(settings, searcher=fake_searcher)
    client = app.test_client()
    assert client.post("/api/ask", json={"question": "x", "k": 7}).status_code == 200
    assert client.post("/api/ask", json={"question": "x", "k": 8}).get_json()["error"]["code"] == "k_out_of_range"
    assert client.post("/api/ask", json={"question": "x" * 21}).get_json()["error"]["code"] == "question_too_long"
    assert client.post("/api/ask", json={"question": "x" * 400}).status_code == 413
    schema = client.get("/openapi.json").get_json()["components"]["schemas"]["AskRequest"]
    assert schema["properties"]["k"]["maximum"] == 7
    assert schema["properties"]["question"]["maxLength"] == 20


# --------------------------------------------------------------------------- OpenAPI

def test_openapi_documents_every_route_and_error(app, client):
    doc = client.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    routes = {(rule.rule, m.lower()) for rule in app.url_map.iter_rules() if rule.endpoint != "static"
              for m in rule.methods - {"HEAD", "OPTIONS"}}
    documented = set()
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            documented.add((path.replace("{", "<").replace("}", ">"), method))
            assert op["summary"] and "200" in op["responses"]
            for status, response in op["responses"].items():
                if status in ("200", "201"):
                    continue
                assert int(status) >= 400
                content = response["content"]
                if "application/json" in content:
                    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
                    for example in content["application/json"]["examples"].values():
                        assert ERROR_CODES[example["value"]["error"]["code"]][0] == int(status)
    assert documented == routes
    ask = doc["paths"]["/api/ask"]["post"]
    assert ask["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/AskRequest"}
    codes_400 = ask["responses"]["400"]["description"]
    for code in ("question_empty", "question_too_long", "k_out_of_range", "date_range_inverted", "unknown_source",
                 "invalid_json", "unknown_field", "wrong_type"):
        assert f"`{code}`" in codes_400
    assert {"413", "415", "405", "500"} <= set(ask["responses"])
    assert "`parameter_repeated`" not in codes_400  # a JSON body has no query parameters to repeat
    assert "`parameter_repeated`" in doc["paths"]["/api/ask"]["get"]["responses"]["400"]["description"]
    assert "404" in doc["paths"]["/api/articles/{article_id}"]["get"]["responses"]
    params = {p["name"]: p for p in doc["paths"]["/api/ask"]["get"]["parameters"]}
    assert set(params) == {"q", "k", "source", "date_from", "date_to", "mode"}
    assert params["q"]["required"] is True and params["k"]["schema"]["maximum"] == 50
    assert params["source"]["schema"]["type"] == "array"
    # every $ref resolves
    refs = set()

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                refs.add(node["$ref"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    for ref in refs:
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in doc["components"]["schemas"]
    assert set(doc["x-error-codes"]) == set(ERROR_CODES)


def test_responses_match_the_documented_models(client, fake_searcher):
    from qa_service.web.schemas import ArticleDetail, ArticleList, AskResponse, ErrorResponse, Health

    AskResponse.model_validate(client.post("/api/ask", json={"question": QUESTION}).get_json())
    named = client.post("/api/ask", json={"question": "What did the Turkish president say?"}).get_json()
    assert AskResponse.model_validate(named).names_not_in_articles == ["Turkish"] and named["answerable"] is False
    documented = client.get("/openapi.json").get_json()["components"]["schemas"]["AskResponse"]["properties"]
    assert {"answerable", "answer_confidence", "names_not_in_articles"} <= set(documented)
    ArticleList.model_validate(client.get("/api/articles").get_json())
    ArticleDetail.model_validate(client.get(f"/api/articles/{fake_searcher.articles()[0].id}").get_json())
    Health.model_validate(client.get("/healthz").get_json())
    ErrorResponse.model_validate(client.get("/api/ask").get_json())


def test_openapi_describes_article_provenance_and_the_upload_metadata(client):
    schemas = client.get("/openapi.json").get_json()["components"]["schemas"]
    assert {"source_url", "outlet"} <= set(schemas["Citation"]["properties"])
    summary = schemas["ArticleSummary"]["properties"]
    assert {"title", "title_from", "source_url", "outlet", "author", "story"} <= set(summary)
    assert "lead" in str(summary["title_from"]) and "lead sentence" in summary["title"]["description"]
    upload = schemas["ArticleUpload"]["properties"]
    assert {"id", "text", "title", "date", "url", "source_url", "outlet", "author"} == set(upload)
    assert "YYYY-MM-DD" in upload["date"]["description"] and "http" in upload["url"]["description"]
    written = schemas["ArticleWritten"]["properties"]
    assert "article" in written and "source_url" in schemas["ArticleStored"]["properties"]
    post = client.get("/openapi.json").get_json()["paths"]["/api/articles"]["post"]
    codes = str(post["responses"])
    for code in ("date_malformed", "url_invalid", "article_field_invalid", "article_not_writable"):
        assert code in codes
