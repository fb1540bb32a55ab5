"""The PostgreSQL backend against a real PostgreSQL 18 + pgvector started on loopback (tests/conftest.py).

It must answer exactly as the FAISS backend does (same passages, scores, citations, filters, modes), take
writes as single transactions that every reader sees at once, and keep its schema under versioned
migrations.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from dataclasses import replace

import numpy as np
import psycopg
import pytest

from qa_service.backends.base import info_of
from qa_service.backends.postgres import PostgresBackend
from qa_service.backends.postgres_schema import MIGRATIONS, PASSAGE_PAIRS, PASSAGE_TERMS, SENTENCE_TERMS, migrate
from qa_service.backends.postgres_writer import PostgresWriter
from qa_service.config import Settings
from qa_service.errors import ArticleNotFound, InvalidRequest, LastArticle
from qa_service.retrieval import Searcher
from qa_service.types import Article, ArticleInfo, Filters

from .support.fakes import FakeEmbedder
from .support.paths import REPO
from .support.postgres import QUESTIONS, cited, new_database



@pytest.fixture(scope="module")
def pg_searcher(fake_pg_index, fake_embedder):
    return Searcher(fake_pg_index, embedder=fake_embedder)


@pytest.mark.parametrize("mode", ["hybrid", "dense", "lexical"])
def test_same_results_as_the_faiss_backend(fake_searcher, pg_searcher, mode):
    assert pg_searcher.passage_count == fake_searcher.passage_count
    assert pg_searcher.articles() == fake_searcher.articles()  # texts too
    assert pg_searcher.article_count == fake_searcher.article_count == len(fake_searcher.articles())
    assert pg_searcher.catalog() == fake_searcher.catalog() == [info_of(a) for a in fake_searcher.articles()]
    assert all(isinstance(i, ArticleInfo) and i.story for i in pg_searcher.catalog())
    for question in QUESTIONS:
        a, b = fake_searcher.ask(question, k=5, mode=mode), pg_searcher.ask(question, k=5, mode=mode)
        assert cited(b) == cited(a), question
        assert b["answerable"] == a["answerable"]


def test_same_results_under_filters(fake_searcher, pg_searcher):
    articles = fake_searcher.articles()
    dates = sorted(a.date for a in articles if a.date)
    for filters in (Filters(sources=(articles[1].id,)), Filters(sources=(articles[0].source, articles[3].id)),
                    Filters(date_from=dates[1]), Filters(date_to=dates[-2]),
                    Filters(date_from=dates[0], date_to=dates[0])):
        for question in QUESTIONS[:6]:
            a, b = fake_searcher.ask(question, 5, filters), pg_searcher.ask(question, 5, filters)
            assert cited(b) == cited(a), (question, filters)
    with pytest.raises(InvalidRequest) as err:
        pg_searcher.search("anything", filters=Filters(sources=("no-such-article",)))
    assert err.value.code == "unknown_source"


def test_citations_slice_the_article_text_for_every_passage(pg_searcher, seed_articles):
    backend = pg_searcher.backend
    with psycopg.connect(backend.url) as conn:
        rows = conn.execute('SELECT article_id, start, "end", text, first_sentence, last_sentence '
                            "FROM qa_passages").fetchall()
        sentences = dict((r[0], r[1:]) for r in conn.execute('SELECT id, article_id, start, "end" FROM qa_sentences'))
    texts = {a.id: a.text for a in seed_articles}
    assert rows
    for article_id, start, end, text, first, last in rows:
        assert texts[article_id][start:end] == text
        assert sentences[first][1] == start and sentences[last][2] == end  # passages are whole sentences


@pytest.mark.parametrize("background_docs", [0.0, 1000.0])
def test_bm25_in_sql_equals_bm25s(fake_searcher, pg_searcher, background_docs):
    """Plain BM25, and hybrid's idf blended with English frequencies (``lexical.blended_idf``)."""
    faiss_backend, pg = fake_searcher.backend, pg_searcher.backend
    from qa_service.retrieval.lexical import analyze, background_idfs, bigrams

    for question in QUESTIONS:
        text = pg_searcher.prepare(question)[1]
        with pg.snapshot():
            for kind, index, terms, blend in ((PASSAGE_TERMS, faiss_backend.lexical, analyze(text), background_docs),
                                              (PASSAGE_PAIRS, faiss_backend.lexical_bigrams, bigrams(text), 0.0),
                                              (SENTENCE_TERMS, faiss_backend.lexical_sentences, analyze(text),
                                               background_docs)):
                expected = index.scores(text, blend)
                # ids differ by the sequences' start (1 in PostgreSQL, 0 in FAISS)
                best, scores, _ = pg._bm25(kind, terms, list(range(1, len(expected) + 1)),
                                           background=background_idfs(text), background_docs=blend)
                got = np.array([scores.get(i + 1, 0.0) for i in range(len(expected))])
                np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
                assert best == pytest.approx(float(expected.max()) if len(expected) else 0.0, rel=1e-4, abs=1e-5)


