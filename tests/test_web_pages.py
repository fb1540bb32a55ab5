"""The HTML form and article pages, rendered by Flask's test client (the browser tests drive Chromium)."""

from __future__ import annotations

import html
import re
import subprocess
import sys

import pytest
from markupsafe import escape

from qa_service.ingest import lead_title
from qa_service.web import DebugRefused, create_app
from qa_service.web.pages import answer_span, nice_date, passage_parts

from .support.web_apps import FailingSearcher, ModeSearcher, NoModeSearcher

QUESTION = "What did Pezeshkian say about rebuilding Gaza?"
HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}


@pytest.fixture(scope="module")
def app(fake_index, fake_searcher):
    return create_app(fake_index, searcher=NoModeSearcher(fake_searcher))


@pytest.fixture()
def client(app):
    return app.test_client()


def _no_inline_code(page: str) -> None:
    assert "<script" not in page.lower()
    assert not re.search(r"\sstyle\s*=", page, re.I)
    assert not re.search(r"\son[a-z]+\s*=", page, re.I)
    assert "<style" not in page.lower()


def _passages(page: str) -> list[str]:
    """The passage texts on an answer page, as a reader sees them (answer marks removed)."""
    blocks = re.findall(r'<blockquote class="passage"[^>]*>(.*?)</blockquote>', page, re.S)
    return [html.unescape(re.sub(r"</?mark[^>]*>", "", b)) for b in blocks]


def test_form_page(client, fake_searcher):
    r = client.get("/", headers=HTML)
    assert r.status_code == 200 and r.mimetype == "text/html"
    page = r.get_data(as_text=True)
    assert '<form class="ask" action="/" method="get"' in page
    assert 'name="q"' in page and '<button type="submit">Ask</button>' in page
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    assert "/static/style.css" in page
    for article in fake_searcher.articles():
        assert f'<option value="{article.id}"' in page
    _no_inline_code(page)
    csp = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "style-src 'self'" in csp and "unsafe-inline" not in csp
    assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["Referrer-Policy"]


def test_answer_page_shows_cited_passages(client, app):
    r = client.get("/", query_string={"q": QUESTION}, headers=HTML)
    assert r.status_code == 200
    page = r.get_data(as_text=True)
    _no_inline_code(page)
    api = app.test_client().post("/api/ask", json={"question": QUESTION}).get_json()
    assert page.count('<li class="hit">') == len(api["results"]) == 5
    assert _passages(page) == [hit["text"] for hit in api["results"]]
    for hit in api["results"]:
        c = hit["citation"]
        assert f'href="{escape(c["url"])}"' in page
        label = c["title"] or lead_title(app.test_client().get(f"/api/articles/{c['article_id']}").get_json()["text"])
        assert escape(label) in page  # the title, or the lead sentence shortened when the article has none
        assert nice_date(c["date"]) in page
        assert f'{hit["score"]:.3f}' in page
    assert f"<q>{escape(QUESTION)}</q>" in page


def test_filters_in_the_form(client, fake_searcher):
    article = fake_searcher.articles()[3]
    r = client.get("/", query_string={"q": QUESTION, "k": "3", "source": article.id, "date_from": "",
                                      "date_to": ""}, headers=HTML)
    page = r.get_data(as_text=True)
    assert r.status_code == 200 and page.count('<li class="hit">') == 3
    assert page.count(f'<a class="hit-title" href="/articles/{article.id}?start=') == 3
    assert f'<option value="{article.id}" selected>' in page
    assert "<details class=\"filters\" open>" in page


@pytest.mark.parametrize("query, message", [
    ({"q": ""}, "The question is empty"),
    ({"q": "   "}, "The question is empty"),
    ({"q": "\u200b"}, "The question is empty"),
    ({"q": "x", "k": ["3", "4"]}, "given more than once"),
    ({"q": "x" * 1001}, "too long"),
    ({"q": "x", "k": "0"}, "between 1 and 50"),
    ({"q": "x", "date_from": "2025-02-01", "date_to": "2025-01-01"}, "is after"),
    ({"q": "x", "source": "nope"}, "Unknown source"),
])
def test_form_errors_are_shown_on_the_form(client, query, message):
    r = client.get("/", query_string=query, headers=HTML)
    assert r.status_code == 400 and r.mimetype == "text/html"
    page = r.get_data(as_text=True)
    assert 'role="alert"' in page and escape(message) in page
    assert 'name="q"' in page  # the form is still there to fix the question


