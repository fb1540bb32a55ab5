"""Index on disk: manifest, staleness, atomic publish, killed builds, corrupt files, model mismatch."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from qa_service.config import Settings
from qa_service.errors import IndexCorrupt, IndexMismatch, IndexNotBuilt
from qa_service.retrieval import Searcher
from qa_service.manifest import BUILDS, CURRENT, FORMAT_VERSION, index_status, read_manifest

from .support.paths import REPO, SEEDS
from .support.fakes import FakeEmbedder


def _build(settings, articles, embedder=None):
    from qa_service.store import build_index

    return build_index(articles, embedder or FakeEmbedder(), settings)


def test_manifest_records_what_the_index_holds(fake_index, seed_articles):
    manifest = read_manifest(fake_index.index_dir)
    assert manifest["format_version"] == FORMAT_VERSION == 2
    assert manifest["model"] == "fake-hash-64"
    assert manifest["dimension"] == 64
    assert manifest["chunking"]["max_tokens"] == 128
    assert manifest["articles"] == {a.id: a.content_hash for a in seed_articles}
    assert manifest["counts"]["articles"] == 5 and manifest["counts"]["passages"] > 5
    assert set(manifest["files"]) >= {"vectors.faiss", "passages.sqlite"}


def test_staleness(tmp_path, seed_articles):
    settings = Settings(index_dir=tmp_path / "index", model="fake-hash-64")
    assert index_status(settings, seed_articles)[0] is False
    _build(settings, seed_articles)
    assert index_status(settings, seed_articles) == (True, "up to date")
    assert index_status(settings, seed_articles[:4])[0] is False
    assert index_status(settings.with_(max_tokens=64), seed_articles) == (False, "the chunking settings changed")
    assert index_status(settings.with_(model="other"), seed_articles) == (False, "the model changed")


def test_every_passage_slices_its_article(fake_searcher):
    import sqlite3

    build = Path(fake_searcher.manifest["_build_dir"])
    con = sqlite3.connect(build / "passages.sqlite")
    rows = con.execute('SELECT article_id, start, "end", text FROM passages').fetchall()
    assert len(rows) == fake_searcher.passage_count
    for article_id, start, end, text in rows:
        assert fake_searcher.article(article_id).text[start:end] == text


def test_article_texts_are_read_on_demand_not_held_by_the_worker(tmp_path, seed_articles, monkeypatch):
    """Texts stay in SQLite: a worker holds only metadata, reads a text when asked and keeps the last few."""
    import sqlite3

    from qa_service.backends import faiss as faiss_backend

    settings = Settings(index_dir=tmp_path / "index", model="fake-hash-64")
    _build(settings, seed_articles)
    monkeypatch.setattr(faiss_backend, "ARTICLE_CACHE", 2)
    backend = faiss_backend.FaissBackend(settings)
    assert backend.article_count == len(seed_articles)
    first, second, third = sorted(a.id for a in seed_articles)[:3]
    # Change a text in the build behind the loaded backend: what it returns must come from the file.
    db = sqlite3.connect(Path(read_manifest(settings.index_dir)["_build_dir"]) / "passages.sqlite")
    with db:
        db.execute("UPDATE articles SET text = 'edited after load' WHERE id = ?", (first,))
    db.close()
    assert backend.article(first).text == "edited after load"
    assert [a.text for a in backend.articles() if a.id == first] == ["edited after load"]
    by_id = {a.id: a for a in seed_articles}
    for article_id in (second, third, second):
        got = backend.article(article_id)
        assert (got.text, got.title, got.date, got.source) == (by_id[article_id].text, by_id[article_id].title,
                                                                by_id[article_id].date, by_id[article_id].source)
    assert backend._article.cache_info().currsize == 2  # bounded: the least recently asked for was dropped
    # Lists of articles and citations come from memory, not from reading texts.
    reads = backend._article.cache_info().misses
    assert [i.id for i in backend.catalog()] == sorted(by_id) and backend._article.cache_info().misses == reads
    info = backend.article_info(sorted(by_id)[-1])
    assert (info.title, info.date, info.source) == (by_id[info.id].title, by_id[info.id].date, by_id[info.id].source)
    assert backend._article.cache_info().misses == reads
    assert [(i.title, i.date) for i in backend.catalog()] == [(by_id[i].title, by_id[i].date) for i in sorted(by_id)]
    backend.close()


def test_a_replaced_backend_goes_with_its_last_reference(fake_index):
    """No reference cycle holds a backend: a swapped-out build's memory maps (and a pruned build's disk
    space) are released when the last request using it ends, not whenever the garbage collector runs."""
    import gc
    import weakref

    from qa_service.backends.faiss import FaissBackend

    gc.disable()
    try:
        backend = FaissBackend(fake_index)
        backend.article(backend.catalog()[0].id)  # fill the article cache too
        gone = weakref.ref(backend)
        del backend
        assert gone() is None
    finally:
        gc.enable()


def test_passage_rows_and_sentences_are_the_stored_ones(fake_index, monkeypatch):
    """Rows come from memory once read, the same as from SQLite, whatever was read or dropped before; each
    passage's sentences tile it and slice the article's text."""
    import random
    import sqlite3

    from qa_service.backends import faiss as faiss_backend

    monkeypatch.setattr(faiss_backend, "PASSAGE_CACHE", 7)  # small, so rows are dropped and read again
    backend = faiss_backend.FaissBackend(fake_index)
    db = sqlite3.connect(Path(fake_index.index_dir) / "builds" / backend.manifest["build_id"] / "passages.sqlite")
    stored = {r[0]: r[1:] for r in db.execute('SELECT id, article_id, start, "end", text FROM passages')}
    spans = {r[0]: r[1:] for r in db.execute('SELECT id, start, "end" FROM sentences')}
    db.close()
    rng = random.Random(7)
    ids = sorted(stored)
    for _ in range(40):
        wanted = rng.sample(ids, rng.randint(1, 12)) + [max(ids) + 5]  # and one that does not exist
        assert backend.passages(wanted) == {pid: stored[pid] for pid in wanted if pid in stored}
        assert len(backend._passage_rows) <= 7
    for pid, (article_id, start, end, text) in stored.items():
        sentences = backend.passage_sentences(pid)
        assert sentences and [sid for sid, _, _ in sentences] == list(range(sentences[0][0], sentences[-1][0] + 1))
        assert all(spans[sid] == (s, e) for sid, s, e in sentences)
        assert sentences[0][1] == start and sentences[-1][2] == end
        article = backend.article(article_id).text
        assert article[start:end] == text  # a sentence is a slice of its passage's own text, as the answer step cuts it
        assert all(article[s:e] == text[s - start:e - start] and s < e for _, s, e in sentences)
    backend.close()


def test_missing_index_is_clear(tmp_path):
    with pytest.raises(IndexNotBuilt, match="qa-service index"):
        Searcher(Settings(index_dir=tmp_path / "none"), embedder=FakeEmbedder())


def test_corrupt_and_truncated_index(tmp_path, seed_articles):
    settings = Settings(index_dir=tmp_path / "index", model="fake-hash-64")
    summary = _build(settings, seed_articles)
    vectors = Path(summary.build_dir) / "vectors.faiss"
    data = vectors.read_bytes()
    vectors.write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexCorrupt, match="truncated.*qa-service index"):
        Searcher(settings, embedder=FakeEmbedder())
    vectors.write_bytes(b"\x00" * len(data))  # same size, garbage content
    with pytest.raises(IndexCorrupt, match="qa-service index"):
        Searcher(settings, embedder=FakeEmbedder())
    (Path(summary.build_dir) / "manifest.json").write_text("{not json")
    with pytest.raises(IndexCorrupt, match="manifest"):
        Searcher(settings, embedder=FakeEmbedder())
    (settings.index_dir / CURRENT).write_text("no-such-build\n")
    with pytest.raises(IndexCorrupt, match="missing build"):
        Searcher(settings, embedder=FakeEmbedder())


def test_model_mismatch(tmp_path, seed_articles):
    settings = Settings(index_dir=tmp_path / "index", model="fake-hash-64")
    _build(settings, seed_articles)

    class Other(FakeEmbedder):
        name = "another-model"

    with pytest.raises(IndexMismatch, match="built with model 'fake-hash-64'"):
        Searcher(settings, embedder=Other())

    class OtherDim(FakeEmbedder):
        dimension = 32

    with pytest.raises(IndexMismatch, match="64-d vectors"):
        Searcher(settings, embedder=OtherDim())
    # asking with a named model that differs from the index: refused before loading any model
    with pytest.raises(IndexMismatch, match="--model"):
        Searcher(settings.with_(model="all-MiniLM-L6-v2"))


def test_rebuild_publishes_atomically_and_prunes(tmp_path, seed_articles):
    settings = Settings(index_dir=tmp_path / "index", model="fake-hash-64")
    first = _build(settings, seed_articles[:2])
    second = _build(settings, seed_articles)
    third = _build(settings, seed_articles[:3])
    builds = sorted(p.name for p in (settings.index_dir / BUILDS).iterdir())
    assert Path(first.build_dir).name not in builds  # pruned
    assert Path(second.build_dir).name in builds  # previous kept for readers still on it
    assert (settings.index_dir / CURRENT).read_text().strip() == Path(third.build_dir).name
    assert Searcher(settings, embedder=FakeEmbedder()).passage_count == third.passages


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from tests.support.fakes import FakeEmbedder
    from qa_service.config import Settings
    from qa_service.ingest import load_articles
    from qa_service.store import build_index

    class Slow(FakeEmbedder):
        def encode(self, texts, batch_size=32, progress=False):
            out = []
            for t in texts:  # slow enough that a kill lands inside the build
                time.sleep(0.01)
                out.append(super().encode([t])[0])
            import numpy as np
            return np.array(out, dtype="float32").reshape(len(texts), self.dimension)

    print("ready", flush=True)
    build_index(load_articles({seeds!r}).articles, Slow(), Settings(index_dir={index!r}, model="fake-hash-64"))
    print("done", flush=True)
""")


