"""Ingest: metadata of every seed, boilerplate removal, unreadable files reported by name."""

from __future__ import annotations

import logging
import re

import pytest

from qa_service.ingest import clean_article, load_articles

from .support.paths import SEEDS

EXPECTED = {
    "000_13c1da738e689733": (None, "2025-01-31", "A senior delegation from the Palestinian group Hamas"),
    "001_714cc25dd3f7c4d2": (None, None, "Iran’s Foreign Minister praised the legendary resilience"),
    "002_043a94255de812b2": ('Hamas Haniyeh and Iran\'s Foreign Minister discuss efforts to stop the "genocide" '
                             "in Gaza", "2024-06-20", "The head of the Hamas political bureau, Ismail Haniyeh"),
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


# What the seeds read as before the readers of other formats were added: id, source, title, date, sha256 of the
# text and of the file. Any change to the plain-text rules must leave these exactly as they are.
SEEDS_AS_READ = [
    ("000_13c1da738e689733", None, "2025-01-31", 2193,
     "b8f67dc0afaf06b8a2dab6aecb14abb59a15f4c9ca9b7c43ae4fdce489362607",
     "5e58aa39d4bd21eff7d03992bab285d4af35030fa985f0843dee1b67b99104e3"),
    ("001_714cc25dd3f7c4d2", None, None, 2771,
     "bb74a8b3f113b4f8345a56d76517c7415d0a72d836bf1d130be5a340c7f89f6b",
     "481debbd92d70644d57113f56fda784aaf514e6c688477314583e1b6b619d59e"),
    ("002_043a94255de812b2", 'Hamas Haniyeh and Iran\'s Foreign Minister discuss efforts to stop the "genocide" '
     "in Gaza", "2024-06-20", 2415, "9d4bd86765ad880617452b0be7863923415f42f84a864370d49f968b05a5d8c5",
     "ead68b08dca0f5319582968f92f1dc7c2bac2a63810411de8eeb5a7b62510131"),
    ("003_ef52944349a1f149", None, "2025-02-09", 2415,
     "006dc4728170930841620d899f1d8a09a46111e9175395465b5f3929c39b5452",
     "5d9b9421e09994fd567b8a07f55f27150b00e4eba89beb6c3e7eddcae2260960"),
    ("004_9aeb4bd2e5102b83", None, "2025-01-31", 1985,
     "b676bd5aa7ed5673e8409cf117f4c88141d68e78c705f82b4ba68c8ecff4b444",
     "5608a8277696ffde48f6f98a795ecb0d4613b8b7ca4c28b50889c11c8bdf0b20"),
]


def test_seeds_read_byte_for_byte_as_before():
    import hashlib

    report = load_articles(SEEDS)
    assert not report.skipped and not report.warnings
    got = [(a.id, a.title, a.date, len(a.text), hashlib.sha256(a.text.encode()).hexdigest(), a.content_hash)
           for a in report.articles]
    assert got == SEEDS_AS_READ
    for article in report.articles:
        assert article.source == article.id + ".txt"
        assert (article.source_url, article.outlet, article.author) == (None, None, None)
        assert article.title_from == ("headline" if article.title else "lead")


def test_the_id_rule_is_the_one_writes_check():
    from qa_service.articles import ARTICLE_ID
    from qa_service.ingest import ARTICLE_ID as OURS

    assert OURS.pattern == ARTICLE_ID.pattern and OURS.flags == ARTICLE_ID.flags


def test_a_first_short_line_is_the_headline_and_stamps_are_dates():
    a = clean_article("Floods hit the north\n\nPublished 2025-03-14 10:00 GMT\nUpdated: March 15, 2025\n"
                      "By Jane Mwangi\n\nRivers burst their banks. More rain is due.", "x", "x.txt")
    assert (a.title, a.title_from, a.date, a.author) == ("Floods hit the north", "headline", "2025-03-14",
                                                         "Jane Mwangi")
    assert a.text == "Rivers burst their banks. More rain is due."
    updated_only = clean_article("Updated 2 April 2025\n\nBody of the story.", "u", "u.txt")
    assert (updated_only.date, updated_only.text, updated_only.title) == ("2025-04-02", "Body of the story.", None)
    # A first line that is a sentence, or one with nothing after it, stays text.
    sentence = clean_article("The council met on Monday.\n\nIt agreed.", "s", "s.txt")
    assert (sentence.title, sentence.text) == (None, "The council met on Monday.\n\nIt agreed.")
    alone = clean_article("Just a short line", "o", "o.txt")
    assert (alone.title, alone.text, alone.title_from) == (None, "Just a short line", "lead")


@pytest.mark.parametrize("opening, date", [
    ("NAIROBI, 2 April 2025 — ", "2025-04-02"),
    ("GAZA CITY (AFP) — ", None),
    ("(Reuters) - ", None),
    ("BEIRUT, Lebanon, April 2, 2025 (AP) — ", "2025-04-02"),
    ("WASHINGTON — ", None),
])
def test_agency_datelines_are_metadata(opening, date):
    a = clean_article(f"{opening}Officials said the talks would resume.", "d", "d.txt")
    assert (a.text, a.date) == ("Officials said the talks would resume.", date)


def test_text_that_only_looks_like_a_dateline_is_kept():
    for text in ("Iran’s Foreign Minister - in Doha - said it.", "US officials — speaking anonymously — said so.",
                 "A - B testing works.", "NATO - the alliance said it would meet.",
                 "Updated figures show 40 people died.\n\nMore.", "Published by the ministry.\n\nMore."):
        assert clean_article(text, "k", "k.txt").text == text


def test_an_unreadable_date_is_a_warning_not_a_crash(tmp_path):
    (tmp_path / "bad.txt").write_text("date 2024-99-99 The body.\n", encoding="utf-8")
    (tmp_path / "stamp.txt").write_text("Published 2025-13-45\n\nThe body.\n", encoding="utf-8")
    report = load_articles(tmp_path)
    assert [(a.id, a.date, a.text) for a in report.articles] == [("bad", None, "The body."),
                                                                  ("stamp", None, "The body.")]
    warnings = dict(report.warnings)
    assert "2024-99-99" in warnings["bad.txt"] and "2025-13-45" in warnings["stamp.txt"]


def test_one_upload_is_read_by_the_text_rules_whatever_its_name(tmp_path):
    from qa_service.ingest import LoadReport, load_article

    staged = tmp_path / ".abc.txt.0123.staged"
    staged.write_bytes(b"date 2025-01-01 Uploaded text.")
    article = load_article(staged, LoadReport())
    assert (article.id, article.source, article.date, article.text) == (
        ".abc.txt.0123", staged.name, "2025-01-01", "Uploaded text.")


def test_files_in_subfolders_get_ids_from_their_path(tmp_path):
    from qa_service.ingest import ARTICLE_ID

    (tmp_path / "2025" / "April news").mkdir(parents=True)
    (tmp_path / "2025" / "floods.txt").write_text("Floods article.", encoding="utf-8")
    (tmp_path / "2025" / "April news" / "Café über alles.txt").write_text("Cafe article.", encoding="utf-8")
    (tmp_path / "UPPER.TXT").write_text("Upper-case extension.", encoding="utf-8")
    ids = [a.id for a in load_articles(tmp_path).articles]
    assert ids[1:] == ["2025--floods", "UPPER"]
    assert re.fullmatch(r"2025-April-news-Cafe-uber-alles-[0-9a-f]{12}", ids[0])
    assert all(ARTICLE_ID.fullmatch(i) for i in ids)
    assert ids == [a.id for a in load_articles(tmp_path).articles]  # stable
