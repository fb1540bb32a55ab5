"""Shared fixtures: small indexes built in temporary folders, with a fake or the real shipped model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from qa_service.config import Settings
from qa_service.ingest import load_articles
from qa_service.store import build_index

from .fakes import FakeEmbedder

REPO = Path(__file__).resolve().parent.parent
SEEDS = REPO / "seeds"
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def seed_articles():
    return load_articles(SEEDS).articles


@pytest.fixture(scope="session")
def fake_embedder():
    return FakeEmbedder()


@pytest.fixture(scope="session")
def fake_index(tmp_path_factory, seed_articles, fake_embedder) -> Settings:
    """Settings for an index of the seeds built with the fake embedder (fast)."""
    root = tmp_path_factory.mktemp("fake-index")
    settings = Settings(index_dir=root / "index", seeds_dir=root / "seeds", model=FakeEmbedder.name)
    shutil.copytree(SEEDS, settings.seeds_dir)
    build_index(seed_articles, fake_embedder, settings)
    return settings


@pytest.fixture(scope="session")
def fake_searcher(fake_index, fake_embedder):
    from qa_service.retrieval import Searcher

    return Searcher(fake_index, embedder=fake_embedder)


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
    from .live_server import LiveServer, link_copy

    root = tmp_path_factory.mktemp("live")
    link_copy(real_index.index_dir, root / "index")
    shutil.copytree(real_index.seeds_dir, root / "seeds")
    server = LiveServer(root / "index", root / "seeds", root / "server.log").start()
    yield server
    server.stop()


def pytest_terminal_summary(terminalreporter):
    """Print what the reliability tests measured (load, memory, fuzzing, crash trials)."""
    from .live_server import FIGURES

    if FIGURES:
        terminalreporter.section("reliability figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