def test_killed_builds_leave_a_usable_index(tmp_path, seed_articles):
    """SIGKILL a rebuild at random points: the index is always the whole old or the whole new one."""
    settings = Settings(index_dir=tmp_path / "index", model="fake-hash-64")
    _build(settings, seed_articles[:2])
    old = {a.id for a in seed_articles[:2]}
    new = {a.id for a in seed_articles}
    script = _KILL_SCRIPT.format(repo=str(REPO), seeds=str(SEEDS), index=str(settings.index_dir))
    rng = random.Random(7)
    outcomes = {"old": 0, "new": 0}
    for trial in range(6):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        searcher = Searcher(settings, embedder=FakeEmbedder())
        held = {a.id for a in searcher.articles()}
        assert held in (old, new), f"trial {trial}: a mix of old and new: {held}"
        outcomes["old" if held == old else "new"] += 1
        assert searcher.search("Hamas", k=3)
        if held == new:  # reset so later trials again start from the old index
            _build(settings, seed_articles[:2])
    assert outcomes["old"] >= 1


class CountingEmbedder(FakeEmbedder):
    def __init__(self):
        super().__init__()
        self.texts: list[str] = []

    def encode(self, texts, batch_size=32, progress=False):
        self.texts.extend(texts)
        return super().encode(texts, batch_size, progress)


