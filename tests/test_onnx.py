"""The torch-free query path: ONNX export at index time, its agreement with sentence-transformers, reuse, int8,
fallback, and a serving process that never imports torch."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from qa_service import store
from qa_service.config import Settings
from qa_service.embedding import export, export_cache, models, onnx_encoder
from qa_service.embedding.onnx_encoder import SERVING_THREADS, OnnxEmbedder
from qa_service.errors import IndexCorrupt
from qa_service.files import sha256_file
from qa_service.store import (
    build_index,
    chunk_articles,
    embed_chunks,
    embedding_texts,
    index_status,
    read_manifest,
    sentence_embedding_texts,
)

from .support.encoders import dev_questions, idle_cpu_after_questions
from .support.paths import REPO

HEAVY = ("torch", "sentence_transformers", "transformers")
QUESTION = "How did Iran's Supreme Leader react to Hamas's October 7 attack?"


def _passages(settings: Settings) -> list[str]:
    build = Path(read_manifest(settings.index_dir)["_build_dir"])
    con = sqlite3.connect(build / "passages.sqlite")
    try:
        return [r[0] for r in con.execute("SELECT text FROM passages ORDER BY id")]
    finally:
        con.close()


def _copy_index(settings: Settings, root: Path) -> Settings:
    shutil.copytree(settings.index_dir, root / "index")
    return settings.with_(index_dir=root / "index")


def _op_types(path: Path) -> list[str]:
    import onnx

    return [node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node]


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("QA_")}


def test_import_paths_do_not_load_torch():
    """Importing the store, the retrieval layer, the encoder modules (the export's too), the CLI or the web app
    loads no torch; importing the embedding package loads no onnxruntime either."""
    script = textwrap.dedent("""
        import importlib.util, json, sys
        import qa_service.embedding
        heavy = ("torch", "sentence_transformers", "transformers", "onnxruntime")
        bare = sorted(m for m in heavy if m in sys.modules)
        import qa_service, qa_service.store, qa_service.retrieval, qa_service.cli
        import qa_service.embedding.onnx_encoder, qa_service.embedding.export, qa_service.embedding.export_cache
        import qa_service.embedding.torch_encoder, qa_service.embedding.ray
        if importlib.util.find_spec("qa_service.web") is not None:
            import qa_service.web
        print(json.dumps([bare, sorted(m for m in heavy[:3] if m in sys.modules)]))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_clean_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[], []]


def test_fake_embedder_index_records_its_encoder(fake_index, seed_articles):
    manifest = read_manifest(fake_index.index_dir)
    assert manifest["encoder"] == {"backend": "external", "class": "FakeEmbedder"}
    assert not (Path(manifest["_build_dir"]) / onnx_encoder.MODEL_DIR).exists()
    # nothing was exported, so the quantize setting cannot make a fake index stale
    assert index_status(fake_index.with_(quantize="int8"), seed_articles) == (True, "up to date")


def test_unknown_quantize_is_refused(tmp_path, seed_articles, fake_embedder):
    with pytest.raises(ValueError, match="quantize must be one of none, int8"):
        build_index(seed_articles[:1], fake_embedder, Settings(index_dir=tmp_path / "i", quantize="int4"))


@pytest.mark.slow
def test_real_index_carries_an_onnx_encoder(real_index, seed_articles):
    manifest = read_manifest(real_index.index_dir)
    entry = manifest["encoder"]
    build = Path(manifest["_build_dir"])
    assert entry["backend"] == "onnx" and entry["precision"] == "fp32" and entry["quantize"] == "none"
    assert entry["file"] == "model/model.onnx" and entry["tokenizer"] == "model/tokenizer.json"
    assert entry["max_seq_length"] == 256 and entry["agreement_min_cosine"] >= 0.9999
    assert sha256_file(build / entry["file"]) == entry["sha256"]
    # onnxruntime's fused transformer graph: one Attention per layer, and none of the unfused softmax chains
    assert entry["fused"] == {"Attention": 6, "BiasGelu": 6, "EmbedLayerNormalization": 1, "SkipLayerNormalization": 12}
    ops = _op_types(build / entry["file"])
    assert ops.count("Attention") == 6 and "Softmax" not in ops
    assert {"model/model.onnx", "model/tokenizer.json"} <= set(manifest["files"])
    assert index_status(real_index, seed_articles) == (True, "up to date")
    assert index_status(real_index.with_(quantize="int8"), seed_articles) == (False, "the encoder precision changed")