def test_migrations_are_versioned_and_idempotent(postgres):
    url = new_database(postgres, "migrations")
    conn = psycopg.connect(url, autocommit=True)
    errors = []

    def run():
        try:
            with psycopg.connect(url, autocommit=True) as c:
                migrate(c)
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert migrate(conn) == MIGRATIONS[-1][0]
    versions = [r[0] for r in conn.execute("SELECT version FROM qa_schema_migrations ORDER BY version")]
    assert versions == [v for v, _ in MIGRATIONS]
    conn.close()


def _article(article_id: str, text: str, date: str = "2025-02-01") -> Article:
    import hashlib

    return Article(article_id, f"{article_id}.txt", f"Title of {article_id}", date, text,
                   hashlib.sha256(text.encode()).hexdigest())


def test_writes_are_seen_by_running_readers_at_once_and_only_whole(postgres, tmp_path, seed_articles, fake_embedder):
    settings = Settings(index_dir=tmp_path / "index", model=FakeEmbedder.name,
                        database_url=new_database(postgres, "writes"))
    with PostgresWriter(settings) as writer:
        writer.sync(seed_articles[:3], fake_embedder)
    reader = Searcher(settings, embedder=fake_embedder)  # stays open across the writes, like a service worker
    other = Searcher(settings, embedder=fake_embedder)
    before = reader.passage_count
    story = _article("zebra-report", "The Zanzibar zebra count reached 4,812 animals in January. "
                     "Rangers from Pemba said the census took nine days.")
    with PostgresWriter(settings) as writer:
        summary = writer.sync([story], fake_embedder, remove_missing=False)
    assert summary["embedded"] == 1 and summary["articles"] == 4
    for searcher in (reader, other):
        top = searcher.ask("How many zebras were counted in Zanzibar?", k=1)["results"][0]
        assert top["citation"]["article_id"] == "zebra-report"
        assert (searcher.article("zebra-report").text[top["answer"]["start"]:top["answer"]["end"]]
                .startswith("The Zanzibar"))
    assert reader.passage_count > before
    assert "zanzibar" in reader.vocabulary.counts  # the in-memory vocabulary followed the write

    # A write that fails inside its transaction leaves every row as it was.
    replaced = _article("zebra-report", "Completely different text about quokkas on Rottnest.")
    with PostgresWriter(settings) as writer:
        original = writer._insert

        def broken(*args, **kwargs):
            original(*args, **kwargs)
            raise RuntimeError("crash after the new rows were copied")

        writer._insert = broken
        with pytest.raises(RuntimeError):
            writer.sync([replaced], fake_embedder, remove_missing=False)
    assert "Zanzibar" in reader.article("zebra-report").text
    assert reader.ask("quokkas Rottnest", k=1)["results"][0]["citation"]["article_id"] != "zebra-report"

    with PostgresWriter(settings) as writer:
        assert writer.delete("zebra-report") == 3
        with pytest.raises(ArticleNotFound):
            writer.delete("zebra-report")
    with pytest.raises(ArticleNotFound):
        reader.article("zebra-report")
    assert reader.passage_count == before
    assert "zanzibar" not in reader.vocabulary.counts
    assert all(h["citation"]["article_id"] != "zebra-report" for h in reader.ask("Zanzibar zebra count")["results"])


