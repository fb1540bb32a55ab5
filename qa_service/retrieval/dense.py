"""Dense retrieval over a FAISS inner-product index of L2-normalised vectors: exact when small, IVF when large.

Below ``Settings.ann_threshold`` passages the index is an exact ``IndexFlatIP`` (memory-mapped with
``IO_FLAG_MMAP_IFC``): there a whole scan costs less than encoding the question. Above it the index is
``IndexRefine``: an IVF of 4-bit product-quantised codes (``IndexIVFPQFastScan``, d/2 sub-quantisers: d/4 bytes a
vector, scanned with SIMD lookup tables) proposes ``REFINE_CANDIDATES`` or more passages, and float16 copies of the
vectors (``IndexScalarQuantizer``, ``QT_fp16``, memory-mapped and shared by the workers) re-score them; those
float16 vectors are also what ``vectors`` reads back for the searcher's exact candidate scores. An IVF builds in a
fraction of an HNSW graph's time, and the compact codes keep the scan from being bound by memory bandwidth; the
fast-scan lists are read into each worker, as FAISS cannot map them (docs/decisions/ann-index.md). Older builds
with float16 codes in the IVF lists (``IndexIVFScalarQuantizer``) are still read and searched as they are.
"""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

EXACT = "IndexFlatIP"
IVF = "IndexRefine"  # fast-scan PQ IVF proposing, float16 vectors re-scoring
IVF_FP16 = "IndexIVFScalarQuantizer"  # float16 codes in the IVF lists: older builds (still read)
IVF_CODES = "fp16"  # the re-scoring vectors' (and the older lists') precision
# Candidates the PQ scan proposes for float16 re-scoring: at least this many, and at least REFINE_FACTOR x k.
REFINE_CANDIDATES = 200
REFINE_FACTOR = 4
IVF_NITER = 10  # k-means iterations; more did not change recall (docs/decisions/ann-index.md)
IVF_TRAIN_PER_LIST = 40  # training vectors per list (FAISS warns below 39)
# A filter that allows at most this many passages is answered by an exact scan of just those vectors: an IVF
# probe of a few lists could miss most of them, and a scan of this many costs about what the probes do
# (docs/decisions/filtered-search.md).
EXACT_FILTER_LIMIT = 20_000
# Batches of at least this many queries go through BLAS (faiss-cpu's default threshold keeps batches on the
# slower per-query kernel); single queries stay on the per-query kernel, which is faster for one
# (docs/decisions/faiss-openmp-threads.md).
BLAS_THRESHOLD = 20


def configure_faiss() -> None:
    """Set FAISS's knobs for this service: one OpenMP thread (in this thread), BLAS for batches only."""
    import faiss

    # A single query is slower on two OpenMP threads than on one (docs/decisions/faiss-openmp-threads.md).
    faiss.omp_set_num_threads(1)
    faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
    _one_thread.done = True


_one_thread = threading.local()


def one_openmp_thread() -> None:
    """Make FAISS use one OpenMP thread in the calling thread (once per thread; cheap after that).

    OpenMP's thread count is a per-thread setting: ``omp_set_num_threads`` in the thread that loaded the index
    does not reach the threads that later search it, such as gunicorn's request threads, which start with one
    OpenMP thread per core. There every question ran FAISS on two threads, whose second one then spins for a
    while on the other core (docs/decisions/faiss-openmp-threads.md).
    """
    if not getattr(_one_thread, "done", False):
        import faiss

        faiss.omp_set_num_threads(1)
        _one_thread.done = True


