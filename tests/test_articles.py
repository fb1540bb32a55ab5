"""Single-article writes: upserts by content hash, one writer at a time, and crash safety.

The crash tests SIGKILL a write at every step of the protocol (``articles._checkpoint``) and at random
moments, then start the way the service starts (``server.recover_writes``) and check that the articles
folder and the index hold the whole old or the whole new state, never a mix, and that no article is lost.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from qa_service import articles
from qa_service.articles import JOURNAL, delete_article, put_article, writer_lock
from qa_service.cli import cli
from qa_service.errors import ArticleNotFound, InvalidArticle, WriteBusy
from qa_service.ingest import load_articles
from qa_service.retrieval import Searcher
from qa_service.manifest import read_manifest
from qa_service.store import build_index
from qa_service.web.server import recover_writes

from .support.paths import REPO
from .support.fakes import FakeEmbedder
from .support.live_server import API_KEY, FIGURES, LiveServer, link_copy

NEW_ID = "flamingo-1"
NEW_TEXT = ("date 2025-03-01 The flamingo parade in Tehran drew ten thousand zebras, the organisers said.\n\n"
            "The zebras walked from Azadi Square to the bazaar, where traders sold them carrots.\n")
GONE_ID = "003_ef52944349a1f149"


class CountingEmbedder(FakeEmbedder):
    def __init__(self):
        super().__init__()
        self.texts: list[str] = []

    def encode(self, texts, batch_size=32, progress=False):
        self.texts.extend(texts)
        return super().encode(texts, batch_size, progress)


@pytest.fixture()
def settings(tmp_path, fake_index):
    s = fake_index.with_(index_dir=tmp_path / "index", seeds_dir=tmp_path / "seeds")
    link_copy(fake_index.index_dir, s.index_dir)
    shutil.copytree(fake_index.seeds_dir, s.seeds_dir)
    return s


def state_of(settings) -> dict[str, str]:
    """The folder's articles (id -> hash) after checking the index holds exactly the same."""
    on_disk = {a.id: a.content_hash for a in load_articles(settings.seeds_dir).articles}
    indexed = read_manifest(settings.index_dir)["articles"]
    assert indexed == on_disk, f"folder and index disagree: {set(on_disk) ^ set(indexed)}"
    return on_disk


def test_upsert_embeds_only_the_new_article(settings):
    before = state_of(settings)
    counting = CountingEmbedder()
    result = put_article(settings, NEW_ID, NEW_TEXT.encode(), embedder=counting)
    assert result.action == "created" and result.embedded_articles == 1
    embedded = "\n".join(counting.texts)
    assert "flamingo parade" in embedded
    for article in load_articles(settings.seeds_dir).articles:
        if article.id != NEW_ID:
            assert article.text[:80] not in embedded  # unchanged articles keep their vectors
    after = state_of(settings)
    assert set(after) == set(before) | {NEW_ID} and read_manifest(settings.index_dir)["counts"]["reused_articles"] == 5
    assert Searcher(settings, embedder=FakeEmbedder()).search("flamingo zebras", k=1)[0].citation.article_id == NEW_ID

    counting = CountingEmbedder()
    assert put_article(settings, NEW_ID, NEW_TEXT.encode(), embedder=counting).action == "unchanged"
    assert counting.texts == []
    result = delete_article(settings, NEW_ID, embedder=counting)
    assert result.action == "deleted" and counting.texts == []  # removing embeds nothing
    assert state_of(settings) == before
    with pytest.raises(ArticleNotFound):
        delete_article(settings, NEW_ID, embedder=counting)


