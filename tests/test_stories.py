"""Syndicated copies fold into one result: passages of articles that share a ``story`` are one hit, the copies
listed under ``also_reported_by`` with their own exact citations, at every ``k``."""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from qa_service import answer
from qa_service.config import Settings
from qa_service.ingest import load_articles
from qa_service.retrieval import Searcher
from qa_service.store import build_index

from .support.fakes import FakeEmbedder
from .support.paths import SEEDS

QUESTION = "Which Hamas Shura Council head led the delegation that met Araghchi in Doha?"


def _copy_of(text: str) -> str:
    """The same wire story as another outlet runs it: a new first line and a few words changed."""
    return ("By Staff Writers\n\n" + text.replace("on Thursday", "on Thursday evening")
            .replace("latest developments", "most recent developments"))


@pytest.fixture(scope="module")
def wire_folder(tmp_path_factory):
    """The seeds plus a copy of seed 000 carried by another outlet (a near-duplicate: the same story)."""
    root = tmp_path_factory.mktemp("wire")
    folder = root / "articles"
    shutil.copytree(SEEDS, folder)
    original = (SEEDS / "000_13c1da738e689733.txt").read_text(encoding="utf-8")
    (folder / "copy_of_000.txt").write_text(_copy_of(original), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def wire(wire_folder):
    """A searcher over the folder whose backend hands out each article's ``story`` as ingest found it."""
    articles = load_articles(wire_folder / "articles").articles
    settings = Settings(index_dir=wire_folder / "index", seeds_dir=wire_folder / "articles", model=FakeEmbedder.name)
    build_index(articles, FakeEmbedder(), settings)
    searcher = Searcher(settings, embedder=FakeEmbedder())
    stories = {a.id: a.story for a in articles}
    return searcher, stories


@pytest.fixture
def with_stories(wire, monkeypatch):
    """The backend's ``article_info`` carrying the stories (``None`` for none: each article its own story)."""
    searcher, stories = wire
    plain = searcher.backend.article_info

    def carry(given):
        monkeypatch.setattr(searcher.backend, "article_info",
                            lambda aid: dataclasses.replace(plain(aid), story=given.get(aid)))
    return searcher, stories, carry


@pytest.fixture
def no_same_fact(monkeypatch):
    """Turn the same-fact grouping off, so that only the story rule can fold the copy."""
    monkeypatch.setattr(answer, "SAME_FACT_COSINE", 2.0)


def _story_of(stories, hit_or_entry) -> str:
    aid = hit_or_entry["citation"]["article_id"] if "citation" in hit_or_entry else hit_or_entry["article_id"]
    return stories[aid] or aid


def test_ingest_finds_the_copy_and_keeps_own_words_apart(wire):
    _, stories = wire
    assert stories["copy_of_000"] == stories["000_13c1da738e689733"]
    assert len({stories[a] for a in stories if a != "copy_of_000"}) == len(stories) - 1  # 000 and 004 stay apart


@pytest.mark.parametrize("k", [1, 2, 5])
def test_copies_fold_into_one_result_at_every_k(with_stories, no_same_fact, k):
    searcher, stories, carry = with_stories
    carry(stories)
    results = [h.to_dict() for h in searcher.search(QUESTION, k=k)]
    assert 1 <= len(results) <= k
    top = results[0]
    assert {top["citation"]["article_id"], *(o["article_id"] for o in top["also_reported_by"])} \
        >= {"000_13c1da738e689733", "copy_of_000"}
    copies = [o for o in top["also_reported_by"] if o.get("same_story")]
    assert [o["article_id"] for o in copies] in (["copy_of_000"], ["000_13c1da738e689733"])
    story_results = [_story_of(stories, h) for h in results]
    for story in set(story_results):  # never two results of one story from different articles
        assert len({h["citation"]["article_id"] for h in results if _story_of(stories, h) == story}) == 1


def test_without_the_story_rule_the_copy_is_a_result_of_its_own(with_stories, no_same_fact):
    searcher, _stories, carry = with_stories
    carry({})
    ids = [h.citation.article_id for h in searcher.search(QUESTION, k=2)]
    assert set(ids) == {"000_13c1da738e689733", "copy_of_000"}


def test_other_results_keep_their_order_and_scores(with_stories, no_same_fact):
    searcher, stories, carry = with_stories
    carry({})
    plain = [h.to_dict() for h in searcher.search(QUESTION, k=10)]
    carry(stories)
    folded = [h.to_dict() for h in searcher.search(QUESTION, k=10)]
    copies: dict[str, dict] = {}  # copy -> its first entry (a copy's later passages go under later results)
    for o in (o for h in folded for o in h["also_reported_by"] if o.get("same_story")):
        copies.setdefault(o["article_id"], o)
    kept = [h for h in plain if h["citation"]["article_id"] not in copies]
    assert [(h["citation"]["article_id"], h["citation"]["start"], h["score"]) for h in kept] \
        == [(h["citation"]["article_id"], h["citation"]["start"], h["score"]) for h in folded[:len(kept)]]
    assert [h["rank"] for h in folded] == list(range(1, len(folded) + 1))
    # the copy listed is the copy's best passage, the one that was its first result before
    first = next(h for h in plain if h["citation"]["article_id"] in copies)
    entry = copies[first["citation"]["article_id"]]
    assert (entry["start"], entry["end"], entry["score"]) == (first["citation"]["start"], first["citation"]["end"],
                                                              first["score"])


def test_copy_citations_slice_exactly(with_stories):
    searcher, stories, carry = with_stories
    carry(stories)
    hits = searcher.search(QUESTION, k=1)
    entries = hits[0].extra["also_reported_by"]
    assert any(e.get("same_story") for e in entries)
    for e in entries:
        text = searcher.article(e["article_id"]).text
        assert text[e["start"]:e["end"]] == e["text"]
        assert text[e["answer"]["start"]:e["answer"]["end"]] == e["answer"]["text"]
        assert {"article_id", "title", "date", "start", "end", "outlet", "source_url"} <= set(e)


def test_seeds_alone_fold_nothing(fake_searcher, seed_articles, monkeypatch):
    """The seeds hold no copies (000 and 004 report one meeting in their own words): stories change no result."""
    plain_info = fake_searcher.backend.article_info
    before = [h.to_dict() for h in fake_searcher.search("Araghchi met Hamas in Doha", k=5)]
    stories = {a.id: a.story for a in seed_articles}
    monkeypatch.setattr(fake_searcher.backend, "article_info",
                        lambda aid: dataclasses.replace(plain_info(aid), story=stories.get(aid)))
    after = [h.to_dict() for h in fake_searcher.search("Araghchi met Hamas in Doha", k=5)]
    assert after == before


def test_each_entry_says_whether_it_is_a_copy_or_the_same_fact(with_stories):
    """With the same-fact grouping on, the copy is listed as a copy; any other outlet listed is the same fact."""
    searcher, stories, carry = with_stories
    carry(stories)
    for hit in searcher.search(QUESTION, k=5):
        for entry in hit.extra["also_reported_by"]:
            copy = (stories[entry["article_id"]] or entry["article_id"]) == \
                (stories[hit.citation.article_id] or hit.citation.article_id)
            assert entry["same_story"] is copy


@pytest.mark.slow
def test_with_the_real_model_the_copy_folds_at_k1(wire_folder, real_embedder, monkeypatch):
    """The shipped model ranks the two copies side by side; the result is one, the copy under it, sliced exactly."""
    articles = load_articles(wire_folder / "articles").articles
    stories = {a.id: a.story for a in articles}
    settings = Settings(index_dir=wire_folder / "real-index", seeds_dir=wire_folder / "articles")
    build_index(articles, real_embedder, settings)
    searcher = Searcher(settings, embedder=real_embedder)
    plain = searcher.backend.article_info
    monkeypatch.setattr(searcher.backend, "article_info",
                        lambda aid: dataclasses.replace(plain(aid), story=stories.get(aid)))
    for k in (1, 5):
        result = searcher.ask("Who led the Hamas delegation that met Araghchi in Doha?", k=k)
        hits = result["results"]
        assert len(hits) <= k
        ids = {hits[0]["citation"]["article_id"], *(o["article_id"] for o in hits[0]["also_reported_by"]
                                                    if o["same_story"])}
        assert ids == {"000_13c1da738e689733", "copy_of_000"}
        assert len({stories[h["citation"]["article_id"]] for h in hits}) == len(
            {h["citation"]["article_id"] for h in hits})  # no two articles of one story among the results
        for entry in (o for h in hits for o in h["also_reported_by"]):
            text = searcher.article(entry["article_id"]).text
            assert text[entry["start"]:entry["end"]] == entry["text"]
            # 004 reports the same meeting in its own words: never a copy (at most the same fact)
            assert not (entry["article_id"] == "004_9aeb4bd2e5102b83" and entry["same_story"])
