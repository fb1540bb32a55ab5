"""Reading every format people keep news in: one file of each kind, subfolders, metadata, syndicated copies, and
hostile input (scripts, huge files, broken records, foreign bytes), each named with its reason and never fatal."""

from __future__ import annotations

import json
import re

import pytest

from qa_service.chunking import split_article
from qa_service.ingest import MAX_ARTICLE_FILE_BYTES, lead_title, load_articles, parse_date
from qa_service.ingest.common import ARTICLE_ID

WIRE = ("Heavy rains have displaced more than 40,000 people across western Kenya, the Kenya Red Cross said on "
        "Wednesday, as rivers burst their banks for a third week running.\n\n"
        "Officials said at least 38 people had died since the start of the long rains in March, and warned that "
        "more rain was expected over the coming days in the Lake Victoria basin.\n\n"
        "The government has opened 22 temporary camps in schools and churches, and the interior ministry urged "
        "residents of low-lying areas to move to higher ground immediately.\n\n"
        "Aid agencies said clean water and sanitation were the most urgent needs in the camps, where cases of "
        "cholera have been reported among children.")

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Port strike enters second week | Harbour Times</title>
<link rel="canonical" href="https://harbour.example.com/business/port-strike-second-week">
<meta property="og:site_name" content="Harbour Times">
<meta property="og:title" content="Port strike enters second week">
<meta name="author" content="Ana Ribeiro">
<meta property="article:published_time" content="2025-03-11T07:15:00Z">
<script>var leaked = "SCRIPT_IN_HEAD"; document.write("SCRIPT_WRITE");</script>
</head><body onload="track('BODY_ONLOAD')">
<div id="cookie-banner" class="cookie-consent">We use cookies to improve your experience on our site.
<button onclick="acceptCookies('COOKIE_HANDLER')">Accept all cookies</button></div>
<nav><ul><li><a href="/">Home</a></li><li><a href="/world">World news</a></li><li><a href="/sport">Sport</a></li>
</ul></nav>
<main><article>
<h1>Port strike enters second week</h1>
<p>Dock workers at the country's largest container port extended their strike into a second week on Tuesday,
leaving more than 60 ships waiting at anchor outside the harbour and shipping lines diverting cargo.</p>
<p onclick="alert('INLINE_HANDLER')">The union is demanding a 12 percent pay rise and new safety rules after two
workers were killed in accidents last year, while the port authority has offered 5 percent.</p>
<script>console.log("SCRIPT_IN_BODY")</script>
<p>Exporters of fruit and coffee said the stoppage was already costing them millions, and asked the government to
appoint a mediator before perishable cargo is lost.</p>
</article>
<aside class="most-read"><h2>Most read</h2><ol><li><a href="/a">Celebrity wedding shocks fans</a></li>
<li><a href="/b">Ten tips for summer gardening</a></li></ol></aside>
</main>
<footer><p>Copyright 2025 Harbour Times. All rights reserved.</p><p>Contact us | Privacy policy | Terms of use</p>
</footer></body></html>
"""

MARKDOWN = """---
title: "Council approves new tram line"
date: 2025-02-20
url: https://citynews.example.org/tram-line
outlet: City News
author: Priya Shah
---

The city council voted 31 to 12 on Thursday to approve a new tram line linking the northern suburbs to the
central station, after three years of consultations.

