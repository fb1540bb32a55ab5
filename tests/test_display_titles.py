"""The title shown for an article: its headline, else its lead sentence shortened, never its file name or id."""

from __future__ import annotations

import dataclasses

from click.testing import CliRunner

import qa_service.retrieval
from qa_service.cli import cli
from qa_service.ingest import UNTITLED, lead_title


def test_display_title_is_the_headline_else_the_lead(fake_searcher):
    for article in fake_searcher.articles():
        expected = article.title or lead_title(article.text)
        assert fake_searcher.display_title(article.id) == expected
        assert fake_searcher.display_title(article) == expected  # from the text or from the index: one title
        assert fake_searcher.display_title(fake_searcher.article_info(article.id)) == expected
        assert article.source not in expected and article.id not in expected


def test_an_article_without_any_sentence_is_untitled(fake_index, fake_embedder, monkeypatch):
    from qa_service.retrieval import Searcher

    searcher = Searcher(fake_index, embedder=fake_embedder)  # its own memory of titles
    info = dataclasses.replace(next(a for a in searcher.catalog() if not a.title), lead_title=None)
    monkeypatch.setattr(searcher.backend, "lead", lambda article_id: "")
    assert searcher.display_title(info) == UNTITLED


def test_ask_prints_titles_not_file_names(fake_searcher, monkeypatch):
    monkeypatch.setattr(qa_service.retrieval, "Searcher", lambda settings: fake_searcher)
    result = CliRunner().invoke(cli, ["ask", "Who met Iran's foreign minister in Doha?", "-k", "5"])
    assert result.exit_code == 0, result.output
    heads = [line for line in result.output.splitlines() if line[:1].isdigit() and ". [" in line]
    assert len(heads) == 5
    names = {a.source for a in fake_searcher.articles()}
    titles = {a.title or lead_title(a.text) for a in fake_searcher.articles()}
    for head in heads:
        shown = head.split("] ", 1)[1]
        assert shown in titles and not any(name in shown for name in names)
    for line in result.output.splitlines():
        if "also reported by" in line:
            assert not any(name in line for name in names)