def test_incremental_build_reembeds_only_changed_articles(tmp_path, seed_articles):
    import dataclasses

    import numpy as np

    settings = Settings(index_dir=tmp_path / "index", model="fake-hash-64")
    _build(settings, seed_articles[:4])
    changed = dataclasses.replace(seed_articles[1], text=seed_articles[1].text + "\n\nA new closing line.",
                                  content_hash="changed")
    articles = [seed_articles[0], changed, seed_articles[2], seed_articles[4]]  # 3 removed, 4 added, 1 changed
    counting = CountingEmbedder()
    summary = _build(settings, articles, counting)
    assert summary.reused_articles == 2
    embedded = "\n".join(counting.texts)
    assert "A new closing line." in embedded
    assert seed_articles[4].text[:60] in embedded
    assert seed_articles[0].text[:60] not in embedded and seed_articles[2].text[:60] not in embedded

    fresh = Settings(index_dir=tmp_path / "fresh", model="fake-hash-64")
    _build(fresh, articles)
    a, b = Searcher(settings, embedder=FakeEmbedder()), Searcher(fresh, embedder=FakeEmbedder())
    assert a.passage_count == b.passage_count
    ids = np.arange(a.passage_count)
    np.testing.assert_allclose(a.backend.dense.vectors(ids), b.backend.dense.vectors(ids), atol=1e-6)
    np.testing.assert_allclose(np.asarray(a.backend.sentence_matrix), np.asarray(b.backend.sentence_matrix), atol=1e-6)
    assert {x.id for x in a.articles()} == {x.id for x in articles}