def ivf_parameters(n: int) -> dict:
    """Return the IVF settings used for ``n`` vectors: about 2*sqrt(n) lists (a power of two), max(64, nlist/32) probes.

    At least 64 probes because the lists hold coarse PQ codes: the extra probes cost little and lift recall
    (docs/decisions/ann-index.md).
    """
    nlist = int(2 ** round(math.log2(max(2.0 * math.sqrt(max(n, 1)), 64))))
    nlist = max(1, min(nlist, 65536, n // IVF_TRAIN_PER_LIST))  # tiny indexes (tests) still train
    return {"nlist": nlist, "nprobe": min(nlist, max(64, nlist // 32)), "niter": IVF_NITER,
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
    m = d // 2 if d % 2 == 0 else d  # sub-quantisers of two dimensions each (4 bits: d/4 bytes a vector)
    pq = f"PQ{m}x4fs"
    index = faiss.index_factory(d, f"IVF{params['nlist']},{pq},Refine(SQfp16)", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter = params["niter"]
    ivf.cp.seed = seed
    rng = np.random.default_rng(seed)
    sample = vectors[np.sort(rng.choice(n, params["train_size"], replace=False))]
    index.train(sample)
    index.add(vectors)
    ivf.nprobe = params["nprobe"]
    return index, {"type": IVF, "base": "IndexIVFPQFastScan", "pq": pq, "codes": IVF_CODES, "metric": "inner_product",
                   "refine_candidates": REFINE_CANDIDATES, "refine_factor": REFINE_FACTOR,
                   "ann_threshold": int(ann_threshold), "exact_filter_limit": EXACT_FILTER_LIMIT, **params}


def read_dense_index(path: Path, mmap: bool = True):
    """Read a FAISS index file, memory-mapped where the index type allows (flat codes, IVF lists)."""
    import faiss

    if not mmap:
        return faiss.read_index(str(path))
    with open(path, "rb") as fh:
        fourcc = fh.read(4)
    if fourcc in (b"IxFI", b"IxF2", b"IxFl", b"IxRF"):  # flat codes (or the re-scoring ones): map the vectors
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
        self.refine = isinstance(self.index, faiss.IndexRefine)
        self.ivf = faiss.extract_index_ivf(self.index) if self.refine else self.index
        self.is_ivf = isinstance(self.ivf, faiss.IndexIVF)
        if self.is_ivf:
            self.nprobe = int(self.meta.get("nprobe") or self.ivf.nprobe)
            self.ivf.nprobe = self.nprobe
            self.exact_filter_limit = int(self.meta.get("exact_filter_limit", EXACT_FILTER_LIMIT))
            self.refine_candidates = int(self.meta.get("refine_candidates", REFINE_CANDIDATES))
            self.refine_factor = float(self.meta.get("refine_factor", REFINE_FACTOR))

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(scores, ids)``, each ``[n_queries, k]``; missing slots have id -1.

        Args:
            queries: float32 ``[n, d]`` unit vectors.
            allowed: int64 passage ids the results must come from (None: all).
        """
        one_openmp_thread()
        k = max(1, min(k, self.size)) if self.size else 1
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.size == 0 or (allowed is not None and len(allowed) == 0):
            n = len(queries)
            return np.zeros((n, k), dtype=np.float32), -np.ones((n, k), dtype=np.int64)
        if allowed is None:
            if self.refine:
                return self.index.search(queries, k, params=self._params(k, self.nprobe))
            return self.index.search(queries, k)
        allowed = np.ascontiguousarray(allowed, dtype=np.int64)
        if not self.is_ivf:
            sel, _bits = self._bitmap(allowed)
            return self.index.search(queries, k, params=self._faiss.SearchParameters(sel=sel))
        if len(allowed) <= self.exact_filter_limit:
            return self._exact_subset(queries, k, allowed)
        sel, _bits = self._bitmap(allowed)  # _bits: the memory sel points into, alive until the search returns
        # Probe more lists the fewer passages the filter keeps, so about as many allowed vectors are scanned.
        share = len(allowed) / self.size
        nprobe = min(int(self.ivf.nlist), int(math.ceil(self.nprobe / max(share, 1e-9))))
        scores, ids = self.index.search(queries, k, params=self._params(k, nprobe, sel))
        if (ids < 0).any():  # the probed lists held fewer than k allowed passages
            return self._exact_subset(queries, k, allowed)
        return scores, ids

    def _params(self, k: int, nprobe: int, sel=None):
        """Search parameters: ``nprobe`` lists (only ``sel``'s ids), and how many candidates to re-score."""
        ivf = self._faiss.SearchParametersIVF(nprobe=nprobe) if sel is None else \
            self._faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
        if not self.refine:
            return ivf
        factor = max(self.refine_factor, self.refine_candidates / k)
        params = self._faiss.IndexRefineSearchParameters(k_factor=factor, base_index_params=ivf)
        params._keep = ivf  # the SWIG object holds a bare pointer to the IVF parameters
        return params

    def _bitmap(self, allowed: np.ndarray):
        """Return an ``IDSelectorBitmap`` of ``allowed`` and the bit array it reads (keep it alive while searching).

        A bitmap is built in one pass over the ids; ``IDSelectorBatch`` hashes every id first, which made a filtered
        question on a large index many times slower (docs/decisions/filtered-search.md).
        """
        mask = np.zeros(self.size, dtype=bool)
        mask[allowed] = True
        bits = np.packbits(mask, bitorder="little")
        return self._faiss.IDSelectorBitmap(self.size, self._faiss.swig_ptr(bits)), bits

    # Below size / this many allowed ids, reading their vectors back one by one beats a scan of every float16 vector
    # that skips the others (docs/decisions/filtered-search.md).
    SCAN_SHARE = 500

    def _exact_subset(self, queries: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.refine and len(allowed) * self.SCAN_SHARE > self.size:
            sel, _bits = self._bitmap(allowed)
            refine = self._faiss.downcast_index(self.index.refine_index)
            scores, ids = refine.search(queries, k, params=self._faiss.SearchParameters(sel=sel))
            scores[ids < 0] = 0.0
            return scores, ids
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
        one_openmp_thread()
        return self.index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))
