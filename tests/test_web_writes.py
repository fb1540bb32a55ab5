"""The write API and the web layer's defences: API keys, ids that cannot escape the seeds folder, body caps,
reloads that never drop a request, overload answered with 503, HTML that runs no inline script."""

from __future__ import annotations

import hmac
import logging
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests

from qa_service.articles import put_article, writer_lock
from qa_service.errors import ConfigError
from qa_service.files import write_text_atomically
from qa_service.ingest import load_articles
from qa_service.retrieval import Searcher
from qa_service.store import read_manifest
from qa_service.web import DebugRefused, create_app

from .support.errors import WALKED_IN_WRITE_TESTS, assert_error_shape
from .support.fakes import FakeEmbedder
from .support.live_server import API_KEY, link_copy
from .support.web_apps import WrappedSearcher, serve_in_thread

KEY = {"X-API-Key": API_KEY}
ARTICLE = "date 2025-03-01 The flamingo parade in Tehran drew ten thousand zebras, the organisers said.\n\n" \
          "The zebras walked from Azadi Square to the bazaar, where traders sold them carrots."


@pytest.fixture()
def settings(tmp_path, fake_index):
    """Settings over a private copy (hard links) of the fake index and its seeds, with an API key."""
    s = fake_index.with_(index_dir=tmp_path / "index", seeds_dir=tmp_path / "seeds", api_key=API_KEY)
    link_copy(fake_index.index_dir, s.index_dir)
    shutil.copytree(fake_index.seeds_dir, s.seeds_dir)
    return s


def make_app(settings, **kwargs):
    embedder = FakeEmbedder()
    return create_app(settings, load_searcher=lambda: Searcher(settings, embedder=embedder),
                      write_embedder=FakeEmbedder(), **kwargs)


def _folder_and_index_agree(settings) -> set[str]:
    on_disk = {a.id: a.content_hash for a in load_articles(settings.seeds_dir).articles}
    assert read_manifest(settings.index_dir)["articles"] == on_disk
    return set(on_disk)


# --------------------------------------------------------------------------- writes

