"""The ``postgres`` benchmark section: the PostgreSQL backend next to the FAISS folder on the same data.

Two data sets, each served twice by real ``qa-service serve`` processes (2 gunicorn workers), one on the
FAISS folder and one on a private PostgreSQL 18 + pgvector (``LocalPostgres``) holding the same articles:

* the seeds, indexed with the real model (``qa-service index``, ONNX question encoder on both);
* a synthetic corpus of ``Sizes.pg_synthetic`` passages (one short article of one sentence each, Zipf-drawn
  words of the seeds' vocabulary) whose vectors come from ``SyntheticEmbedder`` (real MiniLM sentence vectors mixed by word
  hashes, so they cluster like real ones), indexed into both backends. Such an index has no ONNX export,
  so both servers encode questions with sentence-transformers; the encoder's cost is the same on both.

Figures, each PostgreSQL's against FAISS's measured in the same run: in-process ``Searcher.ask`` p50,
``POST /api/ask`` p50 over loopback, and answers/s at 8 and 32 closed-loop clients.
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

import numpy as np

from . import load


class SyntheticEmbedder:
    """Deterministic vectors near real ones: a text is the normalised sum of its words' vectors, each word's
    vector being one of ``basis`` (real sentence vectors) picked by the word's hash. No model, no torch."""

    backend = "synthetic"

    def __init__(self, basis: np.ndarray, name: str, max_seq_length: int = 256):
        self.basis = np.asarray(basis, dtype=np.float32)
        self.name = name
        self.dimension = self.basis.shape[1]
        self.max_seq_length = max_seq_length
        self._ids: dict[str, int] = {}

    def _word(self, word: str) -> int:
        i = self._ids.get(word)
        if i is None:
            i = self._ids[word] = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little") % len(self.basis)
        return i

    def encode(self, texts, batch_size: int = 32, progress: bool = False) -> np.ndarray:
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            ids = [self._word(w) for w in re.findall(r"\w+", text.lower())] or [0]
            out[row] = self.basis[ids].sum(axis=0)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def count_tokens(self, text: str) -> int:
        return len(re.findall(r"\w+|[^\w\s]", text))


def seed_vocabulary(searcher) -> list[str]:
    """The alphabetic words of the indexed articles, sorted: what ``synthetic_articles`` draws from."""
    from qa_service.retrieval.lexical import words

    return sorted({w for a in searcher.articles() for w in words(a.text) if w.isalpha()})


def synthetic_articles(words: list[str], passages: int, per_article: int = 10, seed: int = 7):
    """``passages`` one-sentence paragraphs in articles of ``per_article``, Zipf-distributed words."""
    from qa_service.types import Article

    rng = np.random.default_rng(seed)
    words = [words[i] for i in rng.permutation(len(words))]  # frequency rank unrelated to spelling
    weights = 1.0 / np.arange(1, len(words) + 1)
    weights /= weights.sum()
    out = []
    for a in range(0, passages, per_article):
        paragraphs = []
        for _ in range(min(per_article, passages - a)):
            picked = rng.choice(len(words), size=int(rng.integers(12, 24)), p=weights)
            sentence = " ".join(words[i] for i in picked)
            paragraphs.append(sentence[:1].upper() + sentence[1:] + ".")
        text = "\n\n".join(paragraphs)
        day = 1 + a // per_article % 28
        out.append(Article(f"syn-{a // per_article:06d}", f"syn-{a // per_article:06d}.txt", f"Synthetic {a}",
                           f"2025-01-{day:02d}", text, hashlib.sha256(text.encode()).hexdigest()))
    return out


def _database(pg, name: str) -> str:
    import psycopg

    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return pg.url.rsplit("/", 1)[0] + "/" + name


def _compare(b, label: str, faiss_dir: Path, url: str, host_dir: Path, questions: list[str], embedder=None) -> None:
    from qa_service.config import Settings
    from qa_service.retrieval import Searcher

    from .suite import Row, time_calls

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


def section_postgres(b) -> None:
    from qa_service.backends.local_postgres import LocalPostgres
    from qa_service.backends.postgres_writer import PostgresWriter
    from qa_service.config import Settings
    from qa_service.embedding import canonical_model_name
    from qa_service.store import SENTENCE_VECTORS, build_index, read_manifest

    from .suite import Row, run_cli

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