Construction is due to start next spring and the line should open in 2029, the transport committee said.
"""

RSS_ITEM = """<item><title>Item {n} about the harbour</title><link>https://feed.example.net/items/{n}</link>
<pubDate>Tue, 11 Mar 2025 09:{m:02d}:00 GMT</pubDate><author>desk@feed.example.net (News Desk)</author>
<description><![CDATA[<p>Paragraph one of item {n}: the harbour authority reported {n} new arrivals and a
queue of ships <b>waiting</b> outside.</p><p onclick="steal()">Second paragraph of item {n}.</p>
<script>alert("FEED_SCRIPT")</script>]]></description></item>"""


def rss(items: int) -> str:
    body = "".join(RSS_ITEM.format(n=n, m=n % 60) for n in range(1, items + 1))
    return (f'<?xml version="1.0" encoding="UTF-8"?><rss version="2.0"><channel><title>Harbour Wire</title>'
            f"<link>https://feed.example.net/</link><description>News</description>{body}</channel></rss>")


ATOM = """<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom"><title>Mountain Post</title><id>urn:mp</id>
<updated>2025-01-05T10:00:00Z</updated>
<entry><title>Avalanche warning raised</title><link href="https://mountain.example.com/avalanche"/>
<id>urn:mp:1</id><updated>2025-01-05T10:00:00Z</updated><author><name>Lukas Meier</name></author>
<content type="html">&lt;p&gt;The avalanche warning for the western Alps was raised to level four on Sunday
after heavy snowfall overnight.&lt;/p&gt;</content></entry></feed>
"""


def build_archive(root):
    """A folder with one file of each kind, a subfolder, an upper-case extension, two copies of one wire story
    and two unsupported files."""
    (root / "2025" / "kenya").mkdir(parents=True)
    (root / "harbour-headline.txt").write_text(
        "Strike talks collapse at the harbour\n\nPublished 2025-03-12\nUpdated 2025-03-13\n\n"
        "GAZA CITY (AFP) — Talks between the union and the port authority collapsed late on Wednesday, "
        "the union said.\n\nBoth sides blamed each other.", encoding="utf-8")
    (root / "2025" / "kenya" / "Floods-AFP.TXT").write_text(
        f"Floods displace thousands in Kenya\n\nNAIROBI, 2 April 2025 — {WIRE}", encoding="utf-8")
    copy = WIRE.replace("Wednesday", "Wednesday evening").replace("among children", "among young children")
    (root / "exports.jsonl").write_text("\n".join([
        json.dumps({"id": "wire-copy", "title": "Kenya floods displace 40,000", "date": "2025-04-03",
                    "url": "https://daily.example.co.ke/floods", "outlet": "Daily Example", "content": copy}),
        json.dumps({"title": "No id, has a URL", "date": "2025-04-05T10:00:00Z",
                    "url": "https://news.example.com/2025/04/markets-rally.html", "outlet": "Example",
                    "text": "Markets rallied on Friday as investors cheered the central bank's rate decision."}),
        json.dumps({"title": None, "date": "2024-99-99",
                    "body": "A record without an id or a URL and with a date that cannot be read. It is kept."}),
        "[1, 2, 3]",
        "{not json",
        json.dumps({"title": "No text at all"}),
    ]) + "\n", encoding="utf-8")
    (root / "cms.csv").write_text(
        'id,title,date,url,outlet,author,body\n'
        'csv-1,Bridge reopens,12 March 2025,https://town.example/bridge,Town Crier,Sam Lee,'
        '"The bridge reopened on Wednesday.\n\nTraffic was light, officials said, and ""no delays"" followed."\n'
        'csv-2,Library hours extended,"March 14, 2025",,Town Crier,,"The library will open until 9 pm."\n',
        encoding="utf-8")
    (root / "list.json").write_text(json.dumps([
        {"id": "json-1", "title": "Grain prices fall", "date": "2025/01/15", "outlet": "Farm Weekly",
         "text": "Grain prices fell for a third month as harvests in the south came in above forecasts."}]),
        encoding="utf-8")
    (root / "notes.md").write_text(MARKDOWN, encoding="utf-8")
    (root / "page.HTML").write_text(PAGE, encoding="utf-8")
    (root / "harbour.rss").write_text(rss(2), encoding="utf-8")
    (root / "2025" / "mountain.atom").write_text(ATOM, encoding="utf-8")
    (root / "report.docx").write_bytes(b"PK\x03\x04 not a text format")
    (root / "scan.pdf").write_bytes(b"%PDF-1.4 not a text format")
    return root


@pytest.fixture
def archive(tmp_path):
    report = load_articles(build_archive(tmp_path / "archive"))
    return report, {a.id: a for a in report.articles}


def assert_citations_slice(articles):
    """The exact-citation rule after chunking: every passage is its article's text at its offsets."""
    for article in articles:
        assert article.text and article.text == article.text.strip()
        passages = split_article(article, lambda t: len(t.split()), 40).passages(article)
        assert passages
        for p in passages:
            assert article.text[p.start:p.end] == p.text