def test_add_replace_remove_an_article(settings):
    app = make_app(settings)
    client = app.test_client()
    before = _folder_and_index_agree(settings)

    r = client.post("/api/articles", json={"id": "flamingo-1", "text": ARTICLE}, headers=KEY)
    assert r.status_code == 201, r.get_json()
    body = r.get_json()
    assert body == {"ok": True, "id": "flamingo-1", "action": "created", "build_id": body["build_id"],
                    "articles": len(before) + 1, "embedded_articles": 1, "url": "/articles/flamingo-1",
                    "article": {"id": "flamingo-1", "source": "flamingo-1.txt", "title": body["article"]["title"],
                                "title_from": "lead", "date": "2025-03-01", "source_url": None, "outlet": None,
                                "author": None, "story": "flamingo-1", "url": "/articles/flamingo-1"}}
    assert body["article"]["title"].startswith("The flamingo parade in Tehran")
    assert (settings.seeds_dir / "flamingo-1.txt").read_text() == ARTICLE
    assert _folder_and_index_agree(settings) == before | {"flamingo-1"}
    # the writing worker answers from the new index at once, with citations into the new text
    assert client.get("/healthz").get_json()["build_id"] == body["build_id"]
    hits = client.post("/api/ask", json={"question": "flamingo parade zebras", "k": 1}).get_json()["results"]
    assert hits[0]["citation"]["article_id"] == "flamingo-1"
    text = client.get("/api/articles/flamingo-1").get_json()["text"]
    assert text[hits[0]["citation"]["start"]:hits[0]["citation"]["end"]] == hits[0]["text"]
    assert read_manifest(settings.index_dir)["counts"]["reused_articles"] == len(before)  # only the new one embedded

    same = client.post("/api/articles", json={"id": "flamingo-1", "text": ARTICLE}, headers=KEY)
    assert same.status_code == 200 and same.get_json()["action"] == "unchanged"
    assert same.get_json()["build_id"] == body["build_id"]  # nothing rebuilt

    changed = ARTICLE.replace("zebras", "okapis")
    r = client.post("/api/articles", json={"id": "flamingo-1", "text": changed}, headers=KEY)
    assert r.status_code == 200 and r.get_json()["action"] == "replaced" and r.get_json()["embedded_articles"] == 1
    assert "okapis" in client.get("/api/articles/flamingo-1").get_json()["text"]

    r = client.delete("/api/articles/flamingo-1", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200 and r.get_json()["action"] == "deleted" and r.get_json()["url"] is None
    assert client.get("/api/articles/flamingo-1").status_code == 404
    assert not (settings.seeds_dir / "flamingo-1.txt").exists()
    assert _folder_and_index_agree(settings) == before
    assert not list(settings.seeds_dir.glob(".*")) and not (settings.index_dir / "write-journal.json").exists()


def test_an_upload_writes_lexical_files_here_while_questions_are_answered(settings, monkeypatch):
    """A large archive's upload in a process whose other threads keep answering writes BM25 there: it never forks
    (``chunking.forbid_forks``)."""
    import threading

    from qa_service import chunking, store

    pools = []
    real_pool = chunking.fork_pool
    monkeypatch.setattr(store, "LEXICAL_PARALLEL_MIN", 1)  # the seeds stand in for a large archive
    monkeypatch.setattr(chunking, "cores", lambda: 2)
    monkeypatch.setattr(chunking, "fork_pool", lambda n: pools.append(n) or real_pool(n))
    app = make_app(settings)
    stop, answered, failed = threading.Event(), [], []

    def ask():
        client = app.test_client()
        while not stop.is_set():
            r = client.post("/api/ask", json={"question": "Gaza ceasefire", "k": 3})
            (answered if r.status_code == 200 else failed).append(r.status_code)

    askers = [threading.Thread(target=ask) for _ in range(2)]
    for thread in askers:
        thread.start()
    try:
        r = app.test_client().post("/api/articles", json={"id": "flamingo-1", "text": ARTICLE}, headers=KEY)
    finally:
        stop.set()
        for thread in askers:
            thread.join(30)
    assert r.status_code == 201, r.get_json()
    assert pools == [], "a process that answers questions forked"
    assert answered and not failed
    hits = app.test_client().post("/api/ask", json={"question": "flamingo zebras", "k": 1, "mode": "lexical"})
    assert hits.get_json()["results"][0]["citation"]["article_id"] == "flamingo-1"


def test_uploads_have_their_own_larger_cap(settings):
    app = make_app(settings.with_(max_upload_bytes=200_000))
    client = app.test_client()
    text = "\n\n".join(f"Paragraph {i}: the council met on Tuesday and discussed the harbour." for i in range(1200))
    assert 64 * 1024 < len(text) < 200_000
    r = client.post("/api/articles", json={"id": "long-one", "text": text}, headers=KEY)
    assert r.status_code == 201, r.get_json()
    r = client.post("/api/ask", json={"question": text[:70_000]})  # the same size is too much for a question
    assert_error_shape(r, 413, "body_too_large")
    r = client.post("/api/articles", json={"id": "too-long", "text": "x" * 200_001}, headers=KEY)
    assert_error_shape(r, 413, "body_too_large")
    assert not (settings.seeds_dir / "too-long.txt").exists()


# --------------------------------------------------------------------------- keys

def test_without_a_configured_key_writing_is_disabled(settings):
    client = make_app(settings.with_(api_key=None)).test_client()
    for headers in ({}, KEY, {"Authorization": "Bearer anything"}):
        assert_error_shape(client.post("/api/articles", json={"id": "x", "text": ARTICLE}, headers=headers), 403,
                            "writes_disabled")
        assert_error_shape(client.delete("/api/articles/000_13c1da738e689733", headers=headers), 403,
                            "writes_disabled")
    assert not (settings.seeds_dir / "x.txt").exists()
    assert (settings.seeds_dir / "000_13c1da738e689733.txt").exists()


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}, {"X-API-Key": API_KEY[:-1]},
                                     {"X-API-Key": API_KEY + "x"}, {"Authorization": "Basic " + API_KEY},
                                     {"Authorization": "Bearer"}, {"X-API-Key": ""}])
