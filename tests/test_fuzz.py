"""Fuzzed and hostile requests: schemathesis against the service's own /openapi.json (a real server on
loopback, and in-process for the write endpoints with a key), plus hand-written nasty cases.

Every response must carry a status the document lists for that operation, errors the standard error body,
and no 5xx ever.
"""

from __future__ import annotations

import json
import re
import shutil
import socket

import pytest
import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable

from qa_service.web import create_app

from .support.fakes import FakeEmbedder
from .support.live_server import API_KEY, FIGURES, link_copy

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402
from schemathesis import checks as st_checks  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402

# Required of every response: a documented status, the documented body (the error shape for errors), no 5xx.
CHECKS = [st_checks.not_a_server_error, st_checks.status_code_conformance, st_checks.content_type_conformance,
          st_checks.response_schema_conformance, st_checks.response_headers_conformance,
          st_checks.ignored_auth, st_checks.unsupported_method, st_checks.missing_required_header]
# JSON bodies are validated strictly, so schema-violating bodies must be refused. (Query strings are not
# held to this: they treat empty values as absent, as HTML forms send them, which schemathesis counts as
# accepting invalid data.)
BODY_CHECKS = [*CHECKS, st_checks.negative_data_rejection]


def _run_schemathesis(schema, call, max_examples: int, only: set[tuple[str, str]] | None = None,
                      skip_checks: tuple = ()) -> dict:
    """Run both generation modes over every operation; return counts and failure reports."""
    stats = {"requests": 0, "positive": 0, "negative": 0, "operations": 0, "failures": []}
    for result in schema.get_all_operations():
        op = result.ok()
        if only is not None and (op.method.upper(), op.path) not in only:
            continue
        stats["operations"] += 1
        checks = [c for c in (BODY_CHECKS if op.body else CHECKS) if c not in skip_checks]
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
            def fuzz(case):
                response = call(case)
                stats["requests"] += 1
                stats[mode.value] += 1
                try:
                    case.validate_response(response, checks=checks)
                except (FailureGroup, AssertionError) as exc:
                    stats["failures"].append(f"{op.method.upper()} {op.path} [{mode.value}] "
                                             f"{response.status_code}: {str(exc)[:1500]}")

            try:
                fuzz()
            except Unsatisfiable:  # nothing to negate (no parameters, or only a free-form path string)
                pass
    return stats


@pytest.mark.slow
def test_schemathesis_against_the_running_service(live_service):
    schema = schemathesis.openapi.from_url(live_service.url + "/openapi.json")
    session = requests.Session()
    stats = _run_schemathesis(schema, lambda case: case.call(base_url=live_service.url, session=session,
                                                             timeout=60), max_examples=75)
    FIGURES.append(f"schemathesis, real server (no key): {stats['requests']} requests "
                   f"({stats['positive']} positive, {stats['negative']} negative) over {stats['operations']} "
                   f"operations, {len(stats['failures'])} failures")
    assert stats["requests"] > 500
    assert not stats["failures"], "\n\n".join(stats["failures"][:5])
    # the service is still healthy and consistent after the storm
    health = requests.get(live_service.url + "/healthz", timeout=10).json()
    assert health["ok"] is True and health["articles"] == 5


@pytest.fixture()
def writable_app(tmp_path, fake_index, fake_embedder):
    """An app over a private copy of the fake index that takes writes with ``API_KEY``."""
    from qa_service.retrieval import Searcher

    settings = fake_index.with_(index_dir=tmp_path / "index", seeds_dir=tmp_path / "seeds", api_key=API_KEY)
    link_copy(fake_index.index_dir, settings.index_dir)
    shutil.copytree(fake_index.seeds_dir, settings.seeds_dir)
    return create_app(settings, load_searcher=lambda: Searcher(settings, embedder=fake_embedder),
                      write_embedder=FakeEmbedder())


def test_schemathesis_write_endpoints_with_the_key(writable_app):
    """The write endpoints, authorised, in-process with the fake embedder (real writes, fast)."""
    schema = schemathesis.openapi.from_wsgi("/openapi.json", writable_app)
    # The real key replaces whatever key schemathesis generates, so its "ignored auth" check (a made-up key
    # must be refused) does not apply here; the run without a key above makes it.
    stats = _run_schemathesis(schema, lambda case: case.call(headers={"X-API-Key": API_KEY}), max_examples=30,
                              only={("POST", "/api/articles"), ("DELETE", "/api/articles/{article_id}")},
                              skip_checks=(st_checks.ignored_auth,))
    FIGURES.append(f"schemathesis, write endpoints with the key (in-process): {stats['requests']} requests, "
                   f"{len(stats['failures'])} failures")
    assert stats["operations"] == 2 and stats["requests"] > 60
    assert not stats["failures"], "\n\n".join(stats["failures"][:5])
    # whatever was written, the folder and the index agree
    state = writable_app.extensions["qa_service"]
    from qa_service.ingest import load_articles
    from qa_service.store import read_manifest

    on_disk = {a.id: a.content_hash for a in load_articles(state.settings.seeds_dir).articles}
    assert read_manifest(state.settings.index_dir)["articles"] == on_disk
    assert {a.id for a in state.searcher.articles()} == set(on_disk)


