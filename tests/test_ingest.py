"""Ingest: metadata of every seed, boilerplate removal, unreadable files reported by name."""

from __future__ import annotations

import logging

import pytest

from qa_service.ingest import clean_article, load_articles

from .support.paths import SEEDS

EXPECTED = {
    "000_13c1da738e689733": (None, "2025-01-31", "A senior delegation from the Palestinian group Hamas"),
    "001_714cc25dd3f7c4d2": (None, None, "Iran’s Foreign Minister praised the legendary resilience"),
    "002_043a94255de812b2": ('Hamas Haniyeh and Iran\'s Foreign Minister discuss efforts to stop the "genocide" in Gaza',
                             "2024-06-20", "The head of the Hamas political bureau, Ismail Haniyeh"),
    "003_ef52944349a1f149": (None, "2025-02-09", "President Pezeshkian made the remark"),
    "004_9aeb4bd2e5102b83": (None, "2025-01-31", "Iran’s Foreign Minister Abbas Araqchi met with Hamas leaders"),
}


def test_every_seed_metadata(seed_articles):
    assert {a.id for a in seed_articles} == set(EXPECTED)
    for article in seed_articles:
        title, date, opening = EXPECTED[article.id]
        assert article.source == article.id + ".txt"
        assert article.title == title
        assert article.date == date
        assert article.text.startswith(opening)
        assert len(article.content_hash) == 64


def test_no_metadata_or_boilerplate_in_text(seed_articles):
    for article in seed_articles:
        text = article.text
        assert "date 20" not in text
        assert "Jerusalem Time" not in text
        assert "Share your opinion" not in text
        assert not text.rstrip().endswith("MNA")
        assert text == text.strip()
        if article.title:
            assert article.title not in text  # the headline is metadata, not body
    by_id = {a.id: a for a in seed_articles}
    assert by_id["003_ef52944349a1f149"].text.endswith("liberate the Palestinian land.")
    assert by_id["002_043a94255de812b2"].text.endswith('according to the statement.')


def test_curly_quotes_are_kept_as_written(seed_articles):
    by_id = {a.id: a for a in seed_articles}
    assert "Iran’s" in by_id["001_714cc25dd3f7c4d2"].text
    assert "“war of annihilation”" in by_id["002_043a94255de812b2"].text


def test_dateline_variants():
    a = clean_article("Mon 3 February 2025 10:05 am - Gaza Time\n\nA headline here\n\nBody text.", "x", "x.txt")
    assert (a.date, a.title, a.text) == ("2025-02-03", "A headline here", "Body text.")
    b = clean_article("date 2024-12-01 Body starts here. More.\n\nAFP\n", "y", "y.txt")
    assert (b.date, b.title, b.text) == ("2024-12-01", None, "Body starts here. More.")


def test_bad_files_are_reported_by_name_not_fatal(tmp_path, caplog):
    (tmp_path / "good.txt").write_text("date 2025-01-01 Some real text.", encoding="utf-8")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_bytes(b"  \n\n ")
    (tmp_path / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    (tmp_path / "latin.txt").write_bytes("Caf\xe9 owners said it.".encode("cp1252"))
    (tmp_path / "only-boilerplate.txt").write_text("Share your opinion\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        report = load_articles(tmp_path)
    assert [a.id for a in report.articles] == ["good", "latin"]
    assert report.articles[1].text == "Café owners said it."
    skipped = dict(report.skipped)
    assert set(skipped) == {"empty.txt", "blank.txt", "binary.txt", "only-boilerplate.txt"}
    assert "binary" in skipped["binary.txt"]
    assert dict(report.warnings)["latin.txt"].startswith("not UTF-8")
    for name in ("empty.txt", "binary.txt", "latin.txt"):
        assert name in caplog.text


def test_missing_folder_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_articles(tmp_path / "nope")


def test_seeds_are_the_shared_ones():
    from .support.paths import SHARED

    shared = SHARED / "seeds"
    if not shared.is_dir():
        pytest.skip("../shared is not beside the repo")
    for path in shared.glob("*.txt"):
        assert (SEEDS / path.name).read_bytes() == path.read_bytes()
    assert len(list(SEEDS.glob("*.txt"))) == len(list(shared.glob("*.txt"))) == 5