def test_passage_vectors_see_the_headline_or_lead_but_spans_stay_on_the_article(seed_articles):
    """embedding_texts: headline (else lead sentence) before each later window; the passages themselves unchanged."""
    from qa_service.index_texts import CONTEXT_CHARS, embedding_texts
    from qa_service.store import chunk_articles
    from qa_service.types import Article

    embedder = FakeEmbedder()
    settings = Settings(max_tokens=24, overlap_sentences=0)
    lead = "The minister met the delegation in Doha on Thursday."
    body = " ".join(f"Sentence number {i} says the talks went on for hours without any result." for i in range(8))
    titled = Article("a", "a.txt", "Talks in Doha", None, f"{lead} {body}", "h1")
    untitled = Article("b", "b.txt", None, None, f"{lead} {body}", "h2")
    long_title = Article("c", "c.txt", "Headline " * 100, None, f"{lead} {body}", "h3")
    articles = [titled, untitled, long_title]
    chunks = chunk_articles(articles, embedder, settings)
    texts = embedding_texts(chunks, articles)
    assert len(texts) == len(chunks.passages)
    by_article: dict[str, list[tuple]] = {}
    for passage, text in zip(chunks.passages, texts):
        by_article.setdefault(passage.article_id, []).append((passage, text))
        assert text.endswith(passage.text)
        assert [a for a in articles if a.id == passage.article_id][0].text[passage.start:passage.end] == passage.text
    assert all(len(rows) >= 3 for rows in by_article.values())
    assert all(text == f"Talks in Doha\n{p.text}" for p, text in by_article["a"])
    first, *later = by_article["b"]
    assert first[1] == first[0].text  # the lead is already in the first window
    assert later and all(text == f"{lead}\n{p.text}" for p, text in later)
    for p, text in by_article["c"]:
        context = text[: len(text) - len(p.text) - 1]
        assert 0 < len(context) <= CONTEXT_CHARS and context.startswith("Headline Headline")


def _headline_lead_and_both():
    """A lead sentence and three articles holding it: with a headline, without one, and with the headline inside."""
    from qa_service.types import Article

    lead = "The minister met the delegation in Doha on Thursday."
    body = " ".join(f"Sentence number {i} says the talks went on for hours." for i in range(6))
    return lead, [Article("a", "a.txt", "Talks in Doha", None, f"{lead} {body}", "h1"),
                  Article("b", "b.txt", None, None, f"{lead} {body}", "h2"),
                  Article("c", "c.txt", "Talks in Doha", None, f"Talks in Doha. {lead} {body}", "h3")]