def test_every_format_is_read_with_its_metadata(archive):
    report, by_id = archive
    assert len(by_id) == 13
    head = by_id["harbour-headline"]
    assert (head.title, head.title_from, head.date) == ("Strike talks collapse at the harbour", "headline",
                                                       "2025-03-12")
    assert head.text.startswith("Talks between the union")  # stamps and the agency dateline are not text
    nested = by_id["2025--kenya--Floods-AFP"]
    assert (nested.title, nested.date, nested.source) == ("Floods displace thousands in Kenya", "2025-04-02",
                                                          "2025/kenya/Floods-AFP.TXT")
    assert nested.text.startswith("Heavy rains")
    md = by_id["notes"]
    assert (md.title, md.date, md.source_url, md.outlet, md.author, md.title_from) == (
        "Council approves new tram line", "2025-02-20", "https://citynews.example.org/tram-line", "City News",
        "Priya Shah", "metadata")
    assert md.text.startswith("The city council voted")
    page = by_id["page"]
    assert (page.title, page.date, page.source_url, page.outlet, page.author) == (
        "Port strike enters second week", "2025-03-11", "https://harbour.example.com/business/port-strike-second-week",
        "Harbour Times", "Ana Ribeiro")
    assert page.text.startswith("Dock workers") and page.text.endswith("perishable cargo is lost.")
    csv1, csv2 = by_id["csv-1"], by_id["csv-2"]
    assert csv1.text == ('The bridge reopened on Wednesday.\n\n'
                         'Traffic was light, officials said, and "no delays" followed.')
    assert (csv1.date, csv1.outlet, csv1.author, csv1.source_url) == ("2025-03-12", "Town Crier", "Sam Lee",
                                                                     "https://town.example/bridge")
    assert (csv2.date, csv2.source_url, csv2.author) == ("2025-03-14", None, None)
    assert by_id["json-1"].date == "2025-01-15"
    items = [a for a in report.articles if a.source == "harbour.rss"]
    assert [a.title for a in items] == ["Item 1 about the harbour", "Item 2 about the harbour"]
    assert items[0].outlet == "Harbour Wire" and items[0].source_url == "https://feed.example.net/items/1"
    assert items[0].date == "2025-03-11" and items[0].text.startswith("Paragraph one of item 1")
    atom = next(a for a in report.articles if a.source == "2025/mountain.atom")
    assert (atom.title, atom.outlet, atom.author, atom.date, atom.source_url) == (
        "Avalanche warning raised", "Mountain Post", "Lukas Meier", "2025-01-05", "https://mountain.example.com/avalanche")
    assert_citations_slice(report.articles)


def test_records_without_an_id_get_a_stable_valid_one(tmp_path, archive):
    report, by_id = archive
    exported = [a for a in report.articles if a.source == "exports.jsonl"]
    assert len(exported) == 3
    for article in report.articles:
        assert ARTICLE_ID.fullmatch(article.id), article.id
    from_url = next(a for a in exported if a.source_url and "markets-rally" in a.source_url)
    assert re.fullmatch(r"markets-rally-[0-9a-f]{12}", from_url.id)
    from qa_service.ingest.common import LoadReport, record_id

    assert record_id(None, "https://x.example/news/floods/index.html?x=1", "t", "w", LoadReport()).startswith(
        "floods-")
    from_text = next(a for a in exported if a.source_url is None)
    again = {a.id for a in load_articles(build_archive(tmp_path / "again")).articles}
    assert {from_url.id, from_text.id} <= again  # the same records give the same ids in another folder
    assert from_text.date is None and from_text.title is None and from_text.title_from == "lead"


def test_unreadable_files_and_records_are_named_with_their_reason(archive):
    report, _ = archive
    skipped = dict(report.skipped)
    assert skipped["report.docx"] == "unsupported type .docx"
    assert skipped["scan.pdf"] == "unsupported type .pdf"
    assert skipped["exports.jsonl line 4"] == "not an object (a JSON list)"
    assert skipped["exports.jsonl line 5"].startswith("not JSON")
    assert skipped["exports.jsonl line 6"].startswith("no text")
    assert len(report.skipped) == 5
    warnings = dict(report.warnings)
    assert "2024-99-99" in warnings["exports.jsonl line 3"]


