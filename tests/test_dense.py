"""The dense index: exact below ``Settings.ann_threshold``, IVF above it, recorded in the manifest, with recall@10
against exact search of at least 0.95 (also under filters), memory-mapped when loaded."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from qa_service.retrieval.dense import (
    EXACT,
    IVF,
    IVF_FP16,
    REFINE_CANDIDATES,
    DenseIndex,
    build_dense_index,
    ivf_parameters,
)
from qa_service.store import MANIFEST, VECTORS, build_index, read_manifest


def clustered(n: int, d: int = 48, centres: int = 300, seed: int = 0) -> np.ndarray:
    """Unit vectors around ``centres`` random directions: clustered like real embeddings, unlike uniform noise."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)).astype(np.float32)
    x = c[rng.integers(0, centres, n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall_at_10(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a[a >= 0]) & set(b[b >= 0])) / 10 for a, b in zip(found, exact)]))


def test_ivf_parameters_scale_with_size():
    small, large = ivf_parameters(100_000), ivf_parameters(1_000_000)
    assert small["nlist"] < large["nlist"] and large["nprobe"] >= 32 and large["train_size"] <= 1_000_000
    tiny = ivf_parameters(50)
    assert tiny["nlist"] == 1 and tiny["nprobe"] == 1


@pytest.fixture(scope="module")
def ivf_file(tmp_path_factory):
    data = clustered(12_000)
    index, entry = build_dense_index(data, ann_threshold=5_000)
    path = tmp_path_factory.mktemp("dense") / "vectors.faiss"
    faiss.write_index(index, str(path))
    return data, path, entry


def test_above_threshold_is_ivf_with_recall(ivf_file):
    data, path, entry = ivf_file
    assert entry["type"] == IVF and entry["ann_threshold"] == 5_000 and entry["nprobe"] <= entry["nlist"]
    dense = DenseIndex(path, entry)
    assert dense.is_ivf and dense.size == len(data)
    queries = clustered(200, seed=7)
    exact = faiss.IndexFlatIP(data.shape[1])
    exact.add(data)
    _, truth = exact.search(queries, 10)
    _, found = dense.search(queries, 10)
    assert recall_at_10(found, truth) >= 0.95
    # the lists hold float16 codes: each component read back within float16 rounding, cosines within 1e-5
    back = dense.vectors(np.array([3, 11_999]))
    np.testing.assert_allclose(back, data[[3, 11_999]], atol=1e-3)
    assert np.min(np.sum(back * data[[3, 11_999]], axis=1) / np.linalg.norm(back, axis=1)) >= 1 - 1e-5
    assert entry["codes"] == "fp16" and entry["pq"] == "PQ24x4fs"


def test_pq_proposes_and_float16_rescores(ivf_file):
    """The 4-bit PQ scan alone is coarse; re-scoring its best candidates with the float16 vectors is what gives recall,
    and the scores returned are the float16 vectors' own cosines, not PQ estimates."""
    data, path, entry = ivf_file
    dense = DenseIndex(path, entry)
    queries = clustered(200, seed=7)
    exact = faiss.IndexFlatIP(data.shape[1])
    exact.add(data)
    _, truth = exact.search(queries, 10)
    _, coarse = dense.ivf.search(queries, 10)  # the PQ lists without re-scoring
    scores, found = dense.search(queries, 10)
    assert recall_at_10(found, truth) > recall_at_10(coarse, truth)
    rescored = np.einsum("qd,qkd->qk", queries, dense.vectors(found.ravel()).reshape(*found.shape, -1))
    np.testing.assert_allclose(scores, rescored, atol=1e-4)
    assert dense.refine_candidates == entry["refine_candidates"] == REFINE_CANDIDATES


def test_float16_ivf_of_earlier_builds_still_served(tmp_path):
    """An index built before the PQ + re-scoring layout (float16 codes in the IVF lists) loads and answers as before."""
    data = clustered(6_000)
    params = ivf_parameters(len(data))
    quantizer = faiss.IndexFlatIP(data.shape[1])
    old = faiss.IndexIVFScalarQuantizer(quantizer, data.shape[1], params["nlist"], faiss.ScalarQuantizer.QT_fp16,
                                        faiss.METRIC_INNER_PRODUCT)
    old.train(data)
    old.add(data)
    old.make_direct_map()
    faiss.write_index(old, str(tmp_path / "old.faiss"))
    entry = {"type": IVF_FP16, "codes": "fp16", "metric": "inner_product", **params}
    dense = DenseIndex(tmp_path / "old.faiss", entry)
    assert dense.is_ivf and not dense.refine
    _, ids = dense.search(data[:20], 1)
    assert ids[:, 0].tolist() == list(range(20))
    allowed = np.arange(0, 6_000, 3, dtype=np.int64)
    _, ids = dense.search(data[:1], 5, allowed)
    assert set(ids.ravel()) <= set(allowed)
    np.testing.assert_allclose(dense.vectors(np.array([5])), data[[5]], atol=1e-3)


