"""The ``scale`` section: exact against the automatic dense index (IVF above the threshold) at synthetic sizes, and a
whole synthetic index served by a real worker. See docs/decisions/ann-index.md.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from . import load
from .harness import Bench, Row, time_calls
from .synthetic import SyntheticEmbedder, seed_vocabulary, synthetic_articles, synthetic_vectors


def _basis(b: Bench) -> np.ndarray:
    """Real MiniLM vectors that synthetic vectors are made from (computed once per run).

    The ONNX vectors of the first ``Sizes.basis_titles`` SciFact titles when shared/ has them (unrelated documents,
    as a large index holds); else the seeds' sentence vectors, too few and too alike for recall to say much about
    real data. See docs/decisions/ann-index.md.
    """
    basis = b.facts.get("_basis")
    if basis is not None:
        return basis
    corpus = b.shared / "benchmarks" / "scifact" / "corpus.jsonl"
    if corpus.is_file():
        with open(corpus, encoding="utf-8") as fh:
            titles = [t for t in (json.loads(line).get("title", "").strip()
                                  for _, line in zip(range(b.sizes.basis_titles), fh)) if t]
        basis = b.searcher().embedder.encode(titles, batch_size=64)
        b.facts["basis"] = f"{len(titles):,} SciFact titles"
    else:
        from qa_service.store import SENTENCE_VECTORS, read_manifest

        basis = np.load(Path(read_manifest(b.seed_index)["_build_dir"]) / SENTENCE_VECTORS)
        b.facts["basis"] = f"the {len(basis)} sentence vectors of the seeds"
    b.facts["_basis"] = basis
    return basis


def _query_vectors(b: Bench, n: int) -> tuple[list[str], np.ndarray]:
    """Real questions (SciFact queries when shared/ has them, else the seed questions) and their ONNX vectors."""
    texts = []
    queries = b.shared / "benchmarks" / "scifact" / "queries.jsonl"
    if queries.is_file():
        with open(queries, encoding="utf-8") as fh:
            texts = [json.loads(line)["text"] for _, line in zip(range(n), fh)]
    texts = (texts or b.questions)[:n]
    searcher = b.searcher()
    return texts, searcher.embedder.encode(texts, batch_size=64)


FILTER_SHARES = (0.5, 0.1, 0.02)  # filters the scale section times: half, a tenth and a fiftieth of the passages


def section_scale(b: Bench) -> None:
    """Exact vs automatic (IVF above the threshold) dense index at each size: build, memory, p50, recall@10."""
    import faiss

    from qa_service.config import Settings
    from qa_service.retrieval.dense import DenseIndex, build_dense_index, configure_faiss

    threshold = b.sizes.scale_threshold or Settings().ann_threshold
    basis = _basis(b)
    texts, qvecs = _query_vectors(b, b.sizes.scale_queries)
    searcher = b.searcher()
    small = searcher.backend.dense

    def question_p50(index) -> float:
        """encode a real question + dense top-50 search: the dense part of a question's cost."""
        lat = []
        for i in range(min(len(texts), 50)):
            t0 = time.perf_counter()
            searcher.embedder.encode([texts[i]])
            index.search(qvecs[i:i + 1], 50)
            lat.append((time.perf_counter() - t0) * 1000)
        return float(np.median(lat))

    floor = question_p50(small)
    b.facts["small_index_question_p50_ms"] = floor
    for n in b.sizes.scale:
        configure_faiss()
        t0 = time.perf_counter()
        data = synthetic_vectors(basis, n, seed=n)
        gen_s = time.perf_counter() - t0
        exact = faiss.IndexFlatIP(data.shape[1])
        exact.add(data)
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        _, truth = exact.search(qvecs, 10)  # a batch: BLAS (configure_faiss set the threshold)
        faiss.omp_set_num_threads(1)
        flat_lat = []
        for i in range(b.sizes.flat_timing_queries):
            t0 = time.perf_counter()
            exact.search(qvecs[i:i + 1], 50)
            flat_lat.append((time.perf_counter() - t0) * 1000)
        del exact
        faiss.omp_set_num_threads(os.cpu_count() or 1)  # an index build, like qa-service index, uses every core
        t0 = time.perf_counter()
        index, entry = build_dense_index(data, threshold)
        build_s = time.perf_counter() - t0
        path = b.work / f"scale-{n}.faiss"
        faiss.write_index(index, str(path))
        del index, data
        rss0 = load.memory_mb()
        dense = DenseIndex(path, entry)  # memory-mapped, as a serving worker loads it
        _, found = dense.search(qvecs, 10)
        recall = float(np.mean([len(set(a) & set(t)) / 10 for a, t in zip(found, truth)]))
        search_lat = []
        for i in range(len(qvecs)):
            t0 = time.perf_counter()
            dense.search(qvecs[i:i + 1], 50)
            search_lat.append((time.perf_counter() - t0) * 1000)
        q50 = question_p50(dense)
        rss1 = load.memory_mb()
        filtered = {}  # share of passages a filter allows -> dense top-50 p50 (ms) within them
        rng = np.random.default_rng(n)
        for share in FILTER_SHARES:
            allowed = np.sort(rng.choice(n, max(1, int(share * n)), replace=False)).astype(np.int64)
            lat, _ = time_calls(lambda q, ids=allowed, index=dense: index.search(q.reshape(1, -1), 50, ids),
                                list(qvecs), min(len(qvecs), 50))
            filtered[share] = float(np.median(lat))
        kind = entry["type"] + (f" nlist={entry['nlist']} nprobe={entry['nprobe']}" if "nlist" in entry else "")
        label = f"{n:,} passages"
        b.add(Row("scale", f"{label}: question p50 (encode + dense top-50) vs small-index floor", q50, "ms", floor,
                  f"seeds index ({small.size} passages)", "<= 2" if n >= 1_000_000 else "",
                  f"{kind}; dense search alone p50 {np.median(search_lat):.2f} ms, exact scan p50 "
                  f"{np.median(flat_lat):.1f} ms"))
        b.add(Row("scale", f"{label}: recall@10 of the automatic index vs exact search", recall, "", 1.0, "exact",
                  ">= 0.95" if entry["type"] != "IndexFlatIP" else "",
                  f"{len(qvecs)} real questions over synthetic vectors made from real MiniLM vectors "
                  f"({b.facts['basis']})"))
        b.add(Row("scale", f"{label}: filtered dense top-50 p50, {FILTER_SHARES[1]:.0%} of passages allowed",
                  filtered[FILTER_SHARES[1]], "ms", float(np.median(search_lat)), "unfiltered search",
                  note="; ".join(f"{share:.0%} allowed: {ms:.2f} ms" for share, ms in filtered.items())
                       + " (random passages; a filter is applied before ranking, not after)"))
        b.add(Row("scale", f"{label}: index build", build_s, "s",
                  note=f"{kind}; generating the vectors took {gen_s:.1f} s (not counted)"))
        b.add(Row("scale", f"{label}: memory per passage (index file)", path.stat().st_size / n, "bytes",
                  note=f"RSS +{(rss1.get('rss', 0) - rss0.get('rss', 0)):.0f} MiB after loading (memory-mapped) "
                       f"and {len(qvecs)} searches"))
        del dense
        path.unlink()
    if b.sizes.served_scale:
        _served_scale(b, b.sizes.served_scale)


