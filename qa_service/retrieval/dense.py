"""Dense retrieval over a FAISS inner-product index of L2-normalised vectors: exact when small, IVF when large.

Why IVF-Flat and not HNSW above the size threshold (measured on this 2-core machine, see README "Benchmarks"):
an HNSW graph (M=32, efConstruction=40) took 181 s to build over 200k vectors, so about 15 minutes at 1M, and
needed efSearch=128 for recall@10 0.91 on the same data; IVF-Flat with 2,048 lists built 1M vectors in 47 s and
answered in 1.7-3 ms at recall@10 0.97-0.99 (nprobe 32-64), against 60-300 ms for exact search. IVF also
memory-maps its lists (``IO_FLAG_MMAP``), so worker processes share one copy through the page cache, and it
reads vectors back through a direct map, which the searcher needs to score every candidate exactly.

The IVF lists hold float16 codes (``IndexIVFScalarQuantizer``, ``QT_fp16``) rather than float32: a probe of 64
lists at 1M passages reads ~48 MB of float32 vectors, so the scan is bound by memory bandwidth. Measured 11-27
at 1M (vectors between two SciFact passages plus noise, nlist 2048, nprobe 64, one thread, memory-mapped):
float32 6.17 ms a question at recall@10 0.987, float16 4.55 ms at 0.987, 8-bit 4.40 ms at 0.977; float16 also
halves the file (1,547 -> 779 bytes a passage). A float16 vector is within ~1e-3 of the float32 one per
component, so candidate cosines move by about 1e-4.

Below ``Settings.ann_threshold`` passages the index stays an exact ``IndexFlatIP`` (memory-mapped with
``IO_FLAG_MMAP_IFC``): there a whole scan costs less than encoding the question.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

EXACT = "IndexFlatIP"
IVF = "IndexIVFScalarQuantizer"  # with float16 codes (IVF_CODES)
IVF_CODES = "fp16"
IVF_NITER = 10  # k-means iterations; more changed recall by < 0.002 on the benchmark data
IVF_TRAIN_PER_LIST = 40  # training vectors per list (FAISS warns below 39)
# A filter that allows at most this many passages is answered by an exact scan of just those vectors: an IVF
# probe of a few lists could miss most of them, and scanning 20k vectors costs about what the probes do.
EXACT_FILTER_LIMIT = 20_000
# Batches of at least this many queries go through BLAS (faiss-cpu's default threshold keeps batches on the
# per-query kernel, 3-6x slower); single queries stay on the per-query kernel, which is faster for one.
BLAS_THRESHOLD = 20


def configure_faiss() -> None:
    """Set FAISS's process-wide knobs for this service: one OpenMP thread, BLAS for batches only."""
    import faiss

    faiss.omp_set_num_threads(1)  # single queries are 2.5x slower with 2 OpenMP threads than with 1 here
    faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD


def ivf_parameters(n: int) -> dict:
    """Return the IVF settings used for ``n`` vectors: about 2*sqrt(n) lists (a power of two), nlist/32 probes."""
    nlist = int(2 ** round(math.log2(max(2.0 * math.sqrt(max(n, 1)), 64))))
    nlist = max(1, min(nlist, 65536, n // IVF_TRAIN_PER_LIST))  # tiny indexes (tests) still train
    return {"nlist": nlist, "nprobe": min(nlist, max(32, nlist // 32)), "niter": IVF_NITER,
            "train_size": int(min(n, IVF_TRAIN_PER_LIST * nlist))}


def build_dense_index(vectors: np.ndarray, ann_threshold: int, seed: int = 1234) -> tuple[object, dict]:
    """Return a FAISS index over ``vectors`` and its manifest entry.

    Args:
        vectors: float32 ``[n, d]`` unit rows; row i gets id i.
        ann_threshold: above this many rows build IVF with float16 codes (approximate), otherwise an exact flat index.
    """
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"expected float32 [n, d] vectors, got shape {vectors.shape}")
    n, d = vectors.shape
    if n <= ann_threshold:
        index = faiss.IndexFlatIP(d)
        if n:
            index.add(vectors)
        return index, {"type": EXACT, "metric": "inner_product", "ann_threshold": int(ann_threshold)}
    params = ivf_parameters(n)
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFScalarQuantizer(quantizer, d, params["nlist"], faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = params["niter"]
    index.cp.seed = seed
    rng = np.random.default_rng(seed)
    sample = vectors[np.sort(rng.choice(n, params["train_size"], replace=False))]
    index.train(sample)
    index.add(vectors)
    index.make_direct_map()  # vectors(ids) reads rows back by id
    index.nprobe = params["nprobe"]
    return index, {"type": IVF, "codes": IVF_CODES, "metric": "inner_product", "ann_threshold": int(ann_threshold),
                   "exact_filter_limit": EXACT_FILTER_LIMIT, **params}


def read_dense_index(path: Path, mmap: bool = True):
    """Read a FAISS index file, memory-mapped where the index type allows (flat codes, IVF lists)."""
    import faiss

    if not mmap:
        return faiss.read_index(str(path))
    with open(path, "rb") as fh:
        fourcc = fh.read(4)
    if fourcc in (b"IxFI", b"IxF2", b"IxFl"):  # flat codes: map the vectors themselves
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    if fourcc.startswith(b"Iw"):  # IVF: map the inverted lists (FAISS needs a plain file reader for that)
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    return faiss.read_index(str(path))


class DenseIndex:
    """A loaded FAISS index answering top-k inner-product queries, optionally restricted to some ids."""

    def __init__(self, path: Path, meta: dict | None = None, mmap: bool = True):
        import faiss

        self._faiss = faiss
        configure_faiss()
        self.index = read_dense_index(path, mmap=mmap)
        self.meta = dict(meta or {})
        self.is_ivf = isinstance(self.index, faiss.IndexIVF)
        if self.is_ivf:
            self.nprobe = int(self.meta.get("nprobe") or self.index.nprobe)
            self.index.nprobe = self.nprobe
            self.exact_filter_limit = int(self.meta.get("exact_filter_limit", EXACT_FILTER_LIMIT))

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(scores, ids)``, each ``[n_queries, k]``; missing slots have id -1.

        Args:
            queries: float32 ``[n, d]`` unit vectors.
            allowed: int64 passage ids the results must come from (None: all).
        """
        k = max(1, min(k, self.size)) if self.size else 1
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.size == 0 or (allowed is not None and len(allowed) == 0):
            n = len(queries)
            return np.zeros((n, k), dtype=np.float32), -np.ones((n, k), dtype=np.int64)
        if allowed is None:
            return self.index.search(queries, k)
        allowed = np.ascontiguousarray(allowed, dtype=np.int64)
        sel = self._faiss.IDSelectorBatch(allowed)
        if not self.is_ivf:
            return self.index.search(queries, k, params=self._faiss.SearchParameters(sel=sel))
        if len(allowed) <= self.exact_filter_limit:
            return self._exact_subset(queries, k, allowed)
        # Probe more lists the fewer passages the filter keeps, so about as many allowed vectors are scanned.
        share = len(allowed) / self.size
        nprobe = min(int(self.index.nlist), int(math.ceil(self.nprobe / max(share, 1e-9))))
        scores, ids = self.index.search(queries, k, params=self._faiss.SearchParametersIVF(sel=sel, nprobe=nprobe))
        if (ids < 0).any():  # the probed lists held fewer than k allowed passages
            return self._exact_subset(queries, k, allowed)
        return scores, ids

    def _exact_subset(self, queries: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sims = queries @ self.vectors(allowed).T
        k_eff = min(k, len(allowed))
        top = np.argpartition(-sims, k_eff - 1, axis=1)[:, :k_eff]
        order = np.take_along_axis(sims, top, axis=1).argsort(axis=1)[:, ::-1]
        top = np.take_along_axis(top, order, axis=1)
        scores = np.zeros((len(queries), k), dtype=np.float32)
        ids = -np.ones((len(queries), k), dtype=np.int64)
        scores[:, :k_eff] = np.take_along_axis(sims, top, axis=1)
        ids[:, :k_eff] = allowed[top]
        return scores, ids

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """Return the stored vectors of passages ``ids`` (float32 ``[len(ids), d]``)."""
        if len(ids) == 0:
            return np.zeros((0, self.index.d), dtype=np.float32)
        return self.index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))