@pytest.mark.slow
def test_onnx_fp32_gives_the_sentence_transformers_vectors(real_index, real_embedder, seed_articles):
    """cosine >= 0.9999 on every seed passage and dev question, one at a time and batched; same token counts."""
    manifest = read_manifest(real_index.index_dir)
    onnx = OnnxEmbedder.from_manifest(manifest)
    passages, questions = _passages(real_index), dev_questions()
    texts = passages + questions
    reference = real_embedder.encode(texts)
    batched = onnx.encode(texts, batch_size=8)
    single = np.vstack([onnx.encode([t]) for t in questions])
    assert batched.shape == reference.shape and batched.dtype == np.float32
    assert np.allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    assert np.min(np.sum(batched * reference, axis=1)) >= 0.9999
    assert np.min(np.sum(single * reference[len(passages):], axis=1)) >= 0.9999
    # the stored passage vectors came from the ONNX encoder and agree with sentence-transformers too
    stored = np.load(Path(manifest["_build_dir"]) / "sentences.npy")
    assert stored.shape[1] == 384
    import faiss

    index = faiss.read_index(str(Path(manifest["_build_dir"]) / "vectors.faiss"))
    vectors = index.reconstruct_n(0, index.ntotal)
    # a passage vector is made from the passage with its article's headline or lead in front (embedding_texts)
    chunks = chunk_articles(seed_articles, real_embedder, real_index)
    assert [p.text for p in chunks.passages] == passages
    embedded = embedding_texts(chunks, seed_articles)
    assert sum(e != p for e, p in zip(embedded, passages)) >= len(passages) // 2  # most windows get a context
    stored_reference = real_embedder.encode(embedded)
    assert np.min(np.sum(vectors * stored_reference, axis=1)) >= 0.9999
    # and each sentence vector is pooled, in the same pass, from its passage's token vectors over the sentence and
    # its headline or lead: the ONNX graph's token vectors give what sentence-transformers' give
    assert manifest["sentence_vectors"] == "pooled" and manifest["encoder"]["token_pooling"] == "mean"
    assert len(stored) == len(chunks.sentences)
    p_ref = np.full((len(passages), 384), np.nan, dtype=np.float32)
    s_ref = np.full((len(chunks.sentences), 384), np.nan, dtype=np.float32)
    assert embed_chunks(p_ref, s_ref, chunks, seed_articles, real_embedder, 8, False) == "pooled"
    assert np.min(np.sum(p_ref * stored_reference, axis=1)) >= 0.9999
    assert np.min(np.sum(stored * s_ref, axis=1)) >= 0.9999
    # close to embedding each sentence apart after its headline or lead, which that pass replaces
    apart = real_embedder.encode(sentence_embedding_texts(chunks, seed_articles))
    cosines = np.sum(stored * apart, axis=1)
    assert cosines.mean() >= 0.9 and cosines.min() >= 0.75
    # tokens: the same counts (chunking) and the same truncation at max_seq_length
    long_text = "word " * 400
    for text in passages[:10] + [long_text, ""]:
        assert onnx.count_tokens(text) == real_embedder.count_tokens(text)
    assert float((onnx.encode([long_text]) @ real_embedder.encode([long_text]).T)[0, 0]) >= 0.9999


def test_the_serving_encoder_is_untuned_by_default(real_index):
    """Without the encoder_cores tuning a serving encoder runs SERVING_THREADS threads, unpinned, on one session
    whose pool threads never spin, and leaves no thread busy after a question."""

    from qa_service.retrieval import Searcher

    encoder = Searcher(real_index).embedder
    assert isinstance(encoder, OnnxEmbedder) and encoder.runner is None
    options = encoder.session.get_session_options()
    assert options.intra_op_num_threads == SERVING_THREADS >= 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(RuntimeError, match="does not have configuration"):
        options.get_session_config_entry("session.intra_op_thread_affinities")  # no thread is pinned
    assert idle_cpu_after_questions(encoder, dev_questions()) < 0.05  # of 5 x 50 ms after a question