def test_an_article_without_a_headline_gives_every_passage_its_lead_and_takes_it_back(postgres, tmp_path,
                                                                                    seed_articles, fake_embedder):
    """BM25 reads each later window with the lead (``index_texts.lexical_text``); a delete takes those words back."""
    from qa_service.index_texts import lexical_texts
    from qa_service.store import chunk_articles

    settings = Settings(index_dir=tmp_path / "index", model=FakeEmbedder.name, max_tokens=24, overlap_sentences=0,
                        database_url=new_database(postgres, "leads"))
    with PostgresWriter(settings) as writer:
        writer.sync(seed_articles[:2], fake_embedder)
    before = dict(Searcher(settings, embedder=fake_embedder).vocabulary.counts)
    lead = "Rangers from Pemba counted the Zanzibar zebras."
    body = " ".join(f"Sentence {i} says the census went on for hours." for i in range(6))
    story = Article("census", "census.txt", None, "2025-02-01", f"{lead} {body}", "h-census")
    passages = len(chunk_articles([story], fake_embedder, settings).passages)
    with PostgresWriter(settings) as writer:
        writer.sync([story], fake_embedder, remove_missing=False)
    searcher = Searcher(settings, embedder=fake_embedder)
    assert passages >= 3 and searcher.vocabulary.counts["zanzibar"] == passages  # the lead, then in every window
    assert searcher.backend.lead("census") == lead
    with pytest.raises(ArticleNotFound):
        searcher.backend.lead("no-such-article")
    chunks = chunk_articles([story], fake_embedder, settings)
    assert all(t.startswith(lead + "\n") for t in lexical_texts(chunks, [story]))
    with PostgresWriter(settings) as writer:
        writer.delete("census")
    assert dict(Searcher(settings, embedder=fake_embedder).vocabulary.counts) == before


def test_sync_embeds_only_changed_articles_and_removes_missing(postgres, tmp_path, seed_articles):
    settings = Settings(index_dir=tmp_path / "index", model=FakeEmbedder.name,
                        database_url=new_database(postgres, "sync"))

    class Counting(FakeEmbedder):
        def __init__(self):
            super().__init__()
            self.texts = []

        def encode(self, texts, batch_size=32, progress=False):
            self.texts.extend(texts)
            return super().encode(texts, batch_size, progress)

    with PostgresWriter(settings) as writer:
        first = writer.sync(seed_articles, Counting())
        assert first["full"] and first["embedded"] == len(seed_articles)
        assert writer.status(seed_articles) == (True, "up to date")
        counting = Counting()
        again = writer.sync(seed_articles, counting)
        assert again["embedded"] == 0 and counting.texts == []
        changed = Article(**{**seed_articles[1].__dict__, "text": seed_articles[1].text + " A new closing line.",
                             "content_hash": "changed"})
        counting = Counting()
        third = writer.sync([seed_articles[0], changed], counting)
        assert third["embedded"] == 1 and third["removed"] == len(seed_articles) - 2
        assert any("A new closing line." in t for t in counting.texts)
        assert not any(seed_articles[0].text[:60] in t for t in counting.texts)
        assert set(writer.indexed()) == {seed_articles[0].id, changed.id}
        # The kept document frequencies equal a recount of the postings after the removals and the change.
        mismatched = writer.conn.execute("""
            SELECT count(*) FROM (SELECT kind, term, count(*) AS df FROM qa_postings GROUP BY kind, term) p
            FULL JOIN qa_term_stats t USING (kind, term) WHERE p.df IS DISTINCT FROM t.df""").fetchone()[0]
        assert mismatched == 0
        with pytest.raises(LastArticle):
            writer.sync([], Counting())
    fresh = Settings(index_dir=tmp_path / "fresh", model=FakeEmbedder.name,
                     database_url=new_database(postgres, "sync2"))
    with PostgresWriter(fresh) as writer:
        writer.sync([seed_articles[0], changed], FakeEmbedder())
    a = PostgresBackend(settings)
    b = PostgresBackend(fresh)
    for question in QUESTIONS[:5]:
        qa = Searcher(settings, embedder=FakeEmbedder(), backend=a).ask(question)
        qb = Searcher(fresh, embedder=FakeEmbedder(), backend=b).ask(question)
        assert cited(qa) == cited(qb)