def test_bm25_reads_each_passage_with_its_headline_or_lead():
    """lexical_texts: the headline, else the lead sentence, before every passage (even one holding it)."""
    from qa_service.index_texts import embedding_texts, lexical_texts
    from qa_service.store import chunk_articles

    lead, articles = _headline_lead_and_both()
    chunks = chunk_articles(articles, FakeEmbedder(), Settings(max_tokens=24, overlap_sentences=0))
    texts = lexical_texts(chunks, articles)
    assert len(texts) == len(chunks.passages) and len({p.article_id for p in chunks.passages}) == 3
    for passage, text, embedded in zip(chunks.passages, texts, embedding_texts(chunks, articles)):
        if passage.article_id in ("a", "c"):
            assert text == f"Talks in Doha\n{passage.text}"
        elif passage.start == 0:
            assert text == f"{lead}\n{passage.text}" and passage.text.startswith(lead)
            assert embedded == passage.text  # the vector does not repeat it
        else:
            assert text == f"{lead}\n{passage.text}" == embedded  # what the passage's vector was made from
    assert sum(p.article_id == "b" and p.start > 0 for p in chunks.passages) >= 2


def test_sentence_vectors_see_the_headline_or_lead_too(seed_articles):
    """sentence_embedding_texts: the same context as the passages, per sentence; the lead itself stays bare."""
    from qa_service.index_texts import sentence_embedding_texts
    from qa_service.store import chunk_articles
    from qa_service.types import Article

    lead = "The minister met the delegation in Doha on Thursday."
    body = " ".join(f"Sentence number {i} says the talks went on for hours." for i in range(4))
    titled = Article("a", "a.txt", "Talks in Doha", None, f"{lead} {body}", "h1")
    untitled = Article("b", "b.txt", None, None, f"{lead} {body}", "h2")
    chunks = chunk_articles([titled, untitled], FakeEmbedder(), Settings(max_tokens=24, overlap_sentences=0))
    texts = sentence_embedding_texts(chunks, [titled, untitled])
    assert len(texts) == len(chunks.sentences) == 10
    for (article_id, start, end), text in zip(chunks.sentences, texts):
        sentence = (titled if article_id == "a" else untitled).text[start:end]
        if article_id == "a":
            assert text == f"Talks in Doha\n{sentence}"
        elif start == 0:
            assert text == sentence == lead
        else:
            assert text == f"{lead}\n{sentence}"


def test_sentence_groups_cover_each_sentence_and_its_headline_or_lead_in_the_passage_text():
    """sentence_groups: ranges into embedding_texts' text: the sentence and headline or lead as that text has it."""
    from qa_service.index_texts import embedding_texts, sentence_groups
    from qa_service.store import chunk_articles

    lead, articles = _headline_lead_and_both()
    chunks = chunk_articles(articles, FakeEmbedder(), Settings(max_tokens=24, overlap_sentences=1))
    texts, groups = embedding_texts(chunks, articles), sentence_groups(chunks, articles)
    by_id = {a.id: a for a in articles}
    seen = set()
    for _passage, (first, last), text, passage_groups in zip(chunks.passages, chunks.passage_sentences, texts, groups):
        assert len(passage_groups) == last - first + 1
        for k, (context, sentence) in zip(range(first, last + 1), passage_groups):
            article_id, start, end = chunks.sentences[k]
            assert text[sentence[0]:sentence[1]] == by_id[article_id].text[start:end]
            if article_id == "b":
                assert text[context[0]:context[1]] == lead
            else:
                assert text[context[0]:context[1]] == "Talks in Doha"
            seen.add(k)
    assert seen == set(range(len(chunks.sentences)))  # every sentence is pooled from at least one passage