def test_serving_process_never_imports_torch(real_index, real_searcher):
    """A fresh process builds a Searcher from the index and answers, without torch or sentence-transformers."""
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        from qa_service.config import Settings
        from qa_service.retrieval import Searcher
        searcher = Searcher(Settings(index_dir=Path({str(real_index.index_dir)!r})))
        result = searcher.ask({QUESTION!r}, k=3)
        print(json.dumps({{"embedder": type(searcher.embedder).__name__,
                          "articles": [h["citation"]["article_id"] for h in result["results"]],
                          "heavy": sorted(m for m in {HEAVY!r} if m in sys.modules)}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_clean_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["heavy"] == []
    assert got["embedder"] == "OnnxEmbedder"
    # the same answer as asking with sentence-transformers in this process
    expected = [h["citation"]["article_id"] for h in real_searcher.ask(QUESTION, k=3)["results"]]
    assert got["articles"] == expected and expected[0] == "004_9aeb4bd2e5102b83"


@pytest.mark.slow
def test_rebuild_reuses_the_export(tmp_path, real_index, real_embedder, seed_articles, monkeypatch):
    settings = _copy_index(real_index, tmp_path)
    old = read_manifest(settings.index_dir)

    def no_export(*args, **kwargs):
        raise AssertionError("the unchanged model must not be exported again")

    monkeypatch.setattr(export, "_export_fp32", no_export)
    hashed = []  # files the build's checksum step hashes
    monkeypatch.setattr(store, "sha256_file", lambda path: hashed.append(Path(path).name) or sha256_file(path))
    summary = build_index(seed_articles[:3], real_embedder, settings)
    new = read_manifest(settings.index_dir)
    assert new["_build_dir"] == summary.build_dir
    assert new["encoder"]["backend"] == "onnx"
    assert new["encoder"]["reused_from"] == Path(old["_build_dir"]).name
    assert new["encoder"]["sha256"] == old["encoder"]["sha256"]
    old_file, new_file = (Path(m["_build_dir"]) / "model/model.onnx" for m in (old, new))
    assert os.stat(old_file).st_ino == os.stat(new_file).st_ino  # hard link, not a copy
    # the shared export's checksums, checked when it was taken, are not computed again; they are the files' own
    assert "model.onnx" not in hashed and "tokenizer.json" not in hashed and "passages.sqlite" in hashed
    for name in ("model/model.onnx", "model/tokenizer.json"):
        assert new["files"][name]["sha256"] == sha256_file(Path(new["_build_dir"]) / name)


@pytest.mark.slow
def test_int8_is_recorded_and_close(tmp_path, real_index, real_embedder, seed_articles, monkeypatch):
    settings = _copy_index(real_index, tmp_path).with_(quantize="int8")
    assert index_status(settings, seed_articles) == (False, "the encoder precision changed")
    monkeypatch.setattr(export, "_export_fp32", lambda *a, **k: pytest.fail("int8 re-exported fp32"))
    build_index(seed_articles, real_embedder, settings)
    manifest = read_manifest(settings.index_dir)
    entry = manifest["encoder"]
    build = Path(manifest["_build_dir"])
    assert entry["backend"] == "onnx" and entry["precision"] == "int8" and entry["quantize"] == "int8"
    assert entry["file"] == "model/model.int8.onnx" and not (build / "model/model.onnx").exists()
    assert entry["fused"]["Attention"] == 6 and "QAttention" in _op_types(build / entry["file"])  # quantised fused
    fp32 = Path(read_manifest(real_index.index_dir)["_build_dir"]) / "model/model.onnx"
    assert (build / entry["file"]).stat().st_size < 0.4 * fp32.stat().st_size
    assert index_status(settings, seed_articles) == (True, "up to date")
    assert index_status(settings.with_(quantize="none"), seed_articles) == (False, "the encoder precision changed")
    from qa_service.retrieval import Searcher

    searcher = Searcher(settings)
    assert isinstance(searcher.embedder, OnnxEmbedder) and searcher.embedder.precision == "int8"
    questions = dev_questions()
    cosines = np.sum(searcher.embedder.encode(questions) * real_embedder.encode(questions), axis=1)
    assert cosines.min() >= export.MIN_COSINE["int8"] and cosines.mean() >= 0.98
    assert searcher.ask(QUESTION, k=1)["results"][0]["citation"]["article_id"] == "004_9aeb4bd2e5102b83"
    # "auto" (the default when neither --quantize nor QA_QUANTIZE chooses) keeps the index's precision: a later
    # refresh without the choice, as `qa-service serve --build` runs it, stays int8 instead of re-embedding in fp32.
    auto = settings.with_(quantize="auto")
    assert Settings().quantize == "auto"
    assert index_status(auto, seed_articles) == (True, "up to date")
    fewer = [a for a in seed_articles if a.id != "000_13c1da738e689733"]
    build_index(fewer, real_embedder, auto)
    entry = read_manifest(settings.index_dir)["encoder"]
    assert entry["precision"] == "int8" and entry["quantize"] == "int8"
    assert index_status(auto, fewer) == (True, "up to date")
    assert index_status(auto.with_(quantize="none"), fewer) == (False, "the encoder precision changed")


def test_auto_quantize_means_the_index_precision_or_fp32():
    from qa_service.embedding.onnx_encoder import resolve_quantize

    int8 = {"encoder": {"backend": "onnx", "quantize": "int8"}}
    assert resolve_quantize("auto", int8) == "int8"
    assert resolve_quantize("auto", None) == "none"  # a new index
    assert resolve_quantize("auto", {"encoder": {"backend": "sentence-transformers"}}) == "none"
    assert resolve_quantize("none", int8) == "none" and resolve_quantize("int8", None) == "int8"  # a choice wins


@pytest.mark.slow
def test_a_fused_graph_that_disagrees_is_not_kept(tmp_path, real_embedder, seed_articles, monkeypatch):
    """The unfused export is kept (and still agrees with sentence-transformers) when fusion changes the vectors."""
    monkeypatch.setattr(export, "FUSION_MIN_COSINE", 1.5)  # no graph can agree this well
    settings = Settings(index_dir=tmp_path / "index")
    build_index(seed_articles[:1], real_embedder, settings)
    manifest = read_manifest(settings.index_dir)
    entry, build = manifest["encoder"], Path(manifest["_build_dir"])
    assert entry["backend"] == "onnx" and entry["fused"] == {} and entry["agreement_min_cosine"] >= 0.9999
    assert "Attention" not in _op_types(build / entry["file"]) and "Softmax" in _op_types(build / entry["file"])
    assert sorted(p.name for p in (build / "model").iterdir()) == ["model.onnx", "tokenizer.json"]


def test_fusion_is_skipped_for_model_families_the_optimizer_does_not_know(tmp_path):
    graph = tmp_path / "model.onnx"
    graph.write_bytes(b"not read")
    config = type("Config", (), {"model_type": "gpt2", "num_attention_heads": 12, "hidden_size": 768})()
    assert export._fuse(graph, config, {}) == {} and graph.read_bytes() == b"not read"
    assert export._fuse(graph, None, {}) == {}


@pytest.mark.slow
def test_failed_export_falls_back_to_sentence_transformers(tmp_path, real_embedder, seed_articles, monkeypatch,
                                                            caplog):
    def impossible(*args, **kwargs):
        raise RuntimeError("no ONNX symbolic for this model's attention")

    monkeypatch.setattr(export, "_export_fp32", impossible)
    settings = Settings(index_dir=tmp_path / "index")
    with caplog.at_level(logging.WARNING, logger="qa_service.embedding.export"):
        build_index(seed_articles[:1], real_embedder, settings)
    assert any("Could not export" in r.getMessage() and "sentence-transformers" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    manifest = read_manifest(settings.index_dir)
    assert manifest["encoder"]["backend"] == "sentence-transformers"
    assert "no ONNX symbolic" in manifest["encoder"]["reason"]
    assert not (Path(manifest["_build_dir"]) / "model").exists()
    assert index_status(settings, seed_articles[:1]) == (True, "up to date")  # no endless re-export attempts
    loaded = []

    def load_embedder(model):
        loaded.append(model)
        return real_embedder

    monkeypatch.setattr("qa_service.retrieval.searcher.load_embedder", load_embedder)
    from qa_service.retrieval import Searcher

    assert Searcher(settings).embedder is real_embedder and loaded == ["all-MiniLM-L6-v2"]


@pytest.mark.slow
def test_damaged_onnx_model_is_a_clear_error(tmp_path, real_index):
    settings = _copy_index(real_index, tmp_path)
    build = Path(read_manifest(settings.index_dir)["_build_dir"])
    model = build / "model/model.onnx"
    model.write_bytes(b"\0" * model.stat().st_size)  # same size: only loading can tell
    from qa_service.retrieval import Searcher

    with pytest.raises(IndexCorrupt, match="ONNX encoder.*qa-service index"):
        Searcher(settings)
    # an encoder whose session is opened later (a build sharing the live export) says the same when it opens
    deferred = OnnxEmbedder.from_manifest(read_manifest(settings.index_dir), threads=1, open_session=False)
    assert deferred.count_tokens("a few words") == 3  # its tokenizer works without a session
    with pytest.raises(IndexCorrupt, match="ONNX encoder.*qa-service index"):
        deferred.open()


@pytest.mark.slow
def test_an_encoder_opened_late_gives_the_same_vectors(real_index):
    """``open_session=False`` (what a build sharing the live export uses until its articles are cut) opens the
    session at ``open()`` or at the first encode, with the graph's inputs and pooling checked as when opened at once."""
    manifest = read_manifest(real_index.index_dir)
    texts = ["Who won the election?", "A longer passage about the election and who won it, and by how much."]
    at_once = OnnxEmbedder.from_manifest(manifest, threads=1)
    late = OnnxEmbedder.from_manifest(manifest, threads=1, open_session=False)
    assert late._session is None
    # a build cuts its articles before the session opens: the tokenizer alone says its counts add up
    assert late.counts_add_up is True and late._session is None
    np.testing.assert_array_equal(late.encode(texts), at_once.encode(texts))  # the first encode opens it
    assert late._session is not None and late.token_pooling == at_once.token_pooling == "mean"
    late.open()  # once only
    np.testing.assert_array_equal(late.encode(texts), at_once.encode(texts))


@pytest.mark.slow
def test_cli_rebuild_embeds_with_the_live_export_without_torch(tmp_path, real_index):
    """Re-indexing changed articles with an unchanged model shares the live ONNX export: torch is never loaded."""
    settings = _copy_index(real_index, tmp_path)
    old = read_manifest(settings.index_dir)
    seeds = tmp_path / "seeds"
    shutil.copytree(real_index.seeds_dir, seeds)
    removed = sorted(seeds.iterdir())[-1]
    removed.unlink()  # the index is now stale: one article fewer
    script = textwrap.dedent(f"""
        import json, sys
        from qa_service.cli import cli
        cli(["index", {str(seeds)!r}, "--index-dir", {str(settings.index_dir)!r}], standalone_mode=False)
        print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_clean_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    assert "DEBUG" not in out.stderr  # bm25s's own DEBUG logger stays quiet without -v
    new = read_manifest(settings.index_dir)
    assert new["build_id"] != old["build_id"] and new["counts"]["articles"] == old["counts"]["articles"] - 1
    assert new["encoder"]["reused_from"] == Path(old["_build_dir"]).name
    assert new["encoder"]["sha256"] == old["encoder"]["sha256"]
    assert new["encoder"]["model_files"] == old["encoder"]["model_files"]
    old_file, new_file = (Path(m["_build_dir"]) / "model/model.onnx" for m in (old, new))
    assert os.stat(old_file).st_ino == os.stat(new_file).st_ino
    # the remaining articles kept their vectors, and the new index answers
    assert new["counts"]["reused_articles"] == new["counts"]["articles"]
    from qa_service.retrieval import Searcher

    assert Searcher(settings).ask(QUESTION, k=3)["results"]


@pytest.mark.slow
def test_a_new_index_folder_embeds_with_the_machines_export_without_torch(tmp_path, real_index, monkeypatch):
    """A model exported once on this machine is not exported again for another index folder: ``qa-service index``
    into a new folder takes the cached export (checksummed) and never loads torch."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("QA_EXPORT_CACHE", str(cache))
    live = read_manifest(real_index.index_dir)
    assert export_cache.cached_export("all-MiniLM-L6-v2", "none") is None
    export_cache.remember_export(live)
    cached = export_cache.cached_export("all-MiniLM-L6-v2", "none")
    assert cached is not None and cached["encoder"]["sha256"] == live["encoder"]["sha256"]
    assert Path(cached["_build_dir"]).parent == cache
    assert export_cache.cached_export("all-MiniLM-L6-v2", "int8") is None  # another choice is another export

    index_dir = tmp_path / "new-index"
    script = textwrap.dedent(f"""
        import json, sys
        from qa_service.cli import cli
        cli(["index", {str(real_index.seeds_dir)!r}, "--index-dir", {str(index_dir)!r}], standalone_mode=False)
        print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**_clean_env(), "QA_EXPORT_CACHE": str(cache)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []  # torch never loaded
    new = read_manifest(index_dir)
    assert new["encoder"]["reused_from"] == Path(cached["_build_dir"]).name
    assert new["encoder"]["sha256"] == live["encoder"]["sha256"]
    assert new["counts"]["passages"] == live["counts"]["passages"]
    np.testing.assert_allclose(np.load(Path(new["_build_dir"]) / "sentences.npy"),
                               np.load(Path(live["_build_dir"]) / "sentences.npy"), atol=1e-5)

    # A damaged entry is not used but removed (the file is replaced, not written through: it shares the live
    # build's inode), and keeping the export again puts a sound one in its place.
    model = Path(cached["_build_dir"]) / cached["encoder"]["file"]
    size = model.stat().st_size
    model.unlink()
    model.write_bytes(b"\0" * size)  # the same size: only the checksum tells
    assert export_cache.cached_export("all-MiniLM-L6-v2", "none") is None
    assert not Path(cached["_build_dir"]).exists()
    export_cache.remember_export(live)
    assert export_cache.cached_export("all-MiniLM-L6-v2", "none") is not None
    assert sha256_file(Path(live["_build_dir"]) / live["encoder"]["file"]) == live["encoder"]["sha256"]

    monkeypatch.setenv("QA_EXPORT_CACHE", "off")
    assert export_cache.export_cache_dir() is None
    assert export_cache.cached_export("all-MiniLM-L6-v2", "none") is None


def test_the_export_cache_keeps_the_most_recently_used(tmp_path):
    for i in range(export_cache.EXPORT_CACHE_KEEP + 2):
        entry = tmp_path / f"entry-{i}"
        entry.mkdir()
        os.utime(entry, (1000 + i, 1000 + i))
    stale = tmp_path / ".tmp-1-1"
    stale.mkdir()
    os.utime(stale, (1000, 1000))
    export_cache._prune_cache(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        [f"entry-{i}" for i in range(2, export_cache.EXPORT_CACHE_KEEP + 2)]


def test_export_is_shared_only_for_the_same_model_files_and_choice(tmp_path, real_index):
    settings = _copy_index(real_index, tmp_path)
    manifest = read_manifest(settings.index_dir)
    shareable = export_cache.shareable_encoder
    assert manifest["encoder"]["model_files"] == models.model_files_digest("all-MiniLM-L6-v2")
    assert shareable(manifest, "all-MiniLM-L6-v2", "none")
    assert not shareable(manifest, "all-MiniLM-L6-v2", "int8")  # another --quantize choice exports again
    assert not shareable(manifest, str(tmp_path / "another-model"), "none")
    assert not shareable({**manifest, "encoder": {**manifest["encoder"], "model_files": "0" * 64}},
                         "all-MiniLM-L6-v2", "none")  # the model's files changed since the export
    assert not shareable({**manifest, "encoder": {**manifest["encoder"], "export_version": 0}},
                         "all-MiniLM-L6-v2", "none")
    assert not shareable(None, "all-MiniLM-L6-v2", "none")
    model = Path(manifest["_build_dir"]) / "model/model.onnx"
    model.write_bytes(b"\0" * model.stat().st_size)  # damaged, same size: a rebuild must export afresh
    assert not shareable(manifest, "all-MiniLM-L6-v2", "none")


def test_model_files_digest_follows_the_files(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}", encoding="utf-8")
    (folder / "weights.bin").write_bytes(b"1234")
    first = models.model_files_digest(str(folder))
    assert first and first == models.model_files_digest(str(folder))
    stat = (folder / "weights.bin").stat()
    os.utime(folder / "weights.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # edited in place
    second = models.model_files_digest(str(folder))
    assert second != first
    (folder / "extra.txt").write_text("x", encoding="utf-8")
    assert models.model_files_digest(str(folder)) not in (first, second)
    assert models.model_files_digest("some-org/a-hub-model-name") is None  # not a folder: no shortcut


@pytest.mark.slow
def test_pooling_all_tokens_of_a_text_gives_its_own_vector(real_index, real_embedder):
    """encode_pooled: a group covering the whole text is the text's vector; groups are pooled from the same pass."""
    onnx = OnnxEmbedder.from_manifest(read_manifest(real_index.index_dir))
    texts = ["Gaza ceasefire talks\nThe minister met the delegation. He said talks would go on.", "Short one."]
    groups = [[((0, 200),), ((0, 20), (21, 53)), ((54, 200),)], [((0, 10),), ((50, 60),)]]
    vectors, pooled = onnx.encode_pooled(texts, groups, batch_size=2)
    assert np.allclose(vectors, onnx.encode(texts), atol=1e-5)
    assert np.allclose(pooled[0][0], vectors[0], atol=1e-5) and np.allclose(pooled[1][0], vectors[1], atol=1e-5)
    assert np.isnan(pooled[1][1]).all()  # no token inside: left for the caller to embed apart
    ref_vectors, ref_pooled = real_embedder.encode_pooled(texts, groups, batch_size=2)
    for mine, ref in zip(pooled, ref_pooled):
        both = ~np.isnan(ref[:, 0])
        assert np.array_equal(both, ~np.isnan(mine[:, 0]))
        assert np.min(np.sum(mine[both] * ref[both], axis=1)) >= 0.9999
    # the headline and one sentence read together differ from the sentence with the whole passage's context
    assert 0.5 < float(pooled[0][1] @ pooled[0][2]) < 0.99


@pytest.mark.slow
def test_a_rebuild_with_the_live_encoder_keeps_the_cut_of_unchanged_articles(tmp_path, real_index, seed_articles,
                                                                            monkeypatch):
    """Unchanged articles are not split again: their sentences and passages come from the live build, and are
    exactly what splitting them again gives; a changed article is split afresh."""
    from dataclasses import replace

    from qa_service import reuse, store

    settings = _copy_index(real_index, tmp_path)
    old = read_manifest(settings.index_dir)
    changed = replace(seed_articles[0], text=seed_articles[0].text + "\n\nA new closing sentence was added.",
                      content_hash="changed")
    articles = [changed] + list(seed_articles[1:])
    split = []
    real_cut = store.split_articles
    monkeypatch.setattr(store, "split_articles",
                        lambda arts, *a, **k: split.extend(x.text for x in arts) or real_cut(arts, *a, **k))
    reads = []  # the live build's SQLite file, opened read-only: once for both its cut and its vectors
    real_connect = store.sqlite3.connect
    monkeypatch.setattr(store.sqlite3, "connect", lambda target, *a, **k: (
        reads.append(target) if str(old["_build_dir"]) in str(target) else None) or real_connect(target, *a, **k))
    build_index(articles, None, settings, encoder_of=old)
    monkeypatch.setattr(store.sqlite3, "connect", real_connect)
    new = read_manifest(settings.index_dir)
    assert len(reads) == 1, reads
    assert split == [changed.text]  # only the changed article was split
    assert new["counts"]["reused_layouts"] == len(articles) - 1
    assert new["counts"]["reused_articles"] == len(articles) - 1
    monkeypatch.setattr(store, "split_articles", real_cut)
    fresh = chunk_articles(articles, OnnxEmbedder.from_manifest(new), settings)
    con = sqlite3.connect(Path(new["_build_dir"]) / "passages.sqlite")
    stored_p = con.execute('SELECT article_id, start, "end", text, first_sentence, last_sentence FROM passages '
                           "ORDER BY id").fetchall()
    stored_s = con.execute('SELECT article_id, start, "end" FROM sentences ORDER BY id').fetchall()
    con.close()
    assert stored_s == [tuple(s) for s in fresh.sentences]
    assert stored_p == [(p.article_id, p.start, p.end, p.text, *fresh.passage_sentences[i])
                        for i, p in enumerate(fresh.passages)]
    # another encoder (here: none shared, so it may export afresh) splits everything again
    assert reuse.previous_layouts(new, OnnxEmbedder.from_manifest(new), {"backend": "onnx", "sha256": "x"},
                                   settings, articles) == {}