def test_no_index_in_the_database_is_a_clear_error(postgres, tmp_path):
    from qa_service.errors import IndexNotBuilt

    settings = Settings(index_dir=tmp_path, model=FakeEmbedder.name, database_url=new_database(postgres, "empty"))
    with pytest.raises(IndexNotBuilt) as err:
        Searcher(settings, embedder=FakeEmbedder())
    assert "qa-service index" in err.value.message


def test_an_unreachable_database_is_a_clear_error(tmp_path):
    from qa_service.backends.local_postgres import free_port
    from qa_service.errors import QAError

    settings = Settings(index_dir=tmp_path, database_url=f"postgresql://qa:secret@127.0.0.1:{free_port()}/qa")
    with pytest.raises(QAError) as err:
        Searcher(settings, embedder=FakeEmbedder())
    assert err.value.code == "database_unavailable" and "secret" not in err.value.message


# --------------------------------------------------------------------------- the API on a shared database

ARTICLE = "date 2025-03-01 The flamingo parade in Tehran drew ten thousand zebras, the organisers said.\n\n" \
          "The zebras walked from Azadi Square to the bazaar, where traders sold them carrots."


def test_api_writes_reach_every_app_sharing_the_database(postgres, tmp_path, seed_articles):
    from qa_service.web import create_app

    from .support.live_server import API_KEY

    settings = Settings(index_dir=tmp_path / "index", model=FakeEmbedder.name, api_key=API_KEY,
                        database_url=new_database(postgres, "api_writes"))
    with PostgresWriter(settings) as writer:
        writer.sync(seed_articles, FakeEmbedder())
    # Two apps, as two service processes on two hosts: each with its own searcher over the one database.
    a, b = [create_app(settings, load_searcher=lambda: Searcher(settings, embedder=FakeEmbedder()),
                       write_embedder=FakeEmbedder()).test_client() for _ in range(2)]
    key = {"X-API-Key": API_KEY}
    r = a.post("/api/articles", json={"id": "flamingo-1", "text": ARTICLE}, headers=key)
    assert r.status_code == 201, r.get_json()
    assert r.get_json()["action"] == "created" and r.get_json()["articles"] == len(seed_articles) + 1
    hits = b.post("/api/ask", json={"question": "flamingo parade zebras", "k": 1}).get_json()["results"]
    assert hits[0]["citation"]["article_id"] == "flamingo-1"
    text = b.get("/api/articles/flamingo-1").get_json()["text"]
    assert text[hits[0]["citation"]["start"]:hits[0]["citation"]["end"]] == hits[0]["text"]
    assert b.get("/healthz").get_json()["passages"] == a.get("/healthz").get_json()["passages"]

    same = a.post("/api/articles", json={"id": "flamingo-1", "text": ARTICLE}, headers=key)
    assert same.status_code == 200 and same.get_json()["action"] == "unchanged"
    r = b.post("/api/articles", json={"id": "flamingo-1", "text": ARTICLE.replace("zebras", "okapis")}, headers=key)
    assert r.status_code == 200 and r.get_json()["action"] == "replaced"
    assert "okapis" in a.get("/api/articles/flamingo-1").get_json()["text"]
    r = a.delete("/api/articles/flamingo-1", headers=key)
    assert r.status_code == 200 and r.get_json()["action"] == "deleted"
    assert b.get("/api/articles/flamingo-1").status_code == 404
    assert a.delete("/api/articles/flamingo-1", headers=key).status_code == 404