@pytest.mark.parametrize("share", [0.5, 0.01, 0.001])
def test_filtered_ivf_search_keeps_recall(ivf_file, share):
    """A broad filter probes more lists; a narrow one is scanned exactly (the float16 vectors, skipping the others), a
    very narrow one by reading its vectors back. Either way only allowed ids come back."""
    data, path, entry = ivf_file
    dense = DenseIndex(path, entry)
    rng = np.random.default_rng(3)
    allowed = np.sort(rng.choice(len(data), int(share * len(data)), replace=False)).astype(np.int64)
    queries = clustered(100, seed=9)
    exact = faiss.IndexFlatIP(data.shape[1])
    exact.add(data[allowed])
    _, truth = exact.search(queries, 10)
    _, found = dense.search(queries, 10, allowed)
    assert set(found.ravel()) <= set(allowed)
    assert recall_at_10(found, allowed[truth]) >= 0.95


def test_below_threshold_is_exact_and_memory_mapped(tmp_path):
    data = clustered(500)
    index, entry = build_dense_index(data, ann_threshold=5_000)
    assert entry["type"] == EXACT
    faiss.write_index(index, str(tmp_path / "v.faiss"))
    dense = DenseIndex(tmp_path / "v.faiss", entry)
    assert not dense.is_ivf
    _, ids = dense.search(data[:5], 1)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]



def test_searches_from_any_thread_run_faiss_on_one_openmp_thread(tmp_path):
    """OpenMP's thread count is per thread: a request thread (gunicorn's) starts with one per core unless told."""
    import threading

    data = clustered(500)
    index, entry = build_dense_index(data, ann_threshold=5_000)
    faiss.write_index(index, str(tmp_path / "v.faiss"))
    dense = DenseIndex(tmp_path / "v.faiss", entry)
    seen = {}

    def request_thread(name, call):
        faiss.omp_set_num_threads(4)  # what a new thread gets on a 4-core machine
        call()
        seen[name] = faiss.omp_get_max_threads()

    for name, call in (("search", lambda: dense.search(data[:3], 5)),
                       ("filtered", lambda: dense.search(data[:3], 5, np.arange(100))),
                       ("vectors", lambda: dense.vectors(np.arange(4)))):
        thread = threading.Thread(target=request_thread, args=(name, call))
        thread.start()
        thread.join()
    assert seen == {"search": 1, "filtered": 1, "vectors": 1}

def test_build_index_switches_and_records_it(tmp_path, seed_articles, fake_embedder, fake_index):
    """A build above the (lowered) threshold writes IVF, says so in the manifest, and the Searcher answers from it."""
    from qa_service.retrieval import Searcher

    settings = fake_index.with_(index_dir=tmp_path / "index", ann_threshold=10)
    build_index(seed_articles, fake_embedder, settings)
    manifest = read_manifest(settings.index_dir)
    faiss_entry = manifest["faiss"]
    assert faiss_entry["type"] == IVF and faiss_entry["ann_threshold"] == 10
    assert {"nlist", "nprobe", "niter", "train_size"} <= set(faiss_entry)
    on_disk = json.loads((Path(manifest["_build_dir"]) / MANIFEST).read_text())
    assert on_disk["faiss"] == faiss_entry
    assert isinstance(faiss.read_index(str(Path(manifest["_build_dir"]) / VECTORS)), faiss.IndexRefine)
    searcher = Searcher(settings, embedder=fake_embedder)
    assert searcher.backend.dense.is_ivf
    exact = Searcher(fake_index, embedder=fake_embedder)
    question = "What did Pezeshkian say about rebuilding Gaza?"
    # every list is probed at this size, so the approximate index must give the exact ranking
    assert [h.citation.start for h in searcher.search(question, k=3, mode="dense")] == \
           [h.citation.start for h in exact.search(question, k=3, mode="dense")]


def test_threshold_from_environment(monkeypatch):
    from qa_service.config import Settings

    monkeypatch.setenv("QA_ANN_THRESHOLD", "1234")
    assert Settings.from_env().ann_threshold == 1234