def test_unknown_query_parameters_do_not_break_the_form(client):
    assert client.get("/?q=Gaza&utm_source=mail", headers=HTML).status_code == 200


def test_user_input_is_escaped(client):
    evil = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'
    page = client.get("/", query_string={"q": evil}, headers=HTML).get_data(as_text=True)
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'value="&lt;script&gt;alert(1)&lt;/script&gt;&#34;&gt;&lt;img' in page
    page = client.get("/", query_string={"q": "x", "date_from": '"><script>'}, headers=HTML).get_data(as_text=True)
    assert "<script>" not in page



def test_the_notice_names_what_no_article_mentions(client):
    """A question about a name the articles never mention says so, escaped like all input."""
    page = client.get("/", query_string={"q": "What did the Turkish president and O'Callaghan say?"},
                      headers=HTML).get_data(as_text=True)
    assert "The articles may not answer this question (none of them mentions Turkish, O&#39;Callaghan)" in page
    page = client.get("/", query_string={"q": "What did Araghchi say in Doha?"}, headers=HTML).get_data(as_text=True)
    assert "none of them mentions" not in page

def test_article_page_highlights_the_cited_passage(client, app):
    hit = app.test_client().post("/api/ask", json={"question": QUESTION}).get_json()["results"][0]
    c = hit["citation"]
    r = client.get(c["url"].split("#")[0], headers=HTML)
    assert r.status_code == 200
    page = r.get_data(as_text=True)
    _no_inline_code(page)
    anchor = f"p-{c['start']}-{c['end']}"
    assert c["url"].endswith("#" + anchor)
    marked = re.search(rf'<mark id="{anchor}" class="cited">(.*?)</mark>', page, re.S)
    assert marked and html.unescape(marked.group(1)) == hit["text"]
    assert f'href="#{anchor}"' in page


def test_article_page_without_or_with_a_bad_span(client, fake_searcher):
    article = fake_searcher.articles()[0]
    for query in ("", "?start=5", "?start=x&end=9", "?start=10&end=5", f"?start=0&end={len(article.text) + 1}"):
        r = client.get(f"/articles/{article.id}{query}", headers=HTML)
        assert r.status_code == 200 and "<mark" not in r.get_data(as_text=True)
        assert escape(article.text[:60]) in r.get_data(as_text=True)


def test_article_title_falls_back_to_the_lead_sentence(client, fake_searcher):
    titled = next(a for a in fake_searcher.articles() if a.title)
    untitled = next(a for a in fake_searcher.articles() if not a.title)
    assert f"<h1>{escape(titled.title)}</h1>" in client.get(
        f"/articles/{titled.id}", headers=HTML).get_data(as_text=True)
    page = client.get(f"/articles/{untitled.id}", headers=HTML).get_data(as_text=True)
    # and it says so: the title is the lead sentence because there is no headline
    assert f'<h1 title="No headline: its first sentence">{escape(lead_title(untitled.text))}</h1>' in page
    assert f"<title>{escape(lead_title(untitled.text)[:40])}" in page


def _titles(page: str) -> list[str]:
    """What a page shows as titles: headings, the window title, links to articles and hits, the source menu."""
    found = re.findall(r"<(h1|title)[^>]*>(.*?)</\1>", page, re.S)
    texts = [t for _, t in found]
    texts += re.findall(r'<a class="(?:hit-title|article-link)"[^>]*>(.*?)</a>', page, re.S)
    texts += re.findall(r'<a href="/articles/[^"]*">(.*?)</a>', page, re.S)  # "also reported by"
    texts += re.findall(r"<option value=\"[^\"]+\"[^>]*>(.*?)</option>", page, re.S)
    return [html.unescape(t).strip() for t in texts]