def test_two_copies_of_one_wire_story_share_a_story(archive):
    _, by_id = archive
    nested, copy = by_id["2025--kenya--Floods-AFP"], by_id["wire-copy"]
    assert nested.story == copy.story == "2025--kenya--Floods-AFP"
    others = {a.story for i, a in by_id.items() if i not in ("2025--kenya--Floods-AFP", "wire-copy")}
    assert nested.story not in others
    assert all(a.story == i for i, a in by_id.items() if i not in ("2025--kenya--Floods-AFP", "wire-copy"))


def test_copies_days_apart_or_rewritten_stay_apart(tmp_path):
    (tmp_path / "a.txt").write_text(f"date 2025-04-02 {WIRE}", encoding="utf-8")
    (tmp_path / "b.txt").write_text(f"date 2025-04-20 {WIRE}", encoding="utf-8")  # the same text weeks later
    (tmp_path / "c.txt").write_text(f"date 2025-04-03 {WIRE}", encoding="utf-8")
    stories = {a.id: a.story for a in load_articles(tmp_path).articles}
    assert stories == {"a": "a", "b": "b", "c": "a"}
    assert {a.story for a in load_articles(tmp_path, stories=False).articles} == {None}


def test_the_seeds_same_event_in_their_own_words_are_different_stories(seed_articles):
    by_id = {a.id: a for a in seed_articles}
    assert by_id["000_13c1da738e689733"].story != by_id["004_9aeb4bd2e5102b83"].story
    assert all(a.story == a.id for a in seed_articles)


def test_scripts_and_handlers_never_reach_the_text(archive):
    report, _ = archive
    for article in report.articles:
        for marker in ("SCRIPT_IN_HEAD", "SCRIPT_WRITE", "BODY_ONLOAD", "COOKIE_HANDLER", "INLINE_HANDLER",
                       "SCRIPT_IN_BODY", "FEED_SCRIPT", "steal()", "<p", "onclick"):
            assert marker not in article.text
        for chrome in ("cookies", "Most read", "Celebrity wedding", "World news", "All rights reserved",
                       "Privacy policy"):
            assert chrome not in article.text


def test_a_huge_file_is_skipped_by_its_size_and_the_rest_read(tmp_path):
    (tmp_path / "ok.txt").write_text("A short article that is read.", encoding="utf-8")
    with open(tmp_path / "huge.html", "wb") as f:
        f.truncate(50 * 1024 * 1024)  # 50 MiB, sparse: never written, never read
    report = load_articles(tmp_path)
    assert [a.id for a in report.articles] == ["ok"]
    assert dict(report.skipped)["huge.html"] == (
        f"file of 50.0 MiB is over the {MAX_ARTICLE_FILE_BYTES // 2**20} MiB limit for one-article files")


def test_a_feed_of_a_thousand_items(tmp_path):
    (tmp_path / "big.xml").write_text(rss(1000), encoding="utf-8")
    report = load_articles(tmp_path)
    assert len(report.articles) == 1000 and not report.skipped
    assert len({a.id for a in report.articles}) == 1000
    assert len({a.story for a in report.articles}) == 1000  # short items are never called copies
    assert_citations_slice(report.articles)


def test_foreign_bytes_are_decoded_or_named(tmp_path):
    (tmp_path / "latin.csv").write_bytes("id,text\nl-1,Caf\xe9 owners said it.\n".encode("cp1252"))
    (tmp_path / "broken.jsonl").write_bytes(b'{"id": "b-1", "text": "bad \x81\x8d\x8f bytes"}\n')
    (tmp_path / "nul.md").write_bytes(b"---\ntitle: x\n---\nbody\x00\x00")
    (tmp_path / "page.htm").write_bytes(
        "<html><head><meta charset='iso-8859-1'><title>Caf\xe9</title></head><body><article><p>Le caf\xe9 du "
        "port a rouvert ses portes lundi apr\xe8s des mois de travaux, a annonc\xe9 la mairie.</p></article>"
        "</body></html>".encode("latin-1"))
    report = load_articles(tmp_path)
    by_id = {a.id: a for a in report.articles}
    assert by_id["l-1"].text == "Café owners said it."
    assert "café du port" in by_id["page"].text
    skipped = dict(report.skipped)
    assert skipped["broken.jsonl"].startswith("not UTF-8 text")
    assert "binary" in skipped["nul.md"]
    assert dict(report.warnings)["latin.csv"].startswith("not UTF-8")
    assert_citations_slice(report.articles)