def test_pool_groups_is_the_mean_of_the_chosen_tokens_and_the_special_ones():
    from qa_service.embedding import pool_groups

    tokens = np.array([[1, 0], [0, 1], [0, 3], [5, 5], [1, 1]], dtype=np.float32)  # [CLS] a b c [SEP]
    offsets = np.array([[0, 0], [0, 4], [5, 9], [10, 14], [0, 0]])
    special = np.array([True, False, False, False, True])
    out = pool_groups(tokens, offsets, special, [((0, 4),), ((0, 4), (10, 14)), ((20, 30),)])
    expected = [np.array([2, 2]) / 3, np.array([7, 7]) / 4]
    for row, want in zip(out[:2], expected):
        assert np.allclose(row, want / np.linalg.norm(want))
    assert np.isnan(out[2]).all()


def _lexical_files(settings) -> dict[str, str]:
    from qa_service.manifest import LEXICAL, VOCABULARY

    files = read_manifest(settings.index_dir)["files"]
    return {name: entry["sha256"] for name, entry in files.items() if name.startswith(LEXICAL) or name == VOCABULARY}


@pytest.mark.parametrize("threshold,workers", [("LEXICAL_PARALLEL_MIN", 2), ("LEXICAL_EARLY_MIN", 1)])
def test_lexical_files_written_on_forked_workers_are_the_same(tmp_path, seed_articles, monkeypatch, threshold, workers):
    """A large build writes BM25 and the vocabulary on forked workers, and a build with many passages to embed on one
    worker while it embeds them: byte for byte what one process writes."""
    from qa_service import chunking, store

    here = Settings(index_dir=tmp_path / "here", model="fake-hash-64")
    monkeypatch.setattr(store, "LEXICAL_PARALLEL_MIN", 10**9)
    monkeypatch.setattr(store, "LEXICAL_EARLY_MIN", 10**9)
    _build(here, seed_articles)
    forked = Settings(index_dir=tmp_path / "forked", model="fake-hash-64")
    pools = []
    real_pool = chunking.fork_pool
    monkeypatch.setattr(store, threshold, 1)
    monkeypatch.setattr(chunking, "cores", lambda: 2)
    monkeypatch.setattr(chunking, "fork_pool", lambda n: pools.append(n) or real_pool(n))
    _build(forked, seed_articles)
    assert pools and pools[-1] == workers  # the forked path ran
    assert _lexical_files(forked) == _lexical_files(here) and len(_lexical_files(here)) >= 4
    question = "What did Pezeshkian say about rebuilding Gaza?"
    assert [h.citation.start for h in Searcher(forked, embedder=FakeEmbedder()).search(question, mode="lexical")] == \
           [h.citation.start for h in Searcher(here, embedder=FakeEmbedder()).search(question, mode="lexical")]


@pytest.mark.parametrize("threshold", ["LEXICAL_PARALLEL_MIN", "LEXICAL_EARLY_MIN"])
def test_a_failing_lexical_worker_fails_the_build_and_leaves_the_live_index(tmp_path, seed_articles, monkeypatch,
                                                                            threshold):
    from qa_service import chunking, store
    from qa_service.retrieval.lexical import LexicalIndex

    settings = Settings(index_dir=tmp_path / "index", model="fake-hash-64")
    _build(settings, seed_articles[:2])
    monkeypatch.setattr(store, threshold, 1)
    monkeypatch.setattr(chunking, "cores", lambda: 2)

    def full_disk(*args, **kwargs):  # only the forked workers build the sentences' BM25
        raise OSError("No space left on device")

    monkeypatch.setattr(LexicalIndex, "build", classmethod(full_disk))
    with pytest.raises(OSError, match="No space left"):
        _build(settings, seed_articles)
    assert not list((settings.index_dir / BUILDS).glob(".tmp-*"))
    assert {a.id for a in Searcher(settings, embedder=FakeEmbedder()).articles()} == {a.id for a in seed_articles[:2]}


# --------------------------------------------------------------------------- provenance