@pytest.mark.slow
def test_two_served_processes_share_one_database(postgres, tmp_path, seed_articles, real_embedder):
    """Two real ``qa-service serve`` processes (gunicorn, 2 workers each, the real model's ONNX export taken
    from the database) answer alike, and an article added through one is answered by the other at once."""
    import requests

    from .support.live_server import API_KEY, LiveServer

    url = new_database(postgres, "served")
    settings = Settings(index_dir=tmp_path / "indexer", database_url=url)
    with PostgresWriter(settings) as writer:
        writer.sync(seed_articles, real_embedder)
    servers = [LiveServer(tmp_path / f"host{i}", tmp_path / f"seeds{i}", tmp_path / f"server{i}.log",
                          env={"QA_DATABASE_URL": url}).start() for i in range(2)]
    try:
        question = {"question": "Who met Iran's foreign minister in Doha?", "k": 3}
        answers = [requests.post(s.url + "/api/ask", json=question, timeout=30).json() for s in servers]
        assert cited(answers[0]) == cited(answers[1]) and answers[0]["results"]
        for i in range(2):  # the encoder came from the database into each host's own cache
            assert list((tmp_path / f"host{i}" / "pg-encoders").glob("*/model/*.onnx"))
        r = requests.post(servers[0].url + "/api/articles", json={"id": "flamingo-1", "text": ARTICLE},
                          headers={"X-API-Key": API_KEY}, timeout=60)
        assert r.status_code == 201, r.text
        for _ in range(4):  # every worker of the other process, whichever answers
            hits = requests.post(servers[1].url + "/api/ask", json={"question": "Where did the flamingo parade "
                                 "take place?", "k": 1}, timeout=30).json()["results"]
            assert hits[0]["citation"]["article_id"] == "flamingo-1"
        assert not list(tmp_path.glob("seeds*/flamingo-1.txt"))  # the database is the store, not a folder
    finally:
        for s in servers:
            s.stop()