@pytest.mark.parametrize("bad", ["../x", "x/../../y", "/abs", "a\x00", "a\uff0fb", "\u202ex", "a.txt", "", "é"])
def test_ids_outside_the_allow_list_never_touch_the_disk(settings, tmp_path, bad):
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(InvalidArticle) as err:
        put_article(settings, bad, b"Some text.", embedder=FakeEmbedder())
    assert err.value.code == "article_id_invalid"
    with pytest.raises(InvalidArticle):
        delete_article(settings, bad, embedder=FakeEmbedder())
    with pytest.raises(InvalidArticle):
        articles.article_path(settings.seeds_dir, bad)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_one_writer_at_a_time_across_processes(settings):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from qa_service.articles import writer_lock
        with writer_lock({str(settings.index_dir)!r}):
            print("locked", flush=True)
            time.sleep(30)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with pytest.raises(WriteBusy):
            put_article(settings, NEW_ID, NEW_TEXT.encode(), embedder=FakeEmbedder(), timeout=0.3)
        assert time.monotonic() - started < 5
    finally:
        holder.send_signal(signal.SIGKILL)  # a dead holder's lock is released by the kernel
        holder.wait()
    with writer_lock(settings.index_dir, timeout=5):
        pass
    assert NEW_ID not in state_of(settings)


def test_index_command_finishes_an_interrupted_upload(settings, monkeypatch):
    """A write that died after publishing is completed by the next `qa-service index` (no model needed)."""

    class Crash(BaseException):
        pass

    def crash_after_publish(step):
        if step == "published":
            raise Crash()

    monkeypatch.setattr(articles, "_checkpoint", crash_after_publish)
    with pytest.raises(Crash):
        put_article(settings, NEW_ID, NEW_TEXT.encode(), embedder=FakeEmbedder())
    assert (settings.index_dir / JOURNAL).exists() and not (settings.seeds_dir / f"{NEW_ID}.txt").exists()
    monkeypatch.undo()
    result = CliRunner().invoke(cli, ["index", str(settings.seeds_dir), "--index-dir", str(settings.index_dir),
                                      "--model", "fake-hash-64"])
    assert result.exit_code == 0, result.output
    assert f"finished an interrupted upload of article {NEW_ID}" in result.output
    assert "index is up to date: 6 articles" in result.output
    assert (settings.seeds_dir / f"{NEW_ID}.txt").read_bytes() == NEW_TEXT.encode()
    assert NEW_ID in state_of(settings)


# --------------------------------------------------------------------------- SIGKILL at every step