def test_metadata_of_every_format_comes_back_from_the_index(tmp_path, fake_embedder):
    """source_url, outlet, author, story and title_from of a .md, a .jsonl and an .html article survive the
    build: the backend gives back the very articles read, and citations carry the original URL and outlet."""
    from qa_service.backends.faiss import FaissBackend
    from qa_service.ingest import load_articles

    from .support.formats import EXPECTED, write_formats_folder

    articles = load_articles(write_formats_folder(tmp_path / "articles")).articles
    settings = Settings(index_dir=tmp_path / "index", model="fake-hash-64")
    _build(settings, articles, fake_embedder)
    backend = FaissBackend(settings)
    try:
        assert backend.articles() == sorted(articles, key=lambda a: a.id)  # every field, text included
        infos = {i.id: i for i in backend.catalog()}
        for article_id, want in EXPECTED.items():
            info = infos[article_id]
            assert {k: getattr(info, k) for k in want} == want
            assert info.title_from == "metadata" and info.story and info.lead_title is None
            assert backend.article_info(article_id) == info
            assert backend.article(article_id).source_url == want["source_url"]
    finally:
        backend.close()
    searcher = Searcher(settings, embedder=fake_embedder)
    hits = searcher.ask("When did the port of Mombasa reopen after the storm?", k=5)["results"]
    assert hits
    for hit in hits:
        c = hit["citation"]
        assert searcher.article(c["article_id"]).text[c["start"]:c["end"]] == hit["text"]
        article = searcher.article(c["article_id"])
        assert (c["source_url"], c["outlet"]) == (article.source_url, article.outlet)
    assert any(h["citation"]["source_url"] == "https://example.com/news/mombasa-port" for h in hits)


def test_seed_articles_without_a_headline_keep_no_stored_title(fake_searcher, seed_articles):
    """An article without a headline is stored with title None (its passages are embedded with its lead, as
    before) and a lead title to show; the index gives back exactly the articles read."""
    from qa_service.ingest import lead_title

    assert fake_searcher.articles() == sorted(seed_articles, key=lambda a: a.id)
    for info in fake_searcher.catalog():
        article = fake_searcher.article(info.id)
        if article.title is None:
            assert info.title_from == "lead" and info.lead_title == lead_title(article.text)
            assert info.shown_title == info.lead_title
        else:
            assert info.lead_title is None and info.shown_title == article.title


def test_an_index_of_an_older_format_says_it_must_be_rebuilt(tmp_path, seed_articles, fake_embedder):
    import json

    settings = Settings(index_dir=tmp_path / "index", model="fake-hash-64")
    _build(settings, seed_articles[:2], fake_embedder)
    path = Path(read_manifest(settings.index_dir)["_build_dir"]) / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({**manifest, "format_version": 1}), encoding="utf-8")
    with pytest.raises(IndexMismatch) as caught:
        read_manifest(settings.index_dir)
    message = caught.value.message
    assert "built by an older qa-service (index format 1; this one reads format 2)" in message
    assert "qa-service index" in message and str(settings.index_dir) in message
    fresh, reason = index_status(settings, seed_articles[:2])
    assert fresh is False and "older qa-service" in reason


def test_a_change_of_metadata_alone_makes_the_index_stale(tmp_path, seed_articles, fake_embedder):
    from dataclasses import replace

    settings = Settings(index_dir=tmp_path / "index", model="fake-hash-64")
    _build(settings, seed_articles, fake_embedder)
    assert index_status(settings, seed_articles) == (True, "up to date")
    regrouped = [replace(a, story="shared") if i < 2 else a for i, a in enumerate(seed_articles)]
    assert index_status(settings, regrouped) == (False, "the articles' metadata changed")
    _build(settings, regrouped, fake_embedder)
    assert index_status(settings, regrouped) == (True, "up to date")
    assert {i.story for i in Searcher(settings, embedder=fake_embedder).catalog()[:2]} == {"shared"}
