"""Embed an index build's passages and sentences on a Ray actor pool (``qa-service index --ray [ADDRESS]``).

``maybe_distributed`` returns the embedder itself without ``settings.ray_address``, else a ``RayEmbedder``
with the same interface, whose actors each run exactly the wrapped encoder: the build's ONNX export (its bytes
go through Ray's object store, so the build folder need not exist on the nodes), a sentence-transformers model
loaded again by name, or any other embedder pickled. Texts go out as ``(id, text)`` rows and come back as
``(id, vector)`` rows scattered by id, since Ray Data does not keep order; a missing or repeated id is an error.
A local Ray listens on loopback only; Ray reads that choice from its environment when imported, so it is set
before the import, and a Ray imported earlier without it is refused. Ray is imported only here and only when
used (docs/decisions/ray-indexing.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..config import Settings
from . import Embedder
from .onnx_encoder import TOKENIZER_FILE, OnnxEmbedder
from .torch_encoder import SentenceTransformerEmbedder

logger = logging.getLogger(__name__)

LOCAL = "local"
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": a local Ray's node address is 127.0.0.1
LOOPBACK = "127.0.0.1"
LOCAL_CPUS = 2  # a local Ray gets at least this many logical CPUs (more when more actors are asked for)
ACTOR_CPUS = 1  # CPUs reserved by each encoder actor; its ONNX session uses as many intra-op threads
BATCHES_PER_CALL = 4  # an actor call encodes this many encoder batches (its length sorting works within a call)
BLOCKS_PER_ACTOR = 4  # input blocks per actor, so a slow actor does not hold back the end of the run
MAX_BLOCK_ROWS = 8192  # more texts than actors x this: more, smaller blocks (bounded memory per task)
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the qa_service folder, shipped to a cluster's nodes


class RayUnavailable(RuntimeError):
    """Ray was asked for but is not installed, or cannot be started as asked."""


def import_ray(address: str | None = None):
    """Return the ``ray`` module, or raise ``RayUnavailable`` saying how to install it.

    For a local Ray (``address == "local"``) this first sets ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which Ray
    reads once, when imported, to give this node the loopback address; a Ray already imported without it is
    refused rather than started on the machine's address.
    """
    if address == LOCAL and os.environ.get(LOOPBACK_ENV) != "0":
        if sys.modules.get("ray") is not None:
            raise RayUnavailable(f"Ray was imported before {LOOPBACK_ENV}=0 was set, so a local Ray would listen "
                                 f"on this machine's address; set {LOOPBACK_ENV}=0 in the environment before "
                                 "starting, or import Ray only through qa-service.")
        os.environ[LOOPBACK_ENV] = "0"
    try:
        import ray
        import ray.data  # noqa: F401  (the ``data`` extra: pandas, pyarrow)
    except ImportError as exc:
        raise RayUnavailable("Indexing with --ray needs Ray: pip install 'ray[data]==2.60.0' "
                             "(or pip install -e '.[ray]').") from exc
    return ray


def maybe_distributed(embedder: Embedder, settings: Settings) -> Embedder:
    """Return ``embedder`` unchanged without ``settings.ray_address``, else a ``RayEmbedder`` wrapping it."""
    if not settings.ray_address:
        return embedder
    return RayEmbedder(embedder, settings.ray_address, settings.ray_actors)


# --------------------------------------------------------------------------- Ray's lifetime

class _Session:
    """Process-wide: how many ``ray_scope``s are open, and whether we started (so must stop) Ray."""

    lock = threading.RLock()
    depth = 0
    owned = False
    address: str | None = None
    started_seconds: float | None = None  # how long the last ray.init took (benchmarks report it)
    shipped: dict = {}  # id(embedder) -> (embedder, ObjectRef spec) for the current Ray session


@contextlib.contextmanager
def ray_scope() -> Iterator[None]:
    """Keep a Ray started inside this block (by ``RayEmbedder.encode``) up until the block ends, then stop it.

    Cheap and Ray-free when nothing inside uses Ray. Nested scopes share one Ray; only the outermost stops it.
    """
    with _Session.lock:
        _Session.depth += 1
    try:
        yield
    finally:
        with _Session.lock:
            _Session.depth -= 1
            if _Session.depth == 0:
                _shutdown()


def _shutdown() -> None:
    _Session.shipped = {}
    if _Session.owned:
        import ray

        started = time.perf_counter()
        try:
            ray.shutdown()
        finally:
            _Session.owned = False
            _Session.address = None
        logger.info("Ray shut down in %.1f s", time.perf_counter() - started)


def _connect(address: str, actors: int):
    """Make sure this process is connected to a Ray (started or joined per ``address``); return ``ray``."""
    ray = import_ray(address)
    with _Session.lock:
        if ray.is_initialized():
            if _Session.owned and _Session.address != address:
                raise RuntimeError(f"already connected to Ray at {_Session.address!r}, not {address!r}")
            return ray
        _Session.shipped = {}
        started = time.perf_counter()
        if address == LOCAL:
            _init_local(ray, max(LOCAL_CPUS, actors * ACTOR_CPUS))
        else:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False,
                     runtime_env={"py_modules": [str(PACKAGE_DIR)], "excludes": ["__pycache__", "*.pyc"]})
        _Session.owned, _Session.address = True, address
        _Session.started_seconds = time.perf_counter() - started
        logger.info("Ray %s in %.1f s", "started locally" if address == LOCAL else f"connected at {address}",
                    _Session.started_seconds)
        return ray


def _init_local(ray, cpus: int) -> None:
    """Start a private Ray on this machine with every listener on loopback (``import_ray`` set the environment)."""
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    node = ray.util.get_node_ip_address()
    if node != LOOPBACK:
        ray.shutdown()
        raise RayUnavailable(f"the local Ray came up at {node}, not on loopback ({LOOPBACK}); refusing to index "
                             f"with listeners other machines may reach (is {LOOPBACK_ENV} overridden?).")


# --------------------------------------------------------------------------- shipping the encoder

def encoder_spec(embedder: Embedder) -> dict:
    """Describe ``embedder`` so an actor anywhere can rebuild it: file bytes, a model name, or the object."""
    if isinstance(embedder, OnnxEmbedder):
        return {"kind": "onnx", "model_name": Path(embedder.model_file).name,
                "model": Path(embedder.model_file).read_bytes(),
                "tokenizer": Path(embedder.tokenizer_file).read_bytes(),
                "options": {"name": embedder.name, "dimension": embedder.dimension,
                            "max_seq_length": embedder.max_seq_length, "input_names": list(embedder.input_names),
                            "pad_id": embedder.pad_id, "precision": embedder.precision,
                            "token_pooling": embedder.token_pooling}}
    if isinstance(embedder, SentenceTransformerEmbedder):
        return {"kind": "sentence-transformers", "model": embedder.name}
    return {"kind": "object", "embedder": embedder}


def load_encoder(spec: dict, threads: int = ACTOR_CPUS) -> Embedder:
    """Rebuild the embedder ``encoder_spec`` described (in an actor)."""
    if spec["kind"] == "onnx":
        folder = Path(tempfile.mkdtemp(prefix="qa-service-encoder-"))
        try:
            (folder / spec["model_name"]).write_bytes(spec["model"])
            (folder / TOKENIZER_FILE).write_bytes(spec["tokenizer"])
            # onnxruntime and tokenizers read the files here; nothing reads them later (count_tokens is not used).
            return OnnxEmbedder(folder / spec["model_name"], folder / TOKENIZER_FILE, threads=threads,
                                **spec["options"])
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    if spec["kind"] == "sentence-transformers":
        return SentenceTransformerEmbedder(spec["model"])
    return spec["embedder"]


class EncoderActor:
    """The ``map_batches`` callable class: one encoder per actor, ``{"id", "text"}`` in, ``{"id", "vector"}`` out.

    With a ``groups`` column (``encode_pooled``: per text, JSON ``[[out_id, [[start, end], ...]], ...]``) each
    text also gives one row per group, under that group's own output id.
    """

    def __init__(self, shipped: list, batch_size: int):
        import ray

        # ``shipped`` is [ObjectRef] (a list, so Ray hands us the reference and we fetch it here, once).
        self.embedder = load_encoder(ray.get(shipped[0]))
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        texts = [str(t) for t in batch["text"]]
        ids = np.asarray(batch["id"], dtype=np.int64)
        if "groups" not in batch:
            vectors = self.embedder.encode(texts, batch_size=self.batch_size)
            return {"id": ids, "vector": np.asarray(vectors, dtype=np.float32)}
        groups = [json.loads(str(g)) for g in batch["groups"]]
        vectors, pooled = self.embedder.encode_pooled(texts, [[ranges for _, ranges in g] for g in groups],
                                                      batch_size=self.batch_size)
        out_ids = [ids] + [np.asarray([out for out, _ in g], dtype=np.int64) for g in groups]
        width = self.embedder.dimension
        rows = [np.asarray(vectors, dtype=np.float32)] + [np.asarray(p, dtype=np.float32).reshape(-1, width)
                                                         for p in pooled]
        return {"id": np.concatenate(out_ids), "vector": np.concatenate(rows)}


# --------------------------------------------------------------------------- the wrapper

class RayEmbedder:
    """An ``Embedder`` whose ``encode`` runs the wrapped encoder on a Ray actor pool; everything else is delegated."""

    def __init__(self, embedder: Embedder, address: str, actors: int = 2):
        if actors < 1:
            raise ValueError(f"ray_actors must be at least 1, not {actors}")
        self.embedder = embedder
        self.address = address
        self.actors = int(actors)
        self.name = embedder.name
        self.dimension = int(embedder.dimension)
        self.max_seq_length = int(embedder.max_seq_length)

    def __getattr__(self, attr):  # backend, precision, model_file ...: whatever the wrapped encoder has
        if attr == "embedder":
            raise AttributeError(attr)
        return getattr(self.embedder, attr)

    def count_tokens(self, text: str) -> int:
        return self.embedder.count_tokens(text)

    def _shipped(self, ray):
        key = id(self.embedder)
        entry = _Session.shipped.get(key)
        if entry is None or entry[0] is not self.embedder:
            entry = (self.embedder, ray.put(encoder_spec(self.embedder)))
            _Session.shipped[key] = entry
        return entry[1]

    def encode(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Return float32 ``[len(texts), dimension]`` unit rows in the order of ``texts``."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        with ray_scope():
            ray = _connect(self.address, self.actors)
            return self._encode(ray, texts, max(1, int(batch_size)), progress)

    def encode_pooled(self, texts: Sequence[str], groups, batch_size: int = 32,
                      progress: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
        """``encode_pooled`` of the wrapped encoder, on the actor pool: each group comes back as a row of its own id."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32), []
        bounds = np.cumsum([len(texts)] + [len(g) for g in groups])  # text i's groups: ids bounds[i]..bounds[i+1]
        payload = [json.dumps([[int(bounds[i]) + j, [list(r) for r in ranges]] for j, ranges in enumerate(g)])
                   for i, g in enumerate(groups)]
        with ray_scope():
            ray = _connect(self.address, self.actors)
            out = self._encode(ray, texts, max(1, int(batch_size)), progress, payload, int(bounds[-1]))
        return out[:len(texts)], [out[bounds[i]:bounds[i + 1]] for i in range(len(texts))]

    def _encode(self, ray, texts: list[str], batch_size: int, progress: bool, groups: list[str] | None = None,
                total: int | None = None) -> np.ndarray:
        import pyarrow as pa
        from ray.data import ActorPoolStrategy, DataContext

        n = len(texts)
        per_call = batch_size * BATCHES_PER_CALL
        # Blocks in a multiple of the actor count, each one map call at most: Ray Data bundles smaller blocks
        # up to a call's batch size, which could hand one actor twice the rows of another.
        blocks = max(self.actors, min(-(-n // per_call), self.actors * BLOCKS_PER_ACTOR), -(-n // MAX_BLOCK_ROWS))
        blocks = min(n, -(-blocks // self.actors) * self.actors)
        step = -(-n // blocks)
        per_call = min(per_call, step)
        tables = [pa.table({"id": np.arange(s, min(s + step, n), dtype=np.int64), "text": texts[s:s + step],
                            **({"groups": groups[s:s + step]} if groups is not None else {})})
                  for s in range(0, n, step)]
        rows = n if total is None else total  # output rows: one per text, and one per group when pooling
        context = DataContext.get_current()
        saved = context.enable_progress_bars
        data_logger = logging.getLogger("ray.data")
        saved_level = data_logger.level
        # Ray Data's progress bars on a terminal; elsewhere it would log a dozen INFO lines per pass instead.
        bars = bool(progress) and sys.stderr.isatty()
        context.enable_progress_bars = bars
        if not bars:
            data_logger.setLevel(logging.ERROR)  # "Starting execution of Dataset ..." and friends
        # A local actor that dies (a bug, out of memory) would only die again: fail the build at once (this also
        # silences Ray's warning about restarting actors whose arguments live in the object store). On a
        # cluster keep Ray's default, restarting actors lost with a node. Ray 2.60 has no named parameter for
        # it yet, hence the deprecated ``**ray_remote_args`` and its warning muted.
        restarts = {"max_restarts": 0} if self.address == LOCAL else {}
        started = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
                dataset = ray.data.from_arrow(tables).map_batches(
                    EncoderActor, fn_constructor_args=([self._shipped(ray)], batch_size), batch_size=per_call,
                    batch_format="numpy", compute=ActorPoolStrategy(size=self.actors), num_cpus=ACTOR_CPUS,
                    **restarts)
            out = np.full((rows, self.dimension), np.nan, dtype=np.float32)
            seen = np.zeros(rows, dtype=bool)
            for batch in dataset.iter_batches(batch_format="numpy", batch_size=None):
                ids = np.asarray(batch["id"], dtype=np.int64)
                if len(ids) and (ids.min() < 0 or ids.max() >= rows or seen[ids].any()
                                 or len(np.unique(ids)) != len(ids)):
                    raise RuntimeError("the Ray encoder pool returned an unknown or repeated passage id")
                out[ids] = batch["vector"]
                seen[ids] = True
        finally:
            context.enable_progress_bars = saved
            data_logger.setLevel(saved_level)
        if not seen.all():
            raise RuntimeError(f"the Ray encoder pool returned {int(seen.sum())} of {rows} vectors")
        logger.info("embedded %d texts on %d Ray actor(s) in %.1f s", n, self.actors, time.perf_counter() - started)
        return out  # the actors' rows as they came: already unit length, not rounded again
