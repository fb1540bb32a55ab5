"""The ``postgres`` section: the PostgreSQL backend next to the FAISS folder on the same data, each served by a
real ``qa-service serve`` (2 workers) against a private PostgreSQL + pgvector (``LocalPostgres``).

Two data sets: the seeds, indexed with the real model; and ``Sizes.pg_synthetic`` synthetic passages embedded by
``SyntheticEmbedder`` into both backends. Figures, PostgreSQL's against FAISS's in the same run: in-process and
HTTP p50, and answers/s at 8 and 32 clients. See docs/decisions/postgres-backend.md.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import load
from .harness import Bench, Row, run_cli, time_calls
from .synthetic import SyntheticEmbedder, seed_vocabulary, synthetic_articles


def _database(pg, name: str) -> str:
    import psycopg

    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return pg.url.rsplit("/", 1)[0] + "/" + name


def _compare(b: Bench, label: str, faiss_dir: Path, url: str, host_dir: Path, questions: list[str],
             embedder=None) -> None:
    from qa_service.config import Settings
    from qa_service.retrieval import Searcher

    settings = {"faiss": Settings(index_dir=faiss_dir), "postgres": Settings(index_dir=host_dir, database_url=url)}
    p50 = {}
    for name, s in settings.items():
        searcher = Searcher(s, embedder=embedder) if embedder is not None else Searcher(s)
        for q in questions[:3]:
            searcher.ask(q)
        times, _ = time_calls(lambda q: searcher.ask(q, k=5), questions, b.sizes.pg_latency_n)
        p50[name] = load.percentiles(times)["p50"]
        searcher.backend.close()
    b.add(Row("postgres", f"{label}: in-process Searcher.ask p50, PostgreSQL vs FAISS", p50["postgres"], "ms",
              p50["faiss"], "FAISS"))
    servers = {"faiss": load.Server(faiss_dir, b.work / f"pg-{label}-faiss.log"),
               "postgres": load.Server(host_dir, b.work / f"pg-{label}-pg.log", env={"QA_DATABASE_URL": url})}
    try:
        for s in servers.values():
            s.start()
        for s in servers.values():
            s.wait_first_answer(questions[0], timeout=300)
        http = {}
        for name, s in servers.items():
            load.sequential(s.port, questions, 4)
            http[name] = load.percentiles(load.sequential(s.port, questions, b.sizes.pg_latency_n))["p50"]
        b.add(Row("postgres", f"{label}: POST /api/ask p50, PostgreSQL vs FAISS", http["postgres"], "ms",
                  http["faiss"], "FAISS"))
        for clients in b.sizes.pg_clients:
            r = {name: load.closed_loop(s.port, questions, clients, b.sizes.throughput_seconds, b.sizes.throughput_max)
                 for name, s in servers.items()}
            b.add(Row("postgres", f"{label}: answers/s at {clients} clients, PostgreSQL vs FAISS", r["postgres"]["rps"],
                      "req/s", r["faiss"]["rps"], "FAISS",
                      note=f"p99 {r['postgres']['p99']:.0f} vs {r['faiss']['p99']:.0f} ms; failures "
                           f"{r['postgres']['failures']} vs {r['faiss']['failures']}"))
    finally:
        for s in servers.values():
            s.stop()


def section_postgres(b: Bench) -> None:
    from qa_service.backends.local_postgres import LocalPostgres
    from qa_service.backends.postgres_writer import PostgresWriter
    from qa_service.config import Settings
    from qa_service.embedding import canonical_model_name
    from qa_service.store import SENTENCE_VECTORS, build_index, read_manifest

    started = time.perf_counter()
    pg = LocalPostgres().start()
    b.facts["postgres_start_s"] = time.perf_counter() - started
    try:
        # The seeds, with the real model on both backends.
        url = _database(pg, "bench_seeds")
        seconds = run_cli(["index", str(b.seeds), "--database-url", url, "--index-dir", str(b.work / "pg-indexer")],
                          b.work / "pg-seeds-index.log")
        b.facts["postgres_seed_index_s"] = seconds
        _compare(b, "seeds", b.seed_index, url, b.work / "pg-host", b.questions)

        # A synthetic corpus, the same articles in both backends.
        n = b.sizes.pg_synthetic
        if not n:
            return
        manifest = read_manifest(b.seed_index)
        basis = np.load(Path(manifest["_build_dir"]) / SENTENCE_VECTORS)
        embedder = SyntheticEmbedder(basis, canonical_model_name("all-MiniLM-L6-v2"))
        searcher = b.searcher()
        articles = synthetic_articles(seed_vocabulary(searcher), n, per_article=1)  # one short article per passage
        faiss_dir = b.work / f"syn-{n}-faiss"
        t0 = time.perf_counter()
        build_index(articles, embedder, Settings(index_dir=faiss_dir))  # IVF above the default threshold, as served
        faiss_build = time.perf_counter() - t0
        url = _database(pg, "bench_synthetic")
        t0 = time.perf_counter()
        with PostgresWriter(Settings(index_dir=b.work / "pg-indexer", database_url=url)) as writer:
            summary = writer.sync(articles, embedder)
        pg_build = time.perf_counter() - t0
        label = f"{summary['passages']} synthetic"  # passages as chunked: one per article
        b.add(Row("postgres", f"{label} passages: index build, PostgreSQL vs FAISS", pg_build, "s", faiss_build,
                  "FAISS", note=f"{len(articles)} articles; both chunk the same articles and embed with the "
                  "synthetic embedder; PostgreSQL also builds its HNSW graph and BM25 postings"))
        _compare(b, label, faiss_dir, url, b.work / "pg-host", b.questions, embedder=searcher.embedder)
    finally:
        pg.stop()