def test_cli_reindex_embeds_with_the_databases_export_without_torch(postgres, tmp_path, seed_articles, real_index,
                                                                    real_embedder):
    """``qa-service index --database-url`` with an unchanged model embeds with the export the database holds:
    torch is never imported; a whole re-index with that encoder (chunking changed) keeps its files."""
    url = new_database(postgres, "shared_export")
    settings = Settings(index_dir=tmp_path / "indexer", database_url=url)
    with PostgresWriter(settings) as writer:
        writer.sync(seed_articles, real_embedder)
        before = writer.manifest()
    seeds = tmp_path / "seeds"
    shutil.copytree(real_index.seeds_dir, seeds)
    sorted(seeds.iterdir())[-1].unlink()  # the database is now stale: one article fewer
    script = textwrap.dedent(f"""
        import json, sys
        from qa_service.cli import cli
        cli(["index", {str(seeds)!r}, "--index-dir", {str(settings.index_dir)!r}, "--database-url", {url!r}],
            standalone_mode=False)
        print(json.dumps(sorted(m for m in ("torch", "sentence_transformers", "transformers") if m in sys.modules)))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QA_")}
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    with PostgresWriter(settings) as writer:
        after = writer.manifest()
        assert len(writer.indexed()) == len(seed_articles) - 1
        assert after["encoder"]["sha256"] == before["encoder"]["sha256"]
        rechunked = settings.with_(max_tokens=96)  # a chunking change re-indexes every article ...
        with PostgresWriter(rechunked) as again:
            summary = again.sync(seed_articles, None)
            assert summary["full"] and summary["embedded"] == len(seed_articles)
        paths = {r[0] for r in writer.conn.execute("SELECT path FROM qa_encoder_files")}
    assert paths == {after["encoder"]["file"], after["encoder"]["tokenizer"]}  # ... and keeps the encoder's files
    fresh = tmp_path / "reader"  # a new host fetches that encoder from the database and answers
    result = Searcher(rechunked.with_(index_dir=fresh)).ask("Who met Iran's foreign minister in Doha?", k=3)
    assert result["results"] and list(fresh.glob("pg-encoders/*/model/model.onnx"))


def test_a_read_replica_serves_questions_and_writes_go_to_the_primary(postgres, tmp_path, seed_articles):
    """Scaling questions out: a streaming replica (pg_basebackup -R) answers like the primary; an app reading
    from the replica sends its writes to the primary (QA_DATABASE_WRITE_URL) and then sees them replayed."""
    import time

    from qa_service.web import create_app

    from .support.live_server import API_KEY

    primary_url = new_database(postgres, "replicated")
    with PostgresWriter(Settings(index_dir=tmp_path / "w", model=FakeEmbedder.name, database_url=primary_url)) as w:
        w.sync(seed_articles, FakeEmbedder())
    replica = postgres.start_replica()
    try:
        replica_url = f"postgresql://{replica.user}@127.0.0.1:{replica.port}/replicated"
        settings = Settings(index_dir=tmp_path / "r", model=FakeEmbedder.name, api_key=API_KEY,
                            database_url=replica_url, database_write_url=primary_url)
        on_primary = Searcher(settings.with_(database_url=primary_url), embedder=FakeEmbedder())
        on_replica = Searcher(settings, embedder=FakeEmbedder())
        for question in QUESTIONS[:5]:
            assert cited(on_replica.ask(question)) == cited(on_primary.ask(question))
        with psycopg.connect(replica_url) as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0] is True
        client = create_app(settings, load_searcher=lambda: on_replica, write_embedder=FakeEmbedder()).test_client()
        r = client.post("/api/articles", json={"id": "flamingo-1", "text": ARTICLE}, headers={"X-API-Key": API_KEY})
        assert r.status_code == 201, r.get_json()
        deadline = time.monotonic() + 30
        while client.get("/api/articles/flamingo-1").status_code != 200:  # replication is asynchronous
            assert time.monotonic() < deadline, "the replica never replayed the write"
            time.sleep(0.1)
        hits = client.post("/api/ask", json={"question": "flamingo parade zebras", "k": 1}).get_json()["results"]
        assert hits[0]["citation"]["article_id"] == "flamingo-1"
    finally:
        replica.stop()


def test_an_index_made_at_schema_version_1_is_upgraded_in_place(postgres, tmp_path, seed_articles, fake_embedder,
                                                                 fake_searcher):
    """Migration 2 adds per-term document frequencies and fills them from an existing index's postings;
    migration 3 adds the provenance columns, which the next sync fills without embedding anything again."""
    url = new_database(postgres, "upgrade")
    settings = Settings(index_dir=tmp_path, model=FakeEmbedder.name, database_url=url)
    with PostgresWriter(settings) as writer:
        writer.sync(seed_articles, fake_embedder)
    with psycopg.connect(url, autocommit=True) as conn:  # back to the state schema version 1 left
        conn.execute("DROP TABLE qa_term_stats")
        conn.execute("ALTER TABLE qa_articles DROP COLUMN source_url, DROP COLUMN outlet, DROP COLUMN author, "
                     "DROP COLUMN story, DROP COLUMN title_from, DROP COLUMN lead_title")
        conn.execute("UPDATE qa_meta SET value = jsonb_set(value, '{format_version}', '1') WHERE key = 'manifest'")
        conn.execute("DELETE FROM qa_schema_migrations WHERE version > 1")
        assert migrate(conn) == 3 == MIGRATIONS[-1][0]
        assert conn.execute("SELECT count(*) FROM qa_term_stats").fetchone()[0] > 0
        assert conn.execute("SELECT count(*) FROM qa_articles WHERE story IS NULL").fetchone()[0] == 5
    upgraded = Searcher(settings, embedder=fake_embedder)
    for question in QUESTIONS[:6]:
        assert cited(upgraded.ask(question)) == cited(fake_searcher.ask(question))
    with PostgresWriter(settings) as writer:
        fresh, reason = writer.status(seed_articles)
        assert not fresh and "index format 1" in reason
        summary = writer.sync(seed_articles, fake_embedder)
        assert summary["embedded"] == 0 and summary["relabelled"] == 5
        assert writer.status(seed_articles) == (True, "up to date")
    assert upgraded.catalog() == fake_searcher.catalog()


def test_metadata_of_every_format_comes_back_from_the_database(postgres, tmp_path, fake_embedder):
    """source_url, outlet, author, story and title_from of a .md, a .jsonl and an .html article are stored and
    given back by the PostgreSQL backend as by the FAISS one, and citations carry the original URL and outlet."""
    from qa_service.ingest import load_articles

    from .support.formats import EXPECTED, write_formats_folder

    articles = load_articles(write_formats_folder(tmp_path / "articles")).articles
    settings = Settings(index_dir=tmp_path / "index", model=FakeEmbedder.name,
                        database_url=new_database(postgres, "formats"))
    with PostgresWriter(settings) as writer:
        writer.sync(articles, fake_embedder)
    searcher = Searcher(settings, embedder=fake_embedder)
    assert searcher.articles() == sorted(articles, key=lambda a: a.id)  # every field, text included
    infos = {i.id: i for i in searcher.catalog()}
    assert list(infos.values()) == [info_of(a) for a in sorted(articles, key=lambda a: a.id)]
    for article_id, want in EXPECTED.items():
        assert {k: getattr(infos[article_id], k) for k in want} == want
        assert searcher.backend.article_info(article_id) == infos[article_id]
    hits = searcher.ask("When did the port of Mombasa reopen after the storm?", k=5)["results"]
    assert any(h["citation"]["source_url"] == "https://example.com/news/mombasa-port" for h in hits)
    for hit in hits:
        c = hit["citation"]
        article = searcher.article(c["article_id"])
        assert article.text[c["start"]:c["end"]] == hit["text"]
        assert (c["source_url"], c["outlet"]) == (article.source_url, article.outlet)
    # a new copy of a story regroups an unchanged article: its row is updated, nothing is embedded again
    regrouped = [replace(a, story="shared") if a.id == "mombasa" else a for a in articles]
    with PostgresWriter(settings) as writer:
        assert writer.status(regrouped) == (False, "the articles' metadata changed")
        summary = writer.sync(regrouped, fake_embedder)
        assert summary["embedded"] == 0 and summary["relabelled"] == 1
    assert searcher.backend.article_info("mombasa").story == "shared"


def test_without_the_postgres_extra_the_error_says_how_to_install_it(monkeypatch, tmp_path):
    import sys

    from qa_service.errors import ConfigError

    monkeypatch.setitem(sys.modules, "psycopg", None)  # ``import psycopg`` now raises ImportError
    settings = Settings(index_dir=tmp_path, database_url="postgresql://qa@127.0.0.1:1/qa")
    with pytest.raises(ConfigError) as err:
        Searcher(settings, embedder=FakeEmbedder())
    assert "qa-service[postgres]" in err.value.message


def test_the_database_records_its_folder_and_takes_metadata_writes(postgres, tmp_path, seed_articles, monkeypatch):
    """Indexing another folder into the database says what it removes and adds; an article written with metadata
    is stored with it (the database is the source of truth there) and cited with its original URL."""
    import qa_service.embedding as embedding
    from qa_service.articles import put_article
    from qa_service.indexing import articles_folder, index_folder

    from .support.formats import write_formats_folder

    monkeypatch.setattr(embedding, "load_embedder", lambda name: FakeEmbedder())
    first = tmp_path / "a"
    shutil.copytree(REPO / "seeds", first)
    second = write_formats_folder(tmp_path / "b")
    settings = Settings(index_dir=tmp_path / "index", model=FakeEmbedder.name,
                        database_url=new_database(postgres, "folders"))
    index_folder(settings, first, progress=False)
    assert articles_folder(settings) == first.resolve()
    notes = []
    report = index_folder(settings, second, progress=False, notes=notes.append)
    assert (f"index: replacing 5 articles from {first.resolve()} with 4 from {second.resolve()} "
            "(5 removed, 4 added)") in notes
    assert (report.removed, report.added, report.articles) == (5, 4, 4)
    assert articles_folder(settings) == second.resolve()
    assert index_folder(settings, second, progress=False).fresh

    result = put_article(settings, "zebras", b"Ten thousand zebras walked through the city on Sunday, police said.",
                         embedder=FakeEmbedder(), metadata={"title": "Zebras in the city", "date": "2025-03-01",
                                                            "url": "https://news.example.com/zebras",
                                                            "outlet": "Example News"})
    assert result.action == "created" and result.article.source == "zebras.md"
    searcher = Searcher(settings, embedder=FakeEmbedder())
    info = searcher.backend.article_info("zebras")
    assert (info.title, info.date, info.source_url, info.outlet, info.title_from) == (
        "Zebras in the city", "2025-03-01", "https://news.example.com/zebras", "Example News", "metadata")
    hit = searcher.ask("zebras walked through the city", k=1)["results"][0]
    assert hit["citation"]["source_url"] == "https://news.example.com/zebras"
    assert searcher.article("zebras").text[hit["citation"]["start"]:hit["citation"]["end"]] == hit["text"]