def test_markdown_without_front_matter_or_with_a_bad_one(tmp_path):
    (tmp_path / "plain.md").write_text("# The heading\n\nThe body of the note.\n", encoding="utf-8")
    (tmp_path / "baddate.md").write_text("---\ntitle: Kept\ndate: 2025-02-30\n---\nBody one.\n", encoding="utf-8")
    (tmp_path / "broken.md").write_text("---\ntitle: [unclosed\n---\nBody two.\n", encoding="utf-8")
    report = load_articles(tmp_path)
    by_id = {a.id: a for a in report.articles}
    assert (by_id["plain"].title, by_id["plain"].title_from, by_id["plain"].text) == (
        "The heading", "headline", "The body of the note.")
    assert (by_id["baddate"].title, by_id["baddate"].date, by_id["baddate"].text) == ("Kept", None, "Body one.")
    assert (by_id["broken"].title, by_id["broken"].text) == (None, "Body two.")
    warnings = dict(report.warnings)
    assert "2025-02-30" in warnings["baddate.md"] and "not valid YAML" in warnings["broken.md"]
    assert_citations_slice(report.articles)


def test_hidden_files_are_not_articles(tmp_path):
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.txt").write_text("Not an article.", encoding="utf-8")
    (tmp_path / ".a.txt.1234.staged").write_text("A staged write.", encoding="utf-8")
    (tmp_path / "real.txt").write_text("A real article.", encoding="utf-8")
    report = load_articles(tmp_path)
    assert [a.id for a in report.articles] == ["real"] and not report.skipped


def test_an_index_inside_the_folder_can_be_left_out(tmp_path):
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "manifest.json").write_text('{"articles": {"a": "hash"}}', encoding="utf-8")
    (tmp_path / "a.txt").write_text("The article.", encoding="utf-8")
    report = load_articles(tmp_path, exclude=[tmp_path / "index"])
    assert [a.id for a in report.articles] == ["a"] and not report.skipped


def test_duplicate_ids_keep_the_first_and_name_the_second(tmp_path):
    (tmp_path / "same.txt").write_text("The plain-text article.", encoding="utf-8")
    (tmp_path / "same.md").write_text("The Markdown article.", encoding="utf-8")
    report = load_articles(tmp_path)
    assert [a.source for a in report.articles] == ["same.md"]
    assert dict(report.skipped)["same.txt"] == "duplicate id 'same', already read from same.md"


def test_dates_are_normalised_and_validated():
    assert parse_date("2025-04-02T08:30:00Z") == "2025-04-02"
    assert parse_date("Wed, 02 Apr 2025 08:30:00 GMT") == "2025-04-02"
    assert parse_date("2 April 2025") == parse_date("April 2, 2025") == parse_date("2025/4/2") == "2025-04-02"
    for bad in ("2024-99-99", "2025-02-30", "yesterday", "", None, "31/31/2025"):
        assert parse_date(bad) is None


def test_lead_title_is_the_first_sentence_shortened():
    assert lead_title("Markets rallied on Friday. Then more.") == "Markets rallied on Friday."
    long = lead_title("word " * 60)
    assert len(long) <= 90 and long.endswith("…")


def test_reading_speed_reports_every_format(tmp_path):
    from benchmarks.ingest import reading_speed

    rows = reading_speed(tmp_path, articles=6)
    assert {r["format"] for r in rows} >= {"txt", "md", "html", "jsonl", "csv", "json", "rss"}
    for row in rows:
        assert row["articles"] == 6 and row["articles_per_s"] > 0