def _served_scale(b: Bench, n: int) -> None:
    """A whole index of ``n`` synthetic passages (texts, BM25, sentence and passage vectors, IVF above the
    threshold) served by a real ``qa-service serve``: the RSS of one worker after answering, and its HTTP p50.

    Passages are one-sentence synthetic articles (``synthetic.synthetic_articles``) embedded by ``SyntheticEmbedder``;
    the build shares the seeds index's ONNX export as its question encoder, so the worker is the torch-free worker
    a real index of that size gets.
    """
    from qa_service import store
    from qa_service.config import Settings
    from qa_service.embedding import canonical_model_name

    synthetic = SyntheticEmbedder(_basis(b), canonical_model_name("all-MiniLM-L6-v2"))
    articles = synthetic_articles(seed_vocabulary(b.searcher()), n, per_article=1)
    index_dir = b.work / f"served-{n}"
    share = store._share_encoder

    def share_export_embed_synthetically(manifest, build_dir, threads):
        _, entry = share(manifest, build_dir, threads)  # the real ONNX export answers the questions
        return synthetic, entry

    store._share_encoder = share_export_embed_synthetically
    try:
        t0 = time.perf_counter()
        summary = store.build_index(articles, synthetic, Settings(index_dir=index_dir),
                                    encoder_of=store.read_manifest(b.seed_index))
        build_s = time.perf_counter() - t0
    finally:
        store._share_encoder = share
    server = load.Server(index_dir, b.work / f"served-{n}.log").start()
    try:
        server.wait_first_answer(b.questions[0], timeout=300)
        load.sequential(server.port, b.questions, 4)
        big = load.percentiles(load.sequential(server.port, b.questions, b.sizes.latency_n))["p50"]
        seeds = load.percentiles(load.sequential(b.server().port, b.questions, b.sizes.latency_n))["p50"]
        workers = server.worker_pids()
        mem = [load.memory_mb(pid) for pid in workers]
        torch_mapped = any(load.maps_torch(pid) for pid in workers)
    finally:
        server.stop()
    label = f"{summary.passages:,} passages served"
    b.add(Row("scale", f"{label}: POST /api/ask p50 vs the seeds server", big, "ms", seeds, "seeds server",
              note=f"{store.read_manifest(index_dir)['faiss']['type']}; index built in {build_s:.0f} s "
                   f"({summary.articles:,} one-sentence synthetic articles)"))
    if mem:
        worst = max(mem, key=lambda m: m["rss"])
        seed_rss = (b.facts.get("seed_worker_memory_mb") or {}).get("rss")
        b.add(Row("scale", f"{label}: RSS of one serving worker", worst["rss"], "MiB", seed_rss,
                  "seeds worker" if seed_rss else "",
                  note=f"PSS {worst['pss']:.0f} MiB, private {worst['private']:.0f} MiB after "
                       f"{b.sizes.latency_n + 5} answers; libtorch mapped: {'yes' if torch_mapped else 'no'}; "
                       "article texts stay in SQLite until asked for"))

