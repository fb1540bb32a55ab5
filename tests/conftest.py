"""Shared fixtures: small indexes built in temporary folders, with a fake or the real shipped model."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

from qa_service.config import Settings
from qa_service.ingest import load_articles
from qa_service.store import build_index

from .support.fakes import FakeEmbedder
from .support.paths import SEEDS
from .support.postgres import new_database

# The suite's own cache folder (the machine's ONNX export cache lives under it), for this process and every
# process it starts: tests never read or fill the user's ~/.cache, and each run starts from an empty cache.
_CACHE = tempfile.mkdtemp(prefix="qa-service-tests-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE
os.environ.pop("QA_EXPORT_CACHE", None)
atexit.register(shutil.rmtree, _CACHE, True)


@pytest.fixture(autouse=True)
def _no_searcher_yet(monkeypatch):
    """Each test starts as a process that has made no ``Searcher``: its builds may fork (``chunking.forbid_forks``)."""
    from qa_service import chunking

    monkeypatch.setattr(chunking, "_FORKS_FORBIDDEN", False)


@pytest.fixture(scope="session")
def seed_articles():
    return load_articles(SEEDS).articles


@pytest.fixture(scope="session")
def fake_embedder():
    return FakeEmbedder()


@pytest.fixture(scope="session")
def fake_faiss_index(tmp_path_factory, seed_articles, fake_embedder) -> Settings:
    """Settings for an index of the seeds built with the fake embedder (fast)."""
    root = tmp_path_factory.mktemp("fake-index")
    settings = Settings(index_dir=root / "index", seeds_dir=root / "seeds", model=FakeEmbedder.name)
    shutil.copytree(SEEDS, settings.seeds_dir)
    build_index(seed_articles, fake_embedder, settings)
    return settings


@pytest.fixture(scope="session")
def fake_index(fake_faiss_index) -> Settings:
    """The FAISS index of the seeds (a module may override this to run its tests on other backends too)."""
    return fake_faiss_index


@pytest.fixture(scope="session")
def fake_searcher(fake_faiss_index, fake_embedder):
    from qa_service.retrieval import Searcher

    return Searcher(fake_faiss_index, embedder=fake_embedder)


@pytest.fixture(scope="session")
def real_embedder():
    from qa_service.embedding import load_embedder

    return load_embedder("all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def real_index(tmp_path_factory, seed_articles, real_embedder) -> Settings:
    """Settings for an index of the seeds built with the real shipped model."""
    root = tmp_path_factory.mktemp("real-index")
    settings = Settings(index_dir=root / "index", seeds_dir=root / "seeds")
    shutil.copytree(SEEDS, settings.seeds_dir)
    build_index(seed_articles, real_embedder, settings)
    return settings


@pytest.fixture(scope="session")
def real_searcher(real_index, real_embedder):
    from qa_service.retrieval import Searcher

    return Searcher(real_index, embedder=real_embedder)


@pytest.fixture(scope="session")
def live_service(real_index, tmp_path_factory):
    """A real ``qa-service serve`` (2 gunicorn workers, the real model, API key set) over a copy of the real index."""
    from .support.live_server import LiveServer, link_copy

    root = tmp_path_factory.mktemp("live")
    link_copy(real_index.index_dir, root / "index")
    shutil.copytree(real_index.seeds_dir, root / "seeds")
    server = LiveServer(root / "index", root / "seeds", root / "server.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL 18 + pgvector server on a free loopback port, stopped by its pid at the end."""
    from qa_service.backends.local_postgres import LocalPostgres

    server = LocalPostgres().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fake_pg_index(tmp_path_factory, postgres, seed_articles, fake_embedder) -> Settings:
    """Settings for the seeds indexed into PostgreSQL with the fake embedder."""
    from qa_service.backends.postgres_writer import PostgresWriter

    root = tmp_path_factory.mktemp("fake-pg-index")
    settings = Settings(index_dir=root / "index", seeds_dir=root / "seeds", model=FakeEmbedder.name,
                        database_url=new_database(postgres, "fake_seeds"))
    with PostgresWriter(settings) as writer:
        writer.sync(seed_articles, fake_embedder)
    return settings


def pytest_terminal_summary(terminalreporter):
    """Print what the reliability tests measured (load, memory, fuzzing, crash trials)."""
    from .support.live_server import FIGURES

    if FIGURES:
        terminalreporter.section("reliability figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
