"""The ``build``, ``cold`` and ``ray`` sections: ``qa-service index`` against raw encode of the same texts, a
served index's cold start, and the build's encoder on a local Ray actor pool against one process.

See docs/decisions/build-target.md and docs/decisions/ray-indexing.md.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np

from . import load
from .harness import SEED_QUESTIONS, Bench, Row, run_cli


def _build_corpus(b: Bench, name: str = "build-corpus", skip: int = 0) -> tuple[Path, str] | None:
    """Write ``build_docs`` articles to a folder: SciFact abstracts (from the ``skip``-th) when shared/ has them.

    Without SciFact the seeds stand in, once (``skip`` 0); None for any later corpus.
    """
    folder = b.work / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    corpus = b.shared / "benchmarks" / "scifact" / "corpus.jsonl"
    if corpus.is_file():
        with open(corpus, encoding="utf-8") as fh:
            for i, line in zip(range(skip + b.sizes.build_docs), fh):
                if i >= skip:
                    row = json.loads(line)
                    (folder / f"{i:05d}_{row['_id']}.txt").write_text(f"{row['title']}\n\n{row['text']}\n",
                                                                       encoding="utf-8")
        return folder, f"{b.sizes.build_docs} SciFact abstracts"
    if skip:
        return None
    for path in sorted(b.seeds.glob("*.txt")):
        shutil.copy(path, folder / path.name)
    return folder, "the seeds"


def _built_texts(index_dir: Path, corpus: Path):
    """Return the live build's manifest, its ONNX encoder, and the texts its passage and sentence vectors came from.

    The texts are rebuilt by chunking ``corpus`` again (each passage and sentence after its headline or lead
    sentence, as the build embedded them), after checking the chunks are exactly the build's.
    """
    from qa_service.config import Settings
    from qa_service.embedding.onnx_encoder import INDEXING_THREADS, OnnxEmbedder
    from qa_service.ingest import load_articles
    from qa_service.store import (PASSAGES_DB, chunk_articles, embedding_texts, read_manifest,
                                  sentence_embedding_texts)

    manifest = read_manifest(index_dir)
    con = sqlite3.connect(Path(manifest["_build_dir"]) / PASSAGES_DB)
    passages = [r[0] for r in con.execute("SELECT text FROM passages ORDER BY id")]
    sentences = [tuple(r) for r in con.execute('SELECT article_id, start, "end" FROM sentences ORDER BY id')]
    con.close()
    onnx = OnnxEmbedder.from_manifest(manifest, threads=INDEXING_THREADS)
    articles = load_articles(corpus).articles
    chunks = chunk_articles(articles, onnx, Settings(index_dir=index_dir))
    if [p.text for p in chunks.passages] != passages or chunks.sentences != sentences:
        raise RuntimeError("re-chunking the build corpus did not give the build's passages and sentences")
    return manifest, onnx, embedding_texts(chunks, articles), sentence_embedding_texts(chunks, articles)


def _seconds_by_step(manifest: dict, seconds: float) -> str:
    phases = dict(manifest.get("build_seconds") or {})
    phases["start-up"] = seconds - sum(phases.values())  # interpreter, imports, loading the model
    return ", ".join(f"{k} {v:.1f}" for k, v in sorted(phases.items(), key=lambda kv: -kv[1]) if v >= 0.05)


def section_build(b: Bench) -> None:
    """``qa-service index`` against raw encode of the same texts, same backend: a first build, then new folders
    with the export cached and re-indexes, which hold the build target.

    The first build's one-time export is a row of its own; each row with a target is the median of
    ``build_rounds`` rounds of a raw encode and its build timed back to back. See docs/decisions/build-target.md.
    """
    from qa_service.config import Settings
    from qa_service.embedding.onnx_encoder import INDEXING_THREADS, OnnxEmbedder
    from qa_service.embedding.torch_encoder import SentenceTransformerEmbedder
    from qa_service.store import read_manifest

    batch = Settings().batch_size  # the floors encode in the build's own batches, so batching is no advantage

    def raw_encode(manifest: dict, texts: list[str]) -> float:
        """Seconds for a new encoder of ``manifest``'s export (its session opened by the first batch, as a build
        opens its own) to embed ``texts``."""
        onnx = OnnxEmbedder.from_manifest(manifest, threads=INDEXING_THREADS)
        t0 = time.perf_counter()
        onnx.encode(texts, batch_size=batch)
        return time.perf_counter() - t0

    corpus, what = _build_corpus(b)
    later = _build_corpus(b, "reindex-corpus", skip=b.sizes.build_docs)
    index_dir = b.work / "build-index"
    shutil.rmtree(index_dir, ignore_errors=True)
    cache = b.work / "export-cache"  # the machine's ONNX export cache, empty: this is a first build on a machine
    shutil.rmtree(cache, ignore_errors=True)
    seconds = run_cli(["index", str(corpus), "--index-dir", str(index_dir)], b.work / "build.log",
                      QA_EXPORT_CACHE=str(cache))
    manifest, onnx, embedded, sentences = _built_texts(index_dir, corpus)
    b.facts["build_index"] = index_dir
    n, m = len(embedded), len(sentences)
    pooled = manifest.get("sentence_vectors") == "pooled"  # sentence vectors came from the passage pass
    t_sent = 0.0
    if not pooled:
        t0 = time.perf_counter()
        onnx.encode(sentences, batch_size=2 * batch)
        t_sent = time.perf_counter() - t0

    cached: list[tuple[float, float, dict]] = []  # (raw encode s, build s, manifest) of each round
    reindexed: list[tuple[float, float, dict, int, int]] = []  # (.., passages, sentences)
    live, other = corpus, (later[0] if later else None)
    for r in range(max(1, b.sizes.build_rounds)):
        # the live build's export: the same files as the first build's, which later re-indexes prune
        t_pass = raw_encode(read_manifest(index_dir), embedded)
        # The same articles into another new folder: the export the first build left in the machine's cache is used.
        index_dir3 = b.work / "build-index-cached"
        shutil.rmtree(index_dir3, ignore_errors=True)
        seconds3 = run_cli(["index", str(corpus), "--index-dir", str(index_dir3)], b.work / "build.log",
                           QA_EXPORT_CACHE=str(cache))
        manifest3 = read_manifest(index_dir3)
        if not manifest3["encoder"].get("reused_from"):
            raise RuntimeError("the second new folder did not take the export from the machine's cache")
        shutil.rmtree(index_dir3, ignore_errors=True)
        cached.append((t_pass, seconds3, manifest3))
        if r == 0:
            first_floor, first_cached = t_pass, seconds3
            st = SentenceTransformerEmbedder("all-MiniLM-L6-v2")
            t0 = time.perf_counter()
            st.encode(embedded, batch_size=batch)
            t_torch = time.perf_counter() - t0
            del st
        if other is None:
            continue
        before = Path(read_manifest(index_dir)["_build_dir"]).name
        seconds2 = run_cli(["index", str(other), "--index-dir", str(index_dir)], b.work / "build.log",
                           QA_EXPORT_CACHE=str(cache))
        manifest2, _onnx2, embedded2, sentences2 = _built_texts(index_dir, other)
        if manifest2["encoder"].get("reused_from") != before or manifest2["counts"].get("reused_articles"):
            raise RuntimeError("the re-index did not share the live build's ONNX export, or kept some vectors")
        reindexed.append((raw_encode(manifest2, embedded2), seconds2, manifest2, len(embedded2), len(sentences2)))
        live, other = other, live

    def median_round(rounds: list) -> tuple[int, str]:
        """The index of the round with the median ratio (raw encode s / build s), and every round's ratio."""
        ratios = [t / s for t, s, *_ in rounds]
        order = sorted(range(len(ratios)), key=ratios.__getitem__)
        return order[(len(order) - 1) // 2], ", ".join(f"{x:.2f}" for x in ratios)

    sentences_how = "pooled from the passage pass" if pooled else "embedded apart"
    k, ratios = median_round(cached)
    t_pass, seconds3, manifest3 = cached[k]
    rounds_note = (f"median of {len(cached)} rounds of raw encode then build (ratios {ratios}); "
                   if len(cached) > 1 else "")
    b.add(Row("build", "qa-service index, passages/s vs raw ONNX encode of the same passages (a new folder; the "
              "model's ONNX export cached on this machine, as after the README's set-up: no torch)", n / seconds3,
              "passages/s", n / t_pass, "raw encode", ">= 0.9",
              f"{rounds_note}{what}: {n} passages, {m} sentences ({sentences_how}), {seconds3:.1f} s in all; "
              f"seconds by step: {_seconds_by_step(manifest3, seconds3)}"))
    b.add(Row("build", "qa-service index, first build on a machine (empty export cache: loads torch, exports the "
              "model to ONNX once), passages/s vs raw ONNX encode of the same passages", n / seconds, "passages/s",
              n / first_floor, "raw encode",
              note=f"{what}: {n} passages, {seconds:.1f} s in all; seconds by step: "
                   f"{_seconds_by_step(manifest, seconds)}; floor: the raw encode right after it"))
    b.add(Row("build", "the first build's one-time cost on a machine (importing torch and sentence-transformers, "
              "exporting, fusing and checking the ONNX model): the first build minus the same build with the export "
              "cached", seconds - first_cached, "s",
              note="paid once per machine and model; the export is kept in the machine's cache (QA_EXPORT_CACHE) "
                   "and in each index folder; the cached build of the first round"))
    if not pooled:
        b.add(Row("build", "qa-service index, texts embedded/s (passages + sentences) vs raw ONNX encode of them",
                  (n + m) / seconds3, "texts/s", (n + m) / (t_pass + t_sent), "raw encode",
                  note="this encoder cannot pool sentence vectors from its passages, so it embeds every sentence too"))
    b.add(Row("build", "raw ONNX encode vs sentence-transformers model.encode, passages/s", n / first_floor,
              "passages/s", n / t_torch, "torch encode", note="the first round's raw encode"))
    if not reindexed:
        return
    k, ratios = median_round(reindexed)
    t_pass2, seconds2, manifest2, n2, m2 = reindexed[k]
    rounds_note = (f"median of {len(reindexed)} rounds of build then raw encode (ratios {ratios}), the two corpora "
                   f"in turn; " if len(reindexed) > 1 else "")
    b.add(Row("build", "qa-service index into that folder again (other articles; export shared, no torch), "
              "passages/s vs raw ONNX encode of the same passages", n2 / seconds2, "passages/s", n2 / t_pass2,
              "raw encode", ">= 0.9",
              f"{rounds_note}{what} other than the live ones, all new: {n2} passages, {m2} sentences, "
              f"{seconds2:.1f} s in all; seconds by step: {_seconds_by_step(manifest2, seconds2)}"))


# ---------------------------------------------------------------------- cold start

def section_cold(b: Bench) -> None:
    """``qa-service serve`` on a fresh index until the first 200 answer; the index must not be rebuilt."""
    from qa_service.store import BUILDS, read_manifest

    index_dir = b.seed_index
    before = read_manifest(index_dir)["build_id"]
    builds_before = sorted(p.name for p in (index_dir / BUILDS).iterdir())
    times = []
    for _ in range(b.sizes.cold_runs):
        server = load.Server(index_dir, b.work / "cold.log")
        try:
            server.start()
            times.append(server.wait_first_answer(SEED_QUESTIONS[0]))
        finally:
            server.stop()
    unchanged = read_manifest(index_dir)["build_id"] == before and \
        sorted(p.name for p in (index_dir / BUILDS).iterdir()) == builds_before
    b.add(Row("cold", "qa-service serve until the first 200 answer (median)", float(np.median(times)), "s", 1.0,
              "1 s", "<= 2", f"runs: {', '.join(f'{t:.2f}' for t in times)} s; index re-embedded: "
                             f"{'no' if unchanged else 'YES'}"))


def _ray_passages(b: Bench, encoder) -> tuple[list[str], str]:
    """The first ``ray_passages`` passages of the build section's corpus, cut as ``qa-service index`` cuts them."""
    from qa_service.config import Settings
    from qa_service.ingest import load_articles
    from qa_service.store import chunk_articles

    corpus, what = _build_corpus(b)
    passages = chunk_articles(load_articles(corpus).articles, encoder, Settings()).passages
    return [p.text for p in passages[:b.sizes.ray_passages]], what


def _ray_processes() -> list[int]:
    """Ray's processes started from this one (GCS, raylet, workers, actors)."""
    out, todo = [], [os.getpid()]
    while todo:
        kids = load.children(todo.pop())
        todo += kids
        for pid in kids:
            try:
                if b"ray" in Path(f"/proc/{pid}/cmdline").read_bytes().lower():
                    out.append(pid)
            except OSError:
                continue
    return out


def section_ray(b: Bench) -> None:
    """The build's ONNX encoder on a local Ray actor pool (1, 2 actors) vs. single-process encode of the same passages.

    The floor is the build's own encode without ``--ray``, timed before and after the Ray runs (their mean); each pool
    run includes starting its actors, a fixed cost also measured on its own. See docs/decisions/ray-indexing.md.
    """
    try:
        from qa_service.embedding.ray import LOCAL, RayEmbedder, RayUnavailable, _Session, import_ray, ray_scope

        import_ray(LOCAL)
    except RayUnavailable:
        b.echo("  ray: skipped - Ray is not installed (pip install -e '.[ray]')")
        b.facts["ray_skipped"] = "Ray is not installed (pip install -e '.[ray]')"
        return
    from qa_service.embedding.onnx_encoder import INDEXING_THREADS, OnnxEmbedder
    from qa_service.store import read_manifest

    encoder = OnnxEmbedder.from_manifest(read_manifest(b.seed_index), threads=INDEXING_THREADS)
    texts, what = _ray_passages(b, encoder)
    n = len(texts)
    encoder.encode(texts[:8], batch_size=32)  # warm-up

    def single() -> float:
        t0 = time.perf_counter()
        encoder.encode(texts, batch_size=32)
        return time.perf_counter() - t0

    top = max(b.sizes.ray_actors)
    before = single()
    runs = {}
    facts = b.facts["ray"] = {}
    with ray_scope():
        t0 = time.perf_counter()
        # Starts Ray, ships the encoder to the object store, and gets Ray's worker start-up warm.
        RayEmbedder(encoder, "local", top).encode(texts[:top], batch_size=32)
        facts["first_call"] = time.perf_counter() - t0
        facts["start"] = _Session.started_seconds
        for actors in b.sizes.ray_actors:
            pool = RayEmbedder(encoder, "local", actors)
            t0 = time.perf_counter()
            pool.encode(texts[:actors], batch_size=32)  # one text per actor: a pass's fixed cost
            fixed = time.perf_counter() - t0
            t0 = time.perf_counter()
            pool.encode(texts, batch_size=32)
            runs[actors] = (time.perf_counter() - t0, fixed)
            if actors == top:
                mem = [load.memory_mb(p) for p in _ray_processes()]
                facts["processes"], facts["pss_mb"] = len(mem), sum(m.get("pss", 0.0) for m in mem)
        t0 = time.perf_counter()  # leaving the scope shuts the local Ray down
    facts["shutdown"] = time.perf_counter() - t0
    after = single()
    floor = n / ((before + after) / 2)
    b.add(Row("ray", f"local Ray start (ray.init, {max(2, top)} CPUs, no dashboard)", facts["start"], "s",
              note=f"first pass incl. the start and shipping the encoder {facts['first_call']:.1f} s; shutdown "
                   f"{facts['shutdown']:.1f} s; with the {top}-actor pool up, {facts.get('processes', 0)} Ray "
                   f"processes, PSS {facts.get('pss_mb', 0):,.0f} MiB in all"))
    for actors, (seconds, fixed) in runs.items():
        after_start = f"{n / (seconds - fixed):.3g}" if seconds > fixed else "n/a"
        b.add(Row("ray", f"{actors} actor(s): passages/s vs single-process encode", n / seconds, "passages/s", floor,
                  "one process", note=f"{what}: {n} passages in {seconds:.1f} s, of which ~{fixed:.1f} s starting the "
                  f"actors and loading the encoder (every pass pays it); {after_start} passages/s after that; one "
                  f"ONNX thread per actor; single process {n / before:.3g} before, {n / after:.3g} after"))
    if len(runs) >= 2:
        few, many = min(runs), max(runs)
        b.add(Row("ray", f"{many} actors vs {few} actor(s), passages/s", n / runs[many][0], "passages/s",
                  n / runs[few][0], f"{few} actor(s)", note=f"{os.cpu_count()} cores on this machine, shared"))