def test_no_page_shows_a_file_name_as_a_title(client, fake_searcher):
    """Headline, else lead sentence: never ``000_13c1da738e689733.txt`` (or its id) where a title goes."""
    articles = fake_searcher.articles()
    names = {a.source for a in articles} | {a.id for a in articles}
    assert "000_13c1da738e689733.txt" in names
    untitled = next(a for a in articles if not a.title)
    pages = {"/": client.get("/", headers=HTML), "/articles": client.get("/articles", headers=HTML),
             "article": client.get(f"/articles/{untitled.id}", headers=HTML),
             "results": client.get("/", query_string={"q": QUESTION, "k": "10"}, headers=HTML)}
    for where, r in pages.items():
        assert r.status_code == 200, where
        titles = _titles(r.get_data(as_text=True))
        assert titles, where
        for title in titles:
            assert not any(name in title for name in names), (where, title)
    listed = _titles(pages["/articles"].get_data(as_text=True))
    for a in articles:
        assert (a.title or lead_title(a.text)) in listed


def test_also_reported_by_shows_titles_not_file_names(fake_index, fake_searcher):
    """A copy without a title is named by its lead sentence, linked to its passage, with its outlet when known."""
    class CopySearcher(NoModeSearcher):
        def ask(self, question, k=5, filters=None):
            result = super().ask(question, k=k, filters=filters)
            untitled = next(a for a in fake_searcher.articles() if not a.title)
            for hit in result["results"]:
                hit["also_reported_by"] = [{"article_id": untitled.id, "source": untitled.source, "title": None,
                                            "outlet": "Wire <Desk>", "start": 0, "end": 10, "same_story": True}]
            return result

    client = create_app(fake_index, searcher=CopySearcher(fake_searcher)).test_client()
    page = client.get("/", query_string={"q": QUESTION}, headers=HTML).get_data(as_text=True)
    untitled = next(a for a in fake_searcher.articles() if not a.title)
    href = escape(f"/articles/{untitled.id}?start=0&end=10#p-0-10")  # the copy's own passage, highlighted
    assert f'<a href="{href}">{escape(lead_title(untitled.text))}</a> (Wire &lt;Desk&gt;)' in page
    assert f">{untitled.source}<" not in page.split('class="also"', 1)[1].split("</p>", 1)[0]


def test_articles_page_lists_everything(client, fake_searcher):
    page = client.get("/articles", headers=HTML).get_data(as_text=True)
    for article in fake_searcher.articles():
        assert f'href="/articles/{article.id}"' in page