# --------------------------------------------------------------------------- hand-written hostile requests

JSON = {"Content-Type": "application/json"}
KEY = {"X-API-Key": API_KEY}
TEN_MB = b"a" * (10 * 1024 * 1024)

HOSTILE = [
    # (id, method, path, requests kwargs, expected status, expected error code or None)
    ("invalid-utf8-body", "POST", "/api/ask", {"data": b'{"question": "caf\xe9 \xff\xfe"}', "headers": JSON}, 400,
     "invalid_json"),
    ("invalid-utf8-query", "GET", "/api/ask?q=%FF%FEGaza", {}, 200, None),
    ("nul-escaped-in-question", "POST", "/api/ask", {"data": b'{"question": "Gaza\\u0000ceasefire"}', "headers": JSON},
     200, None),
    ("raw-nul-in-json-string", "POST", "/api/ask", {"data": b'{"question": "Gaza\x00ceasefire"}', "headers": JSON},
     400, "invalid_json"),
    ("nul-in-query", "GET", "/api/ask?q=Gaza%00ceasefire", {}, 200, None),
    ("nul-in-article-id", "GET", "/api/articles/abc%00def", {}, 404, "article_not_found"),
    ("ten-mb-ask", "POST", "/api/ask", {"data": TEN_MB, "headers": JSON}, 413, "body_too_large"),
    ("ten-mb-ask-chunked", "POST", "/api/ask",
     {"data": iter([TEN_MB[i:i + (1 << 20)] for i in range(0, len(TEN_MB), 1 << 20)]), "headers": JSON}, 413,
     "body_too_large"),
    ("ten-mb-upload-with-key", "POST", "/api/articles", {"data": TEN_MB, "headers": {**JSON, **KEY}}, 413,
     "body_too_large"),
    ("ten-mb-upload-without-key", "POST", "/api/articles", {"data": TEN_MB, "headers": JSON}, 401, "unauthorized"),
    ("three-mb-upload-over-its-cap", "POST", "/api/articles",
     {"data": json.dumps({"id": "big", "text": "word " * 600_000}).encode(), "headers": {**JSON, **KEY}}, 413,
     "body_too_large"),
    ("deeply-nested-arrays", "POST", "/api/ask",
     {"data": b'{"question": "x", "filters": ' + b"[" * 20000 + b"]" * 20000 + b"}", "headers": JSON}, 400,
     "invalid_json"),
    ("deeply-nested-objects", "POST", "/api/ask", {"data": b'{"a":' * 5000 + b"1" + b"}" * 5000, "headers": JSON}, 400,
     "invalid_json"),
    ("nested-top-level", "POST", "/api/ask", {"data": b"[" * 30000, "headers": JSON}, 400, "invalid_json"),
    ("only-punctuation", "POST", "/api/ask", {"json": {"question": "?!...;:--()[]{}'\"«»"}}, 200, None),
    ("only-emoji", "POST", "/api/ask", {"json": {"question": "🙂🤔🔥🇮🇷👨‍👩‍👧"}}, 200, None),
    ("only-punctuation-get", "GET", "/api/ask?q=%3F%21%2E%2E%2E", {}, 200, None),
    ("mixed-rtl", "POST", "/api/ask", {"json": {"question": "ما هو وقف إطلاق النار in Gaza? \u202eevil\u202c שלום"}},
     200, None),
    ("rtl-override-html", "GET", "/?q=%E2%80%AEGaza%20ceasefire", {}, 200, None),
    ("k-string", "POST", "/api/ask", {"json": {"question": "Gaza", "k": "5"}}, 400, "wrong_type"),
    ("k-float", "POST", "/api/ask", {"json": {"question": "Gaza", "k": 2.5}}, 400, "wrong_type"),
    ("k-float-integral", "POST", "/api/ask", {"json": {"question": "Gaza", "k": 5.0}}, 400, "wrong_type"),
    ("k-negative", "POST", "/api/ask", {"json": {"question": "Gaza", "k": -1}}, 400, "k_out_of_range"),
    ("k-huge", "POST", "/api/ask", {"json": {"question": "Gaza", "k": 10 ** 30}}, 400, "k_out_of_range"),
    ("k-infinite", "POST", "/api/ask", {"data": b'{"question": "Gaza", "k": 1e400}', "headers": JSON}, 400,
     "wrong_type"),
    ("k-nan", "POST", "/api/ask", {"data": b'{"question": "Gaza", "k": NaN}', "headers": JSON}, 400, None),
    ("k-negative-get", "GET", "/api/ask?q=Gaza&k=-3", {}, 400, "k_out_of_range"),
    ("k-huge-get", "GET", "/api/ask?q=Gaza&k=" + "9" * 40, {}, 400, "k_out_of_range"),
    ("k-float-get", "GET", "/api/ask?q=Gaza&k=1e3", {}, 400, "wrong_type"),
    ("duplicate-keys", "POST", "/api/ask", {"data": b'{"question": "Gaza", "question": "Tehran"}', "headers": JSON},
     400, "duplicate_key"),
    ("duplicate-nested-keys", "POST", "/api/ask",
     {"data": b'{"question": "Gaza", "filters": {"date_from": "2025-01-01", "date_from": "2025-02-01"}}',
      "headers": JSON}, 400, "duplicate_key"),
    ("duplicate-keys-upload", "POST", "/api/articles",
     {"data": b'{"id": "a", "id": "b", "text": "Some text."}', "headers": {**JSON, **KEY}}, 400, "duplicate_key"),
    ("content-type-text", "POST", "/api/ask",
     {"data": b'{"question": "Gaza"}', "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
    ("content-type-form", "POST", "/api/ask", {"data": {"question": "Gaza"}}, 415, "unsupported_media_type"),
    ("content-type-multipart", "POST", "/api/ask", {"files": {"question": ("q.json", b'{"question": "Gaza"}')}}, 415,
     "unsupported_media_type"),
    ("content-type-missing", "POST", "/api/ask", {"data": b'{"question": "Gaza"}'}, 415, "unsupported_media_type"),
    ("content-type-upload-text", "POST", "/api/articles",
     {"data": b"Some text.", "headers": {"Content-Type": "text/plain", **KEY}}, 415, "unsupported_media_type"),
    ("body-not-object", "POST", "/api/ask", {"json": ["Gaza"]}, 400, "body_not_object"),
    ("header-key-in-query-ignored", "DELETE", f"/api/articles/x?api_key={API_KEY}", {}, 401, "unauthorized"),
    ("huge-url", "GET", "/api/ask?q=" + "a" * 9000, {}, 414, "request_uri_too_large"),
    ("huge-header", "GET", "/api/ask?q=Gaza", {"headers": {"X-Junk": "a" * 9000}}, 431, "header_fields_too_large"),
]


def _documented(doc: dict, method: str, path: str) -> tuple[set[int], bool]:
    """Return the statuses documented for the operation ``path`` matches, and whether it is an HTML page."""
    path = path.split("?")[0]
    for template, ops in doc["paths"].items():
        pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path) and method.lower() in ops:
            op = ops[method.lower()]
            html = "text/html" in op["responses"]["200"]["content"]
            return {int(s) for s in op["responses"]}, html
    raise AssertionError(f"{method} {path} is not documented")


@pytest.fixture(scope="module")
def openapi_doc(live_service):
    return requests.get(live_service.url + "/openapi.json", timeout=10).json()


def _assert_error_body(r, code: str | None) -> None:
    assert r.headers["Content-Type"].startswith("application/json"), r.text[:300]
    body = r.json()
    assert set(body) == {"ok", "error"} and body["ok"] is False and set(body["error"]) == {"code", "message"}
    if code is not None:
        assert body["error"]["code"] == code, body


@pytest.mark.slow
@pytest.mark.parametrize("name, method, path, kwargs, status, code", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_requests_get_documented_answers(live_service, openapi_doc, name, method, path, kwargs, status, code):
    r = requests.request(method, live_service.url + path, timeout=60, **kwargs)
    assert r.status_code == status, (r.status_code, r.text[:300])
    documented, html = _documented(openapi_doc, method, path)
    assert r.status_code in documented
    if r.status_code >= 400:
        _assert_error_body(r, code)
    elif not html:
        body = r.json()
        assert body["ok"] is True
        for hit in body["results"]:  # citations still slice the article text exactly
            url = live_service.url + f"/api/articles/{hit['citation']['article_id']}"
            article = requests.get(url, timeout=10).json()
            assert article["text"][hit["citation"]["start"]:hit["citation"]["end"]] == hit["text"]


def _raw(url: str, request: bytes) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.slow
@pytest.mark.parametrize("request_line", [
    b"GET /api/ask?q=caf\xe9\xff HTTP/1.1",  # raw (not percent-encoded) invalid UTF-8
    b"GET /api/articles/\xff\xfe HTTP/1.1",
    b"GET /api/ask?q=a\x00b HTTP/1.1",  # a raw NUL in the request line
    b"GET /api/ask?q=a b HTTP/1.1",
    b"BREW /api/ask HTTP/1.1",
])
def test_malformed_request_lines_get_the_error_shape(live_service, request_line):
    status, body = _raw(live_service.url, request_line + b"\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert status < 500
    if status >= 400:
        payload = json.loads(body)
        assert payload["ok"] is False and set(payload["error"]) == {"code", "message"}