def test_a_missing_or_wrong_key_is_401(settings, headers):
    client = make_app(settings).test_client()
    r = client.post("/api/articles", json={"id": "x", "text": ARTICLE}, headers=headers)
    assert_error_shape(r, 401, "unauthorized")
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert_error_shape(client.delete("/api/articles/000_13c1da738e689733", headers=headers), 401, "unauthorized")
    # a key in the query string is never accepted (it would land in access logs)
    assert_error_shape(client.post(f"/api/articles?api_key={API_KEY}", json={"id": "x", "text": ARTICLE},
                                    headers=headers), 401, "unauthorized")
    assert sorted(p.name for p in settings.seeds_dir.iterdir()) == sorted(
        p.name for p in Path(settings.seeds_dir).iterdir() if p.name != "x.txt")
    assert not (settings.seeds_dir / "x.txt").exists()


def test_keys_are_compared_in_constant_time(settings, monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr("qa_service.web.auth.hmac.compare_digest", spy)
    client = make_app(settings).test_client()
    client.delete("/api/articles/nope", headers={"X-API-Key": "guess"})
    assert calls == [(b"guess", API_KEY.encode())]


def test_reading_can_require_the_key(settings):
    app = make_app(settings.with_(require_key_for_read=True))
    client = app.test_client()
    for path in ("/api/ask?q=Gaza", "/api/articles", "/api/articles/000_13c1da738e689733", "/api/nope"):
        assert_error_shape(client.get(path), 401, "unauthorized")
        assert client.get(path, headers=KEY).status_code in (200, 404)
    assert_error_shape(client.post("/api/ask", json={"question": "Gaza"}), 401, "unauthorized")
    assert client.post("/api/ask", json={"question": "Gaza"}, headers=KEY).status_code == 200
    page = client.get("/?q=Gaza")
    assert page.status_code == 401 and page.mimetype == "text/html"
    assert client.get("/healthz").status_code == 200 and client.get("/openapi.json").status_code == 200
    assert client.get("/static/style.css").status_code == 200
    doc = client.get("/openapi.json").get_json()
    assert doc["paths"]["/api/ask"]["get"]["security"] and "401" in doc["paths"]["/api/ask"]["get"]["responses"]
    assert "security" not in doc["paths"]["/healthz"]["get"]


def test_unsafe_key_settings_refuse_to_start(settings, monkeypatch):
    with pytest.raises(ConfigError, match="QA_API_KEY"):
        make_app(settings.with_(api_key=None, require_key_for_read=True))
    with pytest.raises(ConfigError, match="too short"):
        make_app(settings.with_(api_key="short"))
    from click.testing import CliRunner

    from qa_service.cli import cli

    monkeypatch.delenv("FLASK_DEBUG", raising=False)
    monkeypatch.setenv("QA_API_KEY", "short")
    result = CliRunner().invoke(cli, ["serve", "--index-dir", str(settings.index_dir)])
    assert result.exit_code == 1 and "too short" in result.output and "Traceback" not in result.output


def test_openapi_declares_the_key_for_writes(settings):
    doc = make_app(settings).test_client().get("/openapi.json").get_json()
    assert set(doc["components"]["securitySchemes"]) == {"apiKey", "bearer"}
    assert doc["components"]["securitySchemes"]["apiKey"] == {**doc["components"]["securitySchemes"]["apiKey"],
                                                               "type": "apiKey", "in": "header", "name": "X-API-Key"}
    for path, method in (("/api/articles", "post"), ("/api/articles/{article_id}", "delete")):
        op = doc["paths"][path][method]
        assert op["security"] == [{"apiKey": []}, {"bearer": []}]
        assert {"401", "403"} <= set(op["responses"])
    assert "security" not in doc["paths"]["/api/ask"]["post"]
    assert {"200", "201"} <= set(doc["paths"]["/api/articles"]["post"]["responses"])
    upload = doc["components"]["schemas"]["ArticleUpload"]
    assert upload["properties"]["id"]["pattern"] == "^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$"


# --------------------------------------------------------------------------- names never escape the folder

ESCAPES = ["../escaped", "..", ".", "../../etc/passwd", "/etc/passwd", "/tmp/x", "a/b", "a\\b", "a\x00b",
           "\x00", "a\uff0fb", "\uff0e\uff0e\uff0fx", "\u202eabc", "abc\u202e", "\u2215etc", "a\u2044b",
           "\uff41bc", "caf\u00e9", "a.txt", ".hidden", "-leading-dash", "_leading", "a b", "a\nb", "a\tb",
           "%2e%2e%2fx", "x" * 101, "", " ", "con:", "a:b", "a*b", "a?b", "~root"]


@pytest.mark.parametrize("bad", ESCAPES, ids=[repr(e)[:30] for e in ESCAPES])
def test_article_ids_cannot_escape_the_seeds_folder(settings, tmp_path, bad):
    client = make_app(settings).test_client()
    victim = tmp_path / "escaped.txt"
    victim.write_text("keep me")
    seeds_before = sorted(p.name for p in settings.seeds_dir.iterdir())
    tree_before = sorted(str(p) for p in tmp_path.rglob("*"))

    r = client.post("/api/articles", json={"id": bad, "text": ARTICLE}, headers=KEY)
    assert_error_shape(r, 400, "article_id_invalid")
    from urllib.parse import quote

    r = client.delete("/api/articles/" + quote(bad, safe=""), headers=KEY)
    assert r.status_code in (400, 404, 405), r.get_data(as_text=True)
    assert r.get_json()["error"]["code"] in ("article_id_invalid", "not_found", "method_not_allowed")

    assert victim.read_text() == "keep me"
    assert sorted(p.name for p in settings.seeds_dir.iterdir()) == seeds_before
    assert sorted(str(p) for p in tmp_path.rglob("*")) == tree_before


def test_article_text_is_checked(settings):
    client = make_app(settings).test_client()
    for text, code in (("Gaza\u0000ceasefire", "article_text_invalid"), ("", "article_text_invalid"),
                       ("   \n\n  ", "article_text_invalid"), ("Share this\nComments\nPrint", "article_text_invalid")):
        assert_error_shape(client.post("/api/articles", json={"id": "t", "text": text}, headers=KEY), 400, code)
    assert not (settings.seeds_dir / "t.txt").exists() and not list(settings.seeds_dir.glob(".*"))


# --------------------------------------------------------------------------- every write error path

def test_every_write_error_path_has_the_one_shape(settings, tmp_path, caplog):
    seen = set()

    def expect(r, status, code):
        assert_error_shape(r, status, code)
        seen.add(code)

    client = make_app(settings).test_client()
    expect(client.post("/api/articles", json={"id": "../x", "text": "t"}, headers=KEY), 400, "article_id_invalid")
    expect(client.delete("/api/articles/a.b", headers=KEY), 400, "article_id_invalid")
    expect(client.post("/api/articles", json={"id": "x", "text": "a\u0000b"}, headers=KEY), 400, "article_text_invalid")
    expect(client.post("/api/articles", json={"id": "x", "text": ARTICLE}), 401, "unauthorized")
    expect(client.post("/api/articles", json={"id": "x", "text": ARTICLE, "extra": 1}, headers=KEY), 400,
           "unknown_field")
    expect(client.post("/api/articles", json={"id": 5, "text": ARTICLE}, headers=KEY), 400, "wrong_type")
    expect(client.post("/api/articles", json={"text": ARTICLE}, headers=KEY), 400, "invalid_request")
    expect(client.delete("/api/articles/nope", headers=KEY), 404, "article_not_found")
    for bad_date in ("2025-02-30", "14 March 2025", "2025-3-1", "20250301"):
        expect(client.post("/api/articles", json={"id": "x", "text": ARTICLE, "date": bad_date}, headers=KEY),
               400, "date_malformed")
    for bad_url in ("ftp://example.com/a", "javascript:alert(1)", "example.com/a", "https://", "http://a b"):
        expect(client.post("/api/articles", json={"id": "x", "text": ARTICLE, "url": bad_url}, headers=KEY),
               400, "url_invalid")
    expect(client.post("/api/articles", json={"id": "x", "text": ARTICLE, "url": "https://a.example/1",
                                              "source_url": "https://b.example/2"}, headers=KEY), 400, "url_invalid")
    for field, value in (("title", "two\nlines"), ("outlet", " "), ("author", "x" * 501), ("title", "")):
        expect(client.post("/api/articles", json={"id": "x", "text": ARTICLE, field: value}, headers=KEY),
               400, "article_field_invalid")
    assert not list(settings.seeds_dir.glob("x.*"))
    (settings.seeds_dir / "feed.jsonl").write_text('{"id": "rec-1", "title": "A record", "text": "A record of a '
                                                   'feed export, long enough to be read as an article."}\n')
    from qa_service.store import build_index as rebuild

    rebuild(load_articles(settings.seeds_dir).articles, FakeEmbedder(), settings)
    expect(client.post("/api/articles", json={"id": "rec-1", "text": ARTICLE, "title": "T"}, headers=KEY), 409,
           "article_not_writable")
    expect(client.delete("/api/articles/rec-1", headers=KEY), 409, "article_not_writable")
    assert "rec-1" in _folder_and_index_agree(settings)

    # another writer holds the lock longer than we wait
    busy = make_app(settings.with_(write_timeout=0.2)).test_client()
    with writer_lock(settings.index_dir):
        started = time.monotonic()
        r = busy.post("/api/articles", json={"id": "x", "text": ARTICLE}, headers=KEY)
        assert time.monotonic() - started < 5
    expect(r, 503, "write_busy")
    assert r.headers["Retry-After"]

    # the folder was edited behind the index's back: a write would publish more than one change
    with open(settings.seeds_dir / "000_13c1da738e689733.txt", "a", encoding="utf-8") as fh:
        fh.write("\nAn edit nobody indexed.\n")
    expect(client.post("/api/articles", json={"id": "x", "text": ARTICLE}, headers=KEY), 409, "seeds_out_of_sync")
    assert not (settings.seeds_dir / "x.txt").exists()

    no_folder = make_app(settings.with_(seeds_dir=tmp_path / "no-such-folder")).test_client()
    with caplog.at_level(logging.ERROR):
        expect(no_folder.post("/api/articles", json={"id": "x", "text": ARTICLE}, headers=KEY), 503,
               "writes_unavailable")

    # the last article cannot go: the index would be empty
    one = settings.with_(index_dir=tmp_path / "one-index", seeds_dir=tmp_path / "one-seeds")
    one.seeds_dir.mkdir()
    shutil.copy(settings.seeds_dir / "001_714cc25dd3f7c4d2.txt", one.seeds_dir)
    from qa_service.store import build_index

    build_index(load_articles(one.seeds_dir).articles, FakeEmbedder(), one)
    expect(make_app(one).test_client().delete("/api/articles/001_714cc25dd3f7c4d2", headers=KEY), 409,
           "last_article")
    assert (one.seeds_dir / "001_714cc25dd3f7c4d2.txt").exists()

    seen |= _overload_codes(settings)
    assert WALKED_IN_WRITE_TESTS <= seen, WALKED_IN_WRITE_TESTS - seen


# --------------------------------------------------------------------------- overload

class SlowSearcher(WrappedSearcher):
    def __init__(self, inner, seconds):
        super().__init__(inner)
        self.seconds = seconds

    def ask(self, question, k=5, filters=None, mode="hybrid"):
        time.sleep(self.seconds)
        return self.inner.ask(question, k=k, filters=filters)


def _burst(app, n: int) -> list:
    results = []
    with serve_in_thread(app) as url:
        def one():
            t0 = time.monotonic()
            try:
                r = requests.get(url + "/api/ask", params={"q": "Gaza ceasefire"}, timeout=20)
                results.append((r.status_code, r.headers.get("Retry-After"), r.json(), time.monotonic() - t0))
            except requests.RequestException as exc:  # pragma: no cover - a failure the test reports
                results.append((None, None, repr(exc), time.monotonic() - t0))

        threads = [threading.Thread(target=one) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        after = requests.get(url + "/api/ask", params={"q": "Gaza"}, timeout=20)
    return results, after


def _overload_codes(settings) -> set[str]:
    """Burst a slow app with a short queue: the excess gets 503 overloaded at once, nobody hangs."""
    from qa_service.retrieval import Searcher

    inner = Searcher(settings, embedder=FakeEmbedder())
    app = create_app(settings.with_(max_queue=2, queue_timeout=0.5), searcher=SlowSearcher(inner, 0.3))
    results, after = _burst(app, 12)
    statuses = [r[0] for r in results]
    assert len(results) == 12 and None not in statuses, results
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    for status, retry_after, body, seconds in results:
        assert seconds < 10  # nobody waits without end
        if status == 503:
            assert body == {"ok": False, "error": {"code": "overloaded",
                                                   "message": "The service is busy; try again in a moment."}}
            assert retry_after == "1"
    assert after.status_code == 200  # and it recovers at once
    return {"overloaded"}


def test_overload_is_answered_with_503_not_a_hang(settings):
    assert _overload_codes(settings) == {"overloaded"}


# --------------------------------------------------------------------------- reloads

def test_a_new_build_is_picked_up_and_in_flight_requests_finish_on_the_old_one(settings):
    embedder = FakeEmbedder()
    gate, entered = threading.Event(), threading.Event()
    loads = []

    class Gated(WrappedSearcher):
        def ask(self, question, k=5, filters=None, mode="hybrid"):
            if question == "hold":
                entered.set()
                assert gate.wait(10)
            return self.inner.ask(question, k=k, filters=filters)

    def load():
        loads.append(Gated(Searcher(settings, embedder=embedder)))
        return loads[-1]

    app = create_app(settings.with_(reload_interval=0.05), load_searcher=load)
    state = app.extensions["qa_service"]
    client = app.test_client()
    old = state.searcher
    held = {}
    thread = threading.Thread(target=lambda: held.update(r=app.test_client().get("/api/ask?q=hold&k=1")))
    thread.start()
    assert entered.wait(10)

    # another process publishes a new build (here: the write path used directly, as `qa-service index` would)
    result = put_article(settings, "flamingo-1", ARTICLE.encode(), embedder=FakeEmbedder())
    time.sleep(0.1)
    deadline = time.monotonic() + 10
    while state.searcher is old:  # requests trigger the check; the load runs in the background
        assert client.get("/healthz").status_code == 200
        assert time.monotonic() < deadline, "the new build was not picked up"
        time.sleep(0.05)
    assert state.searcher.manifest["build_id"] == result.build_id and state.reloads == 1
    assert client.get("/api/articles/flamingo-1").status_code == 200

    gate.set()  # the request that started on the old searcher finishes on it, successfully
    thread.join(10)
    assert held["r"].status_code == 200 and held["r"].get_json()["results"]
    assert {h["citation"]["article_id"] for h in held["r"].get_json()["results"]} <= {a.id for a in old.articles()}
    assert len(loads) == 2  # one at start, one reload: the check ran at most once per interval


def test_a_broken_new_build_is_not_swapped_in(settings, caplog):
    app = make_app(settings.with_(reload_interval=0.0))
    state = app.extensions["qa_service"]
    client = app.test_client()
    served = state.searcher.manifest["build_id"]
    broken = settings.index_dir / "builds" / "broken-build"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    write_text_atomically(settings.index_dir / "CURRENT", "broken-build\n")
    with caplog.at_level(logging.ERROR):
        assert state.reload() is False
    assert "not switching to index build broken-build" in caplog.text
    assert state.searcher.manifest["build_id"] == served
    assert client.post("/api/ask", json={"question": "Gaza"}).status_code == 200


# --------------------------------------------------------------------------- HTML and process safety

def test_html_has_a_strict_csp_and_no_inline_script(settings):
    import re

    client = make_app(settings).test_client()
    first = load_articles(settings.seeds_dir).articles[0].id
    pages = [client.get(p) for p in ("/", "/?q=Gaza+ceasefire", "/articles", f"/articles/{first}?start=0&end=20",
                                     "/articles/nope", "/?q=", "/nope")]
    for r in pages:
        assert r.mimetype == "text/html" or r.status_code == 404
        csp = r.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert "Set-Cookie" not in r.headers
        html = r.get_data(as_text=True)
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html, re.I)  # no inline script
        assert not re.search(r"\son[a-z]+\s*=", html, re.I)  # no inline event handlers
        assert not re.search(r"\sstyle\s*=", html, re.I) and "javascript:" not in html.lower()
    templates = Path(__file__).resolve().parent.parent / "qa_service" / "web" / "templates"
    for path in templates.glob("*.html"):
        text = path.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", text, re.I) and not re.search(r"\son[a-z]+\s*=", text)
    assert make_app(settings).config["SESSION_COOKIE_HTTPONLY"] is True


def test_flask_debug_mode_is_refused(settings, monkeypatch):
    monkeypatch.setenv("FLASK_DEBUG", "1")
    with pytest.raises(DebugRefused):
        make_app(settings)


# --------------------------------------------------------------------------- metadata

def test_an_article_written_with_metadata_is_stored_losslessly_as_markdown(settings):
    """POST /api/articles with metadata stores <id>.md (front matter + body): a rebuild from the folder reads the
    same article, the text served is byte-identical to the text read back from the file, and citations slice it;
    replacing it without metadata (or the reverse) leaves exactly one file."""
    from qa_service.ingest import read_file
    from qa_service.ingest.common import LoadReport

    client = make_app(settings).test_client()
    body_text = ("The flamingo parade in Tehran drew ten thousand zebras, the organisers said.\n\n"
                 "The zebras walked from Azadi Square to the bazaar, where traders sold them carrots: \"fresh\", "
                 "they said — ünïcode and all.\n")
    meta = {"title": "Flamingos: a parade: of zebras", "date": "2025-03-01",
            "source_url": "https://news.example.com/flamingo?id=1&x=#y", "outlet": "Tehran Times",
            "author": "O'Brien, \"Pat\""}
    r = client.post("/api/articles", json={"id": "flamingo-1", "text": body_text, **meta}, headers=KEY)
    assert r.status_code == 201, r.get_json()
    stored = r.get_json()["article"]
    assert stored == {"id": "flamingo-1", "source": "flamingo-1.md", "title": meta["title"],
                      "title_from": "metadata", "date": "2025-03-01", "source_url": meta["source_url"],
                      "outlet": "Tehran Times", "author": meta["author"], "story": "flamingo-1",
                      "url": "/articles/flamingo-1"}
    path = settings.seeds_dir / "flamingo-1.md"
    assert path.read_text(encoding="utf-8").startswith("---\n") and not (settings.seeds_dir / "flamingo-1.txt").exists()
    served = client.get("/api/articles/flamingo-1").get_json()
    assert {k: served[k] for k in stored if k != "url"} == {k: v for k, v in stored.items() if k != "url"}
    report = LoadReport()
    (reread,) = read_file(path, path.name, report)
    assert reread.text.encode("utf-8") == served["text"].encode("utf-8")  # byte-identical
    assert served["text"] == body_text.strip()
    rebuilt = {a.id: a for a in load_articles(settings.seeds_dir).articles}["flamingo-1"]
    assert (rebuilt.title, rebuilt.date, rebuilt.source_url, rebuilt.outlet, rebuilt.author, rebuilt.text) == (
        meta["title"], meta["date"], meta["source_url"], meta["outlet"], meta["author"], served["text"])
    assert _folder_and_index_agree(settings)
    hits = client.post("/api/ask", json={"question": "flamingo parade zebras carrots", "k": 3}).get_json()["results"]
    assert hits[0]["citation"]["article_id"] == "flamingo-1"
    for hit in hits:
        c = hit["citation"]
        text = client.get(f"/api/articles/{c['article_id']}").get_json()["text"]
        assert text[c["start"]:c["end"]] == hit["text"]
        if c["article_id"] == "flamingo-1":
            assert (c["source_url"], c["outlet"]) == (meta["source_url"], "Tehran Times")

    same = client.post("/api/articles", json={"id": "flamingo-1", "text": body_text, **meta}, headers=KEY)
    assert same.get_json()["action"] == "unchanged"
    plain = client.post("/api/articles", json={"id": "flamingo-1", "text": ARTICLE}, headers=KEY)
    assert plain.status_code == 200 and plain.get_json()["action"] == "replaced"
    assert plain.get_json()["article"]["source"] == "flamingo-1.txt" and plain.get_json()["article"]["outlet"] is None
    assert sorted(p.name for p in settings.seeds_dir.glob("flamingo-1.*")) == ["flamingo-1.txt"]
    back = client.post("/api/articles", json={"id": "flamingo-1", "text": body_text, "url": meta["source_url"]},
                       headers=KEY)
    assert back.get_json()["article"]["source_url"] == meta["source_url"]
    assert sorted(p.name for p in settings.seeds_dir.glob("flamingo-1.*")) == ["flamingo-1.md"]
    assert _folder_and_index_agree(settings)
    r = client.delete("/api/articles/flamingo-1", headers=KEY)
    assert r.status_code == 200 and not list(settings.seeds_dir.glob("flamingo-1.*"))
    assert not list(settings.seeds_dir.glob(".*"))


def test_an_id_that_a_markdown_file_would_not_keep_is_refused_with_metadata(settings):
    client = make_app(settings).test_client()
    r = client.post("/api/articles", json={"id": "a--b", "text": ARTICLE, "title": "T"}, headers=KEY)
    assert_error_shape(r, 400, "article_id_invalid")
    assert "'--'" in r.get_json()["error"]["message"] and not list(settings.seeds_dir.glob("a--b.*"))