def test_articles_page_is_paged_newest_first(client, fake_searcher, monkeypatch):
    from qa_service.web import pages

    monkeypatch.setattr(pages, "ARTICLES_PER_PAGE", 2)
    everything = fake_searcher.catalog()
    newest_first = sorted(everything, key=lambda a: (a.date or "", a.id), reverse=True)
    n_pages = -(-len(everything) // 2)
    assert n_pages >= 2
    seen = []
    for page in range(1, n_pages + 1):
        text = client.get(f"/articles?page={page}", headers=HTML).get_data(as_text=True)
        seen += re.findall(r'class="article-link" href="/articles/([^"]+)"', text)
        assert f"Page {page} of {n_pages}" in text and f"{len(everything)} articles" in text
        assert ('rel="next"' in text) == (page < n_pages) and ('rel="prev"' in text) == (page > 1)
    assert seen == [a.id for a in newest_first]
    last = client.get(f"/articles?page={n_pages}", headers=HTML).get_data(as_text=True)
    assert client.get("/articles?page=999", headers=HTML).get_data(as_text=True) == last
    first = client.get("/articles", headers=HTML).get_data(as_text=True)
    for bad in ("0", "-1", "abc", "1e3"):
        r = client.get(f"/articles?page={bad}", headers=HTML)
        assert r.status_code == 200 and r.get_data(as_text=True) == first


def test_a_large_archive_gets_a_source_field_not_a_menu(client, fake_searcher, monkeypatch):
    """Above SOURCE_MENU_LIMIT articles the form does not list them all: the source is typed (id or file name)."""
    from qa_service.web import pages

    monkeypatch.setattr(pages, "SOURCE_MENU_LIMIT", 1)
    page = client.get("/", headers=HTML).get_data(as_text=True)
    assert '<input type="text" name="source"' in page and '<select name="source">' not in page
    article = fake_searcher.articles()[0]
    assert f'<option value="{article.id}"' not in page
    r = client.get("/", query_string={"q": QUESTION, "source": article.source}, headers=HTML)
    text = r.get_data(as_text=True)
    assert r.status_code == 200 and f'value="{article.source}"' in text
    assert set(re.findall(r'href="/articles/([^"?#]+)\?start=', text)) == {article.id}
    r = client.get("/", query_string={"q": QUESTION, "source": "<nope>"}, headers=HTML)
    assert r.status_code == 400 and "Unknown source" in r.get_data(as_text=True)
    assert "<nope>" not in r.get_data(as_text=True)


def test_html_errors_render_the_error_template(client):
    r = client.get("/articles/nope", headers=HTML)
    assert r.status_code == 404 and r.mimetype == "text/html"
    page = r.get_data(as_text=True)
    assert "<code>article_not_found</code>" in page and "There is no article with id" in page
    r = client.get("/no/such/page", headers=HTML)
    assert r.status_code == 404 and "<code>not_found</code>" in r.get_data(as_text=True)
    r = client.post("/", headers=HTML)
    assert r.status_code == 405 and "<code>method_not_allowed</code>" in r.get_data(as_text=True)
    # the same address asked by a program gets the JSON shape
    r = client.get("/no/such/page", headers={"Accept": "application/json"})
    assert r.get_json()["error"]["code"] == "not_found"


def test_unexpected_errors_render_a_generic_error_page(fake_index, fake_searcher):
    app = create_app(fake_index, searcher=FailingSearcher(fake_searcher, RuntimeError("/srv/secret.db is gone")))
    r = app.test_client().get("/", query_string={"q": "x"}, headers=HTML)
    assert r.status_code == 500 and r.mimetype == "text/html"
    page = r.get_data(as_text=True)
    assert "<code>internal_error</code>" in page and "secret" not in page and "Traceback" not in page


def test_static_css_is_served(client):
    r = client.get("/static/style.css")
    assert r.status_code == 200 and r.mimetype == "text/css"
    css = r.get_data(as_text=True)
    assert ":target" in css and "@media" in css


# --------------------------------------------------------------------------- answers inside passages

def _hit(text="One. Two sentences here. Three.", start=100, answer=None):
    hit = {"text": text, "citation": {"start": start, "end": start + len(text)}}
    if answer is not None:
        hit["answer"] = answer
    return hit


def test_answer_span_article_relative_passage_relative_or_by_text():
    assert answer_span(_hit()) is None
    assert answer_span(_hit(answer={"text": "Two sentences here.", "start": 105, "end": 124})) == (5, 24)
    assert answer_span(_hit(answer={"text": "Two sentences here.", "start": 5, "end": 24})) == (5, 24)
    assert answer_span(_hit(answer={"text": "Two sentences here."})) == (5, 24)
    assert answer_span(_hit(answer={"text": "Elsewhere.", "start": 1, "end": 3})) is None
    assert answer_span(_hit(answer="not a dict")) is None
    assert passage_parts(_hit(answer={"text": "Three.", "start": 125, "end": 131})) == [
        ("One. Two sentences here. ", False), ("Three.", True), ("", False)]


def test_answer_sentence_and_extras_are_rendered(fake_index, fake_searcher):
    client = create_app(fake_index, searcher=ModeSearcher(fake_searcher)).test_client()
    page = client.get("/", query_string={"q": QUESTION}, headers=HTML).get_data(as_text=True)
    assert page.count('<mark class="answer">') == 5
    assert "Another &lt;b&gt;outlet&lt;/b&gt;" in page  # extras are escaped too
    assert '<select name="mode">' in page  # the searcher takes a mode, so the form offers one


def test_debug_mode_is_refused(fake_index, fake_searcher, monkeypatch):
    monkeypatch.setenv("FLASK_DEBUG", "1")
    with pytest.raises(DebugRefused):
        create_app(fake_index, searcher=fake_searcher)


def test_importing_the_web_layer_loads_neither_torch_nor_faiss():
    code = ("import sys, qa_service.web, qa_service.web.api, qa_service.web.pages, qa_service.web.server; "
            "print(sorted(m for m in ('torch', 'faiss', 'sentence_transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
