"""The form in a real browser: Debian's Chromium driven by Playwright (no `playwright install`).

Without /usr/bin/chromium these tests skip locally and fail under CI (env CI set).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from qa_service.web import create_app

from .support.web_apps import serve_in_thread

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("QA_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
QUESTION = "What did Pezeshkian say about rebuilding Gaza?"


def _chromium_or_skip() -> str:
    path = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if path:
        return path
    message = f"Chromium not found at {CHROMIUM} (apt-get install -y chromium)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def base_url(fake_index, fake_searcher):
    with serve_in_thread(create_app(fake_index, searcher=fake_searcher)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    executable = _chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 800}, color_scheme="light")
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.dialogs = []
    page.console_errors = []
    page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
    page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
    page.on("pageerror", lambda e: page.console_errors.append(str(e)))
    yield page
    context.close()


def test_ask_then_follow_the_citation_to_the_highlighted_passage(page, base_url, fake_searcher):
    page.goto(base_url + "/")
    page.fill("#q", QUESTION)
    page.click("button[type=submit]")
    page.wait_for_selector("li.hit")
    assert "q=What+did+Pezeshkian" in page.url  # a plain GET form: no JavaScript involved
    first = page.locator("li.hit").first
    passage = first.locator("blockquote.passage").text_content()
    assert passage and len(passage) > 40
    title = first.locator("a.hit-title").inner_text()
    assert title  # the article title, or its lead sentence shortened: never its file name or id
    assert not any(name in title for a in fake_searcher.articles() for name in (a.source, a.id))
    href = first.locator("a.cite-link").get_attribute("href")
    anchor = href.split("#", 1)[1]
    assert anchor.startswith("p-")

    first.locator("a.cite-link").click()
    page.wait_for_url(f"**/articles/**#{anchor}")
    mark = page.locator(f"mark#{anchor}")
    assert mark.count() == 1 and mark.is_visible()
    assert mark.text_content() == passage
    assert page.evaluate("document.querySelector(':target') && document.querySelector(':target').id") == anchor
    # the :target rule is the strong highlight, and the fragment scrolled the passage into view
    target_bg = mark.evaluate("m => { m.getAnimations().forEach(a => a.finish()); "
                              "return getComputedStyle(m).backgroundColor; }")
    assert target_bg == "rgb(255, 213, 74)"
    top = mark.evaluate("m => m.getBoundingClientRect().top")
    assert 0 <= top < page.viewport_size["height"]
    assert page.locator("h1").inner_text() == title
    assert page.dialogs == [] and page.console_errors == []  # nothing blocked by the CSP either


@pytest.mark.parametrize("question", ["<script>alert(1)</script>", '"><img src=x onerror=alert(2)>'])
def test_markup_in_a_question_is_shown_as_text_and_runs_nothing(page, base_url, question):
    page.goto(base_url + "/")
    page.fill("#q", question)
    page.click("button[type=submit]")
    page.wait_for_selector("section.results")
    assert page.locator("#results-heading q").inner_text() == question
    assert page.input_value("#q") == question
    assert page.locator("section.results img").count() == 0
    page.wait_for_timeout(300)
    assert page.dialogs == []
    assert page.title().startswith(question[:20])


def test_empty_question_shows_a_message(page, base_url):
    page.goto(base_url + "/?q=+")
    assert "The question is empty" in page.locator("[role=alert]").inner_text()


def test_phone_width_has_no_sideways_scrolling(browser, base_url):
    context = browser.new_context(viewport={"width": 360, "height": 740}, is_mobile=True, has_touch=True)
    page = context.new_page()
    try:
        for path in ["/", "/?q=" + QUESTION.replace(" ", "+"), "/articles", "/articles/002_043a94255de812b2"]:
            page.goto(base_url + path)
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 360, (path, width)
        page.goto(base_url + "/?q=Gaza")
        box = page.locator("button[type=submit]").bounding_box()
        assert box["width"] > 200  # the button spans the narrow screen
    finally:
        context.close()