_WRITER = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {repo!r})
    import numpy as np
    from tests.support.fakes import FakeEmbedder
    from qa_service import articles, store
    from qa_service.config import Settings

    op, kill_at = sys.argv[1], sys.argv[2]

    class Slow(FakeEmbedder):
        def encode(self, texts, batch_size=32, progress=False):
            out = []
            for t in texts:  # slow enough that a timed kill lands inside the write
                time.sleep(0.02)
                out.append(super().encode([t])[0])
            return np.array(out, dtype="float32").reshape(len(texts), self.dimension)

    def die(step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    articles._checkpoint = die
    publish = store._publish

    def publish_then_maybe_die(index_dir, build_id):
        die("before-publish")
        publish(index_dir, build_id)
        die("after-publish")

    store._publish = publish_then_maybe_die
    settings = Settings(index_dir={index!r}, seeds_dir={seeds!r}, model="fake-hash-64")
    print("ready", flush=True)
    if op == "put":
        articles.put_article(settings, {new_id!r}, {new_text!r}.encode(), embedder=Slow())
    elif op == "put-md":  # replaces <gone_id>.txt by <gone_id>.md: the .txt must go in the same step
        articles.put_article(settings, {gone_id!r}, {new_text!r}.encode(), embedder=Slow(), metadata={meta!r})
    else:
        articles.delete_article(settings, {gone_id!r}, embedder=Slow())
    print("done", flush=True)
""")

STEPS = ["staged", "journaled", "before-publish", "after-publish", "published", "applied"]
MD_STEPS = STEPS[:-1] + ["replaced", "applied"]  # "replaced": the .md is in place, the old .txt not yet removed
META = {"title": "Zebras in Tehran", "date": "2025-03-01", "url": "https://news.example.com/zebras",
        "outlet": "Example News"}


def _trial(settings, op: str, kill_at: str, delay: float | None, rng) -> str:
    script = _WRITER.format(repo=str(REPO), index=str(settings.index_dir), seeds=str(settings.seeds_dir),
                            new_id=NEW_ID, new_text=NEW_TEXT, gone_id=GONE_ID, meta=META)
    proc = subprocess.Popen([sys.executable, "-c", script, op, kill_at], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    if delay is not None:
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    return "killed" if proc.returncode == -signal.SIGKILL else f"exit {proc.returncode}"


def test_killed_uploads_and_removals_leave_the_old_or_the_new_state(settings):
    """SIGKILL writes at each protocol step and at random moments; then start up as the service does."""
    old = state_of(settings)
    new_after_put = None
    outcomes: Counter = Counter()
    rng = random.Random(11)
    plan = [("put", step, None) for step in STEPS] + [("delete", step, None) for step in STEPS[1:5]]
    plan += [("put", "", rng.uniform(0.0, 1.5)) for _ in range(5)] + [("delete", "", rng.uniform(0.0, 1.5))
                                                                      for _ in range(3)]
    plan += [("put-md", step, None) for step in MD_STEPS] + [("put-md", "", rng.uniform(0.0, 1.5))
                                                             for _ in range(2)]
    original = (settings.seeds_dir / f"{GONE_ID}.txt").read_bytes()
    for op, kill_at, delay in plan:
        how = _trial(settings, op, kill_at, delay, rng)
        recover_writes(settings)  # what `qa-service serve` does at start-up
        state = state_of(settings)  # folder == index: never a mix
        assert not list(settings.seeds_dir.glob(".*")) and not (settings.index_dir / JOURNAL).exists()
        files = sorted(p.name for p in settings.seeds_dir.glob(f"{GONE_ID}.*"))  # never the .txt and the .md
        assert len(files) == (0 if op == "delete" and GONE_ID not in state else 1), (op, kill_at, delay, files)
        if op == "put-md":
            outcome = "new" if state != old else "old"
            assert {k: v for k, v in state.items() if k != GONE_ID} == without_gone(old), (op, kill_at, delay)
            assert files == [f"{GONE_ID}.md" if outcome == "new" else f"{GONE_ID}.txt"], (op, kill_at, files)
            if outcome == "new":
                (article,) = [a for a in load_articles(settings.seeds_dir).articles if a.id == GONE_ID]
                assert (article.title, article.date, article.source_url, article.outlet) == (
                    META["title"], META["date"], META["url"], META["outlet"])
                assert article.text == NEW_TEXT.strip()
        elif op == "put":
            wanted_new = {**old, NEW_ID: state.get(NEW_ID)}
            assert state in (old, wanted_new), (op, kill_at, delay, set(state) ^ set(old))
            outcome = "new" if state != old else "old"
            if outcome == "new":
                assert (settings.seeds_dir / f"{NEW_ID}.txt").read_text() == NEW_TEXT
                new_after_put = new_after_put or state
        else:
            without = {k: v for k, v in old.items() if k != GONE_ID}
            assert state in (old, without), (op, kill_at, delay)
            outcome = "new" if state == without else "old"
        searcher = Searcher(settings, embedder=FakeEmbedder())  # the service starts and answers
        assert searcher.search("Gaza ceasefire", k=3)
        outcomes[(op, outcome, how)] += 1
        if state != old:  # back to the old state for the next trial
            if op == "put-md":
                put_article(settings, GONE_ID, original, embedder=FakeEmbedder())  # the .txt again, the .md gone
            elif op == "put":
                delete_article(settings, NEW_ID, embedder=FakeEmbedder())
            else:
                shutil.copy(REPO / "seeds" / f"{GONE_ID}.txt", settings.seeds_dir)
                build_index(load_articles(settings.seeds_dir).articles, FakeEmbedder(), settings)
            assert state_of(settings) == old
    # each step boundary lands where it must: before the publish the old state, after it the new one
    assert outcomes[("put", "old", "killed")] >= 3 and outcomes[("put", "new", "killed")] >= 3
    assert outcomes[("delete", "old", "killed")] >= 2 and outcomes[("delete", "new", "killed")] >= 2
    assert outcomes[("put-md", "old", "killed")] >= 3 and outcomes[("put-md", "new", "killed")] >= 3
    summary = ", ".join(f"{op} {how} -> {state}: {n}" for (op, state, how), n in sorted(outcomes.items()))
    FIGURES.append(f"write kill test (fake model): {len(plan)} trials ({len(STEPS) + 4 + len(MD_STEPS)} at "
                   f"protocol steps, 10 at random moments); {summary}; 0 mixed states, 0 lost articles")


def without_gone(state: dict) -> dict:
    return {k: v for k, v in state.items() if k != GONE_ID}


# --------------------------------------------------------------------------- the real service, killed mid-upload

@pytest.mark.slow
def test_killed_service_mid_upload_restarts_whole(real_index, tmp_path):
    """SIGKILL the whole `qa-service serve` (master and workers) during an upload; restart; check state."""
    index_dir, seeds_dir = tmp_path / "index", tmp_path / "seeds"
    link_copy(real_index.index_dir, index_dir)
    shutil.copytree(real_index.seeds_dir, seeds_dir)
    old = {a.id for a in load_articles(seeds_dir).articles}
    rng = random.Random(5)
    outcomes: Counter = Counter()
    trials = 3
    for _trial in range(trials):
        server = LiveServer(index_dir, seeds_dir, tmp_path / "server.log", workers=1).start()
        import threading

        answer: dict = {}

        def upload():
            try:
                answer["r"] = requests.post(server.url + "/api/articles", json={"id": NEW_ID, "text": NEW_TEXT},
                                            headers={"X-API-Key": API_KEY}, timeout=60)
            except requests.RequestException as exc:
                answer["error"] = exc

        thread = threading.Thread(target=upload)
        thread.start()
        time.sleep(rng.uniform(0.05, 1.5))
        server.stop(signal.SIGKILL)
        thread.join(60)

        server = LiveServer(index_dir, seeds_dir, tmp_path / "server.log", workers=1).start()
        try:
            listed = {a["id"] for a in requests.get(server.url + "/api/articles", timeout=10).json()["articles"]}
            on_disk = {a.id for a in load_articles(seeds_dir).articles}
            assert listed == on_disk == set(read_manifest(index_dir)["articles"]), (listed, on_disk)
            assert listed in (old, old | {NEW_ID})
            if "r" in answer and answer["r"].status_code in (200, 201):
                assert NEW_ID in listed  # an acknowledged upload is never lost
            r = requests.post(server.url + "/api/ask", json={"question": "flamingo parade zebras", "k": 1}, timeout=60)
            assert r.status_code == 200
            if NEW_ID in listed:
                assert r.json()["results"][0]["citation"]["article_id"] == NEW_ID
                outcomes["new"] += 1
                assert requests.delete(server.url + f"/api/articles/{NEW_ID}", headers={"X-API-Key": API_KEY},
                                       timeout=60).status_code == 200
            else:
                outcomes["old"] += 1
        finally:
            server.stop()
        assert not list(seeds_dir.glob(".*")) and not (index_dir / JOURNAL).exists()
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log
    FIGURES.append(f"service kill test (real model, gunicorn SIGKILLed mid-upload): {trials} trials, "
                   f"{outcomes['old']} came back old, {outcomes['new']} new, 0 mixed, 0 lost")


@pytest.mark.slow
def test_index_command_updates_incrementally(real_index, tmp_path):
    """`qa-service index` on a folder with an article added, one changed and one removed: only those two
    are embedded, and the index then holds exactly the folder."""
    index_dir, seeds_dir = tmp_path / "index", tmp_path / "seeds"
    link_copy(real_index.index_dir, index_dir)
    shutil.copytree(real_index.seeds_dir, seeds_dir)
    (seeds_dir / f"{NEW_ID}.txt").write_text(NEW_TEXT, encoding="utf-8")
    changed = seeds_dir / "001_714cc25dd3f7c4d2.txt"
    changed.chmod(0o644)
    with open(changed, "a", encoding="utf-8") as fh:
        fh.write("\n\nThe okapi delegation arrived in Doha on Friday, officials said.\n")
    (seeds_dir / f"{GONE_ID}.txt").unlink()

    result = CliRunner().invoke(cli, ["index", str(seeds_dir), "--index-dir", str(index_dir)])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(index_dir)
    assert manifest["articles"] == {a.id: a.content_hash for a in load_articles(seeds_dir).articles}
    assert manifest["counts"]["reused_articles"] == 3  # the three untouched articles were not re-embedded
    searcher = Searcher(real_index.with_(index_dir=index_dir))
    assert searcher.search("flamingo parade with zebras", k=1)[0].citation.article_id == NEW_ID
    assert searcher.search("okapi delegation in Doha", k=1)[0].citation.article_id == "001_714cc25dd3f7c4d2"
    again = CliRunner().invoke(cli, ["index", str(seeds_dir), "--index-dir", str(index_dir)])
    assert "index is up to date: 5 articles" in again.output


def test_serve_refuses_a_truncated_index_with_the_rebuild_message(settings, monkeypatch):
    monkeypatch.delenv("FLASK_DEBUG", raising=False)
    vectors = Path(read_manifest(settings.index_dir)["_build_dir"]) / "vectors.faiss"
    data = vectors.read_bytes()
    vectors.unlink()  # a hard link into the shared fixture: replace it, never write through it
    vectors.write_bytes(data[: len(data) // 3])
    result = CliRunner().invoke(cli, ["serve", "--index-dir", str(settings.index_dir), "--model", "fake-hash-64"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert ("truncated" in result.output
            and f"qa-service index SEEDS_DIR --index-dir {settings.index_dir}" in result.output)


def test_single_article_writes_never_start_ray(tmp_path, fake_index, monkeypatch):
    """QA_RAY_ADDRESS is for indexing jobs: an upload through the API embeds one article in-process."""
    import shutil

    from qa_service.articles import delete_article, put_article
    from qa_service.embedding import ray as distributed
    from tests.support.fakes import FakeEmbedder
    from .support.live_server import link_copy

    settings = fake_index.with_(index_dir=tmp_path / "index", seeds_dir=tmp_path / "seeds", ray_address="local")
    link_copy(fake_index.index_dir, settings.index_dir)
    shutil.copytree(fake_index.seeds_dir, settings.seeds_dir)
    seen = []
    real = distributed.maybe_distributed
    monkeypatch.setattr(distributed, "maybe_distributed", lambda e, s: seen.append(s.ray_address) or real(e, s))
    put_article(settings, "ray-free", b"A short article about quokkas on Rottnest Island.", embedder=FakeEmbedder())
    delete_article(settings, "ray-free", embedder=FakeEmbedder())
    assert seen and set(seen) == {None}


def test_a_journal_written_before_markdown_writes_is_still_settled(settings):
    """A journal without ``target``/``remove`` (written by an earlier version) names ``<id>.txt``, as it meant."""
    import json

    from qa_service.articles import recover

    staged = settings.seeds_dir / f".{NEW_ID}.txt.0123456789ab.staged"
    staged.write_text(NEW_TEXT, encoding="utf-8")
    journal = {"op": "put", "id": NEW_ID, "seeds_dir": str(settings.seeds_dir), "staged": staged.name,
               "sha256": None, "base_build": "an-older-build"}  # CURRENT has moved on: the write was published
    (settings.index_dir / JOURNAL).write_text(json.dumps(journal), encoding="utf-8")
    assert recover(settings.index_dir, settings.seeds_dir) == f"finished an interrupted upload of article {NEW_ID}"
    assert (settings.seeds_dir / f"{NEW_ID}.txt").read_text(encoding="utf-8") == NEW_TEXT and not staged.exists()
    journal = {"op": "delete", "id": NEW_ID, "seeds_dir": str(settings.seeds_dir), "staged": None,
               "sha256": None, "base_build": "an-older-build"}
    (settings.index_dir / JOURNAL).write_text(json.dumps(journal), encoding="utf-8")
    assert recover(settings.index_dir, settings.seeds_dir).startswith("finished an interrupted removal")
    assert not (settings.seeds_dir / f"{NEW_ID}.txt").exists()


def test_a_journal_naming_files_outside_the_article_is_refused(settings):
    import json

    from qa_service.articles import recover

    journal = {"op": "delete", "id": NEW_ID, "seeds_dir": str(settings.seeds_dir), "staged": None, "sha256": None,
               "base_build": "an-older-build", "target": None, "remove": [f"{GONE_ID}.txt"]}
    (settings.index_dir / JOURNAL).write_text(json.dumps(journal), encoding="utf-8")
    with pytest.raises(ValueError, match="names files other than"):
        recover(settings.index_dir, settings.seeds_dir)
    assert (settings.seeds_dir / f"{GONE_ID}.txt").exists()


def test_writes_go_to_the_folder_the_index_was_built_from_wherever_they_run(settings, tmp_path, monkeypatch):
    """Without QA_SEEDS_DIR a write uses the absolute folder the index records, not ./seeds of the process."""
    from qa_service.indexing import articles_folder, index_folder

    monkeypatch.setattr("qa_service.embedding.load_embedder", lambda name: FakeEmbedder())
    index_folder(settings, settings.seeds_dir, force=True, progress=False)
    assert read_manifest(settings.index_dir)["articles_dir"] == str(settings.seeds_dir.resolve())
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "seeds").mkdir(parents=True)  # a decoy: the old default, relative to the working directory
    monkeypatch.chdir(elsewhere)
    unset = settings.with_(seeds_dir=None)
    assert articles_folder(unset) == settings.seeds_dir.resolve()
    result = put_article(unset, NEW_ID, NEW_TEXT.encode(), embedder=FakeEmbedder())
    assert result.action == "created" and (settings.seeds_dir / f"{NEW_ID}.txt").exists()
    assert not list((elsewhere / "seeds").iterdir())
    assert read_manifest(settings.index_dir)["articles_dir"] == str(settings.seeds_dir.resolve())
    delete_article(unset, NEW_ID, embedder=FakeEmbedder())
    assert not (settings.seeds_dir / f"{NEW_ID}.txt").exists()


def test_after_a_write_the_index_is_exactly_what_a_rebuild_from_the_folder_would_be(settings):
    """A write leaves nothing for the next ``qa-service index`` to do: the same articles, metadata, stories and
    folder as reading the folder again gives."""
    from qa_service.manifest import index_status

    put_article(settings, NEW_ID, NEW_TEXT.encode(), embedder=FakeEmbedder(),
                metadata={"title": "Zebras", "url": "https://news.example.com/zebras", "outlet": "Example News"})
    put_article(settings, "copy-1", (settings.seeds_dir / f"{GONE_ID}.txt").read_bytes(), embedder=FakeEmbedder())
    folder = load_articles(settings.seeds_dir).articles
    assert index_status(settings, folder, articles_dir=settings.seeds_dir) == (True, "up to date")
    stories = {a.id: a.story for a in Searcher(settings, embedder=FakeEmbedder()).catalog()}
    assert stories == {a.id: a.story for a in folder}
    assert stories["copy-1"] == stories[GONE_ID]  # a copy of a seed shares its story at once
