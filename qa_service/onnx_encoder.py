"""Encode questions without torch: an onnxruntime + ``tokenizers`` encoder, exported from the model at index time.

Why a module of its own rather than more of ``embedding.py``: the serving half (``OnnxEmbedder``) must import
only numpy, onnxruntime and tokenizers, while the index-time half (export, int8 quantisation, checking the
export against sentence-transformers, reusing an earlier build's export) needs torch; keeping both here, with
torch imported only inside the index-time functions, makes that boundary easy to see and to test.

At index time ``prepare_encoder`` turns a ``SentenceTransformerEmbedder`` into::

    builds/<id>/model/model.onnx        (or model.int8.onnx)  transformer + pooling + L2 norm in one graph,
                                        attention/normalisation/GELU fused by onnxruntime's optimizer (``_fuse``)
    builds/<id>/model/tokenizer.json    the model's own fast tokenizer

plus a manifest entry ``"encoder": {"backend": "onnx", "precision": "fp32", "file": ..., "sha256": ...}``.
Passages are then embedded by that same ONNX encoder, so passages and questions always share one backend and
one precision. The export is keyed by a fingerprint of the loaded model (weights, tokenizer, modules) and
hard-linked from an earlier build of the same index when the fingerprint matches, so re-indexing changed
articles does not re-export. If export is impossible (or the export disagrees with sentence-transformers) the
build falls back to sentence-transformers, says so in a warning and records ``"backend": "sentence-transformers"``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .files import link_or_copy, sha256_file
from .embedding import (Embedder, Group, normalize_rows, pool_groups, token_counts_add_up, token_pooling_of,
                        whole_words)
from .errors import IndexCorrupt, ModelNotFound

logger = logging.getLogger(__name__)

EXPORT_VERSION = 3  # bump when the exported graph changes; old exports are then not reused (2: fused attention,
                    # 3: the transformer's token vectors as a second output, for ``encode_pooled``)
OPSET = 17
MODEL_DIR = "model"
TOKENIZER_FILE = "tokenizer.json"
MODEL_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
QUANTIZE_CHOICES = ("none", "int8")
OUTPUT = "sentence_embedding"
TOKENS = "token_embeddings"  # [batch, sequence, dimension], before pooling: what sentence vectors are pooled from
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Smallest cosine to sentence-transformers, over the probe texts, that an export must reach to be used.
# fp32 agrees to ~1e-7; dynamic per-channel int8 measured 0.991 minimum / 0.995 mean on 500 SciFact abstracts.
MIN_COSINE = {"fp32": 0.9999, "int8": 0.97}
# One question on 2 intra-op threads: 4.3-5.7 ms p50 against 6.4-7.4 ms on one, back to back (fp32, dev questions,
# this 2-core machine), for ~1 ms more CPU in thread hand-offs; a serving worker therefore falls back to one thread
# while other workers hold questions (``share_cores``).
SERVING_THREADS = max(1, min(2, os.cpu_count() or 1))
INDEXING_THREADS = 2


def helper_placement(threads: int) -> tuple[tuple[int, ...], frozenset[int]] | None:
    """Where a question encoder's threads run: (CPUs of onnxruntime's helper threads, CPUs of the calling thread).

    onnxruntime runs each operator on the thread that calls ``run`` plus ``threads - 1`` pool threads ("helpers"),
    which sleep between operators (see ``_open_session``). Left to the kernel, a helper woken after the machine sat
    idle was placed on the caller's own CPU, so the two took turns instead of working side by side. Measured 11-27
    on this 2-vCPU VM (a lone dev question, medians): back to back 3.3-4.0 ms either way, but after 10-30 ms of
    idleness 5.7-6.9 ms (slower than one thread) against 3.8-4.2 ms with the helper pinned to one CPU and the caller
    to the others; with both on one CPU, 5.1-5.9 ms everywhere. So the helpers get the last ``threads - 1`` CPUs
    this process may use, and ``OnnxEmbedder`` keeps the caller off them while it runs; pinned helpers also spin
    between the operators of a run (``OnnxEmbedder._open_session``). None (the kernel places every thread, which
    sleep between operators) with one thread, fewer CPUs than threads, or no ``sched_setaffinity`` here.
    """
    if threads < 2 or not hasattr(os, "sched_getaffinity"):
        return None
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except OSError:
        return None
    if len(allowed) < threads:
        return None
    helpers = tuple(allowed[len(allowed) - (threads - 1):])
    return helpers, frozenset(allowed) - frozenset(helpers)


def run_on_cpus(cpus: frozenset[int], fn: Callable, *args):
    """Call ``fn(*args)`` with the calling thread kept on ``cpus`` (those of them it may use), then restore its own
    CPU set. Falls back to a plain call when the thread may use none of them or its CPU set cannot be changed."""
    try:
        before = os.sched_getaffinity(0)
    except OSError:
        return fn(*args)
    target = before & cpus
    if not target or target == before:
        return fn(*args)
    try:
        os.sched_setaffinity(0, target)  # pid 0: this thread only
    except OSError:
        return fn(*args)
    try:
        return fn(*args)
    finally:
        try:
            os.sched_setaffinity(0, before)
        except OSError:  # pragma: no cover - the CPU set changed under us; the thread keeps the narrower one
            pass

PROBE_TEXTS = (
    "What did the minister say about the ceasefire talks?",
    "Hamas",
    "",
    "  Leading and trailing spaces, UPPER and lower CASE, numbers 1,234.5 and 7 October 2023.  ",
    "Naïve café résumé — “quotes”, ‘apostrophes’ and emoji 🙂 in one line.",
    "A long text that must be truncated exactly where the model truncates it. " * 60,
)


def resolve_quantize(quantize: str, manifest: dict | None) -> str:
    """Return the ``--quantize`` choice a build means: "auto" (the default) keeps the precision of the index
    ``manifest`` describes, or fp32 ("none") when there is none; "none" and "int8" are kept as chosen.

    So an index built with ``--quantize int8`` stays int8 when a later ``qa-service serve --build`` or ``eval``
    refreshes it without repeating the choice (until 11-27 it was found stale and re-embedded in fp32).
    """
    if quantize != "auto":
        return quantize
    chosen = ((manifest or {}).get("encoder") or {}).get("quantize")
    return chosen if chosen in QUANTIZE_CHOICES else "none"


def encoder_precision(quantize: str) -> str:
    """Return the precision a ``--quantize`` choice asks for."""
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, not {quantize!r}")
    return "int8" if quantize == "int8" else "fp32"


# --------------------------------------------------------------------------- serving

class OnnxEmbedder:
    """Embeds with an exported ONNX graph on onnxruntime; tokenises with the model's ``tokenizer.json``.

    Same interface as ``SentenceTransformerEmbedder``; never imports torch. Inputs are truncated to
    ``max_seq_length`` tokens and a batch is padded only to its longest member (the shipped tokenizer.json
    would otherwise pad everything to 128). Safe to call from several threads.
    """

    backend = "onnx"

    def __init__(self, model_file: str | Path, tokenizer_file: str | Path, *, name: str, dimension: int,
                 max_seq_length: int, input_names: Sequence[str] = INPUTS, pad_id: int = 0,
                 precision: str = "fp32", threads: int = SERVING_THREADS, token_pooling: str | None = None,
                 pin_threads: bool = False, open_session: bool = True):
        """``open_session=False`` leaves creating the onnxruntime session to ``open()`` (or the first encode):
        a build cuts its articles with the tokenizer alone and opens the session once its lexical files are
        under way (``store.build_index``). ``token_pooling`` is provisional until then."""
        try:
            import onnxruntime  # noqa: F401  (checked here, used in _open_session)
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover - packaging error
            raise ModelNotFound("onnxruntime and tokenizers are needed to encode questions with the index's ONNX "
                                "encoder; install them (pip install onnxruntime tokenizers).") from exc
        self.name = name
        self.dimension = int(dimension)
        self.max_seq_length = int(max_seq_length)
        self.precision = precision
        self.input_names = tuple(input_names)
        self.pad_id = int(pad_id)
        self.model_file = str(model_file)
        self._tokenizer_file = str(tokenizer_file)
        self._tokenizer = Tokenizer.from_file(self._tokenizer_file)
        self._tokenizer.no_padding()  # we pad per batch, in numpy (also keeps the tokenizer read-only: thread-safe)
        self._tokenizer.enable_truncation(self.max_seq_length)
        self._counter = None
        self.threads = max(1, int(threads))
        self._pin_threads = pin_threads
        self._caller_cpus: frozenset[int] | None = None
        self._session = None
        # Serving workers add a one-thread session (``share_cores``) for when other workers are busy.
        self._narrow = None
        self._contended: Callable[[], bool] | None = None
        self._requested_pooling = token_pooling
        self.token_pooling = token_pooling
        self._index_dir: Path | None = None  # set by ``from_manifest``: open() then reports a damaged encoder as such
        if open_session:
            self.open()

    def open(self) -> None:
        """Create the onnxruntime session, if not yet done, and check the graph's inputs and outputs."""
        if self._session is not None:
            return
        try:
            self._session = self._new_session()
            missing = set(self.input_names) - {i.name for i in self._session.get_inputs()}
            if missing:
                raise ValueError(f"the ONNX model has no input(s) {sorted(missing)}")
        except Exception as exc:
            self._session = None
            if self._index_dir is None:
                raise
            raise _unreadable(self._index_dir, exc) from exc
        # "mean" when the graph also gives token vectors and the model mean-pools them (``encode_pooled``).
        has_tokens = TOKENS in {o.name for o in self._session.get_outputs()}
        self.token_pooling = self._requested_pooling if has_tokens else None

    def _new_session(self):
        # ``pin_threads`` (question encoders): helpers and caller on different CPUs (``helper_placement``).
        placement = helper_placement(self.threads) if self._pin_threads else None
        if placement is not None:
            try:
                session = self._open_session(self.threads, helpers=placement[0])
                self._caller_cpus = placement[1]
                return session
            except Exception as exc:  # onnxruntime could not place its threads: leave them to the kernel
                logger.info("encoder threads not pinned (%s: %s)", type(exc).__name__, exc)
        return self._open_session(self.threads)

    def _open_session(self, threads: int, helpers: Sequence[int] = ()):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Pool threads never spin between runs: spinning there kept two serving workers of 2 threads each at 66
        # questions/s per process (15 ms each) against 111/s. Between the operators of one run (``force_spinning_stop``
        # ends it with the run) they spin only when pinned apart from the caller (``helper_placement``): unpinned, a
        # helper woken after idleness shared the caller's CPU, and spinning there made such a question far slower
        # (9-11 against 6-7 ms sleeping, 11-27); pinned, spinning saved 0.3-0.7 ms a question in-process, idle or
        # not, at the same CPU, and over HTTP 0.4-0.9 ms (paired A/B, start order swapped; 8 clients unchanged).
        if helpers:  # one CPU per helper thread; onnxruntime numbers CPUs from 1
            options.add_session_config_entry("session.intra_op_thread_affinities",
                                             ";".join(str(cpu + 1) for cpu in helpers))
            options.add_session_config_entry("session.intra_op.allow_spinning", "1")
            options.add_session_config_entry("session.force_spinning_stop", "1")
        else:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        return ort.InferenceSession(self.model_file, options, providers=["CPUExecutionProvider"])

    def share_cores(self, contended: Callable[[], bool]) -> None:
        """Encode on one thread whenever ``contended()`` says other processes are answering questions too.

        Two intra-op threads make a lone question faster (4.3 against 6.7 ms on this 2-core machine) but cost
        ~0.9 ms more CPU in thread hand-offs (7.8 against 6.9 ms a question), which is pure loss once the other
        core is busy with another worker's question. A serving worker therefore keeps a second, one-thread
        session and picks per call; the second session costs ~86 MiB (its copy and pre-packing of the weights).
        Both give the same vectors: onnxruntime splits the matrix products by output block, not by sum.
        """
        if self.threads <= 1 or self._narrow is not None:
            self._contended = contended
            return
        narrow = self._open_session(1)
        self._run([self._tokenizer.encode("warm up")], session=narrow)  # its lazy set-up, before any request
        self._narrow = narrow
        self._contended = contended

    def _session_now(self):
        contended, narrow = self._contended, self._narrow
        if narrow is not None and contended is not None and contended():
            return narrow
        if self._session is None:
            self.open()
        return self._session

    @classmethod
    def from_manifest(cls, manifest: dict, threads: int = SERVING_THREADS, pin_threads: bool = False,
                      open_session: bool = True) -> "OnnxEmbedder":
        """Load the encoder recorded in an index manifest (as returned by ``store.read_manifest``)."""
        entry = manifest["encoder"]
        build = Path(manifest["_build_dir"])
        try:
            embedder = cls(build / entry["file"], build / entry["tokenizer"], name=manifest["model"],
                           dimension=manifest["dimension"], max_seq_length=entry["max_seq_length"],
                           input_names=entry.get("inputs", INPUTS), pad_id=entry.get("pad_id", 0),
                           precision=entry.get("precision", "fp32"), threads=threads,
                           token_pooling=entry.get("token_pooling"), pin_threads=pin_threads, open_session=False)
        except Exception as exc:  # a missing tokenizer file, a bad entry
            raise _unreadable(build.parent.parent, exc) from exc
        embedder._index_dir = build.parent.parent
        if open_session:
            embedder.open()  # a missing model file, a damaged graph (onnxruntime's own error types): IndexCorrupt
        return embedder

    def _run(self, encodings: Sequence, outputs: Sequence[str] = (OUTPUT,), session=None):
        width = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        types = np.zeros((len(encodings), width), dtype=np.int64)
        for row, enc in enumerate(encodings):
            n = len(enc.ids)
            ids[row, :n] = enc.ids
            mask[row, :n] = 1
            types[row, :n] = enc.type_ids
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        session = session or self._session_now()
        feeds = {name: feeds[name] for name in self.input_names}
        if self._caller_cpus is not None and session is self._session:
            result = run_on_cpus(self._caller_cpus, session.run, list(outputs), feeds)
        else:
            result = session.run(list(outputs), feeds)
        return result[0] if len(outputs) == 1 else result

    def encode(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Return float32 ``[len(texts), dimension]`` unit rows; batches are formed from similar lengths."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        if len(texts) == 1:
            return normalize_rows(self._run([self._tokenizer.encode(texts[0])]))
        encodings = self._tokenizer.encode_batch(texts)
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        for rows in self._batches(encodings, batch_size, progress):
            out[rows] = self._run([encodings[i] for i in rows])
        return normalize_rows(out)

    @staticmethod
    def _batches(encodings: Sequence, batch_size: int, progress: bool):
        """Yield index arrays of batches, longest texts first (like sentence-transformers: each batch pads to
        little more than its own length)."""
        order = np.argsort(-np.array([len(e.ids) for e in encodings]), kind="stable")
        starts = range(0, len(encodings), max(1, batch_size))
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="embedding", unit="batch")
        for start in starts:
            yield order[start:start + max(1, batch_size)]

    def encode_pooled(self, texts: Sequence[str], groups: Sequence[Sequence[Group]], batch_size: int = 32,
                      progress: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
        """Embed ``texts`` and, from the same pass, pool each text's ``groups`` of character ranges.

        Returns the texts' vectors (as ``encode``) and, per text, a ``[len(groups[i]), dimension]`` array of unit
        rows (``embedding.pool_groups``: NaN where a group holds no token, e.g. past the truncation). Needs a
        graph with token vectors of a mean-pooling model (``token_pooling == "mean"``).
        """
        if self.token_pooling != "mean":
            raise ValueError("this ONNX encoder cannot pool token vectors (an older export, or not a mean-pooling model)")
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32), []
        encodings = self._tokenizer.encode_batch(texts)
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        pooled: list[np.ndarray] = [None] * len(texts)  # type: ignore[list-item]
        for rows in self._batches(encodings, batch_size, progress):
            vectors, tokens = self._run([encodings[i] for i in rows], (OUTPUT, TOKENS))
            out[rows] = vectors
            for row, i in enumerate(rows):
                enc = encodings[i]
                n = len(enc.ids)
                pooled[i] = pool_groups(tokens[row, :n], np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2),
                                        np.asarray(enc.special_tokens_mask, dtype=bool), groups[i])
        return normalize_rows(out), pooled

    @functools.cached_property
    def known_words(self) -> frozenset[str]:
        """The words the model's tokenizer holds whole (``embedding.whole_words``)."""
        return whole_words(self._tokenizer.get_vocab())

    @functools.cached_property
    def counts_add_up(self) -> bool:
        """Whether ``count_tokens`` of texts joined by whitespace is the sum of their counts (``token_counts_add_up``)."""
        return token_counts_add_up(self._tokenizer.to_str())

    def count_tokens(self, text: str) -> int:
        if self._counter is None:
            from tokenizers import Tokenizer

            counter = Tokenizer.from_file(self._tokenizer_file)
            counter.no_padding()
            counter.no_truncation()
            self._counter = counter
        return len(self._counter.encode(text, add_special_tokens=False).ids)


def _unreadable(index_dir: Path, exc: Exception) -> IndexCorrupt:
    return IndexCorrupt(f"The index in {index_dir} has an unreadable ONNX encoder ({type(exc).__name__}). Rebuild it "
                        f"with: qa-service index SEEDS_DIR --index-dir {index_dir} --force")


def onnx_backend_is_used(manifest: dict) -> bool:
    """Return whether questions for this index are encoded by its ONNX export."""
    entry = manifest.get("encoder") or {}
    return entry.get("backend") == "onnx" and "file" in entry


def encoder_status(manifest: dict, quantize: str) -> str | None:
    """Return why the index's encoder does not match the wanted ``quantize`` setting, or None when it does."""
    quantize = resolve_quantize(quantize, manifest)
    entry = manifest.get("encoder")
    if entry is None:
        return "the index has no query encoder entry (built by an older qa-service)"
    if entry.get("backend") in ("onnx", "sentence-transformers") and entry.get("quantize", "none") != quantize:
        return "the encoder precision changed"
    return None


# --------------------------------------------------------------------------- index time

def model_fingerprint(embedder) -> str:
    """Return a digest of what the export depends on: weights, tokenizer, module layout, lengths, exporter."""
    import torch

    model = embedder.model
    h = hashlib.sha256()
    head = {"export_version": EXPORT_VERSION, "opset": OPSET, "max_seq_length": embedder.max_seq_length,
            "modules": repr(model), "tokenizer": model.tokenizer.backend_tokenizer.to_str()
            if getattr(model.tokenizer, "is_fast", False) else None}
    h.update(json.dumps(head, sort_keys=True, default=str).encode("utf-8"))
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}|{tensor.dtype}|{tensor.numel()}".encode("utf-8"))
        h.update(tensor.view(torch.uint8).numpy())
    return h.hexdigest()


def model_files_digest(model: str) -> str | None:
    """Return a digest of the model folder's files (path, size, modification time); None when it has no folder.

    What a rebuild checks before embedding with the live index's export instead of loading the model on torch
    (``shareable_encoder``): like make, it trusts file metadata, so an edited or reinstalled model changes the
    digest and is exported again, and checking costs milliseconds rather than torch's seconds.
    """
    from .embedding import resolve_model_path

    try:
        folder = Path(resolve_model_path(model))
    except ModelNotFound:
        return None
    if not folder.is_dir():  # a hub name: only loading it says which files it is
        return None
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = path.stat()
        h.update(f"{path.relative_to(folder).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode("utf-8"))
    return h.hexdigest()


def shareable_encoder(manifest: dict | None, model: str, quantize: str, check_files: bool = True) -> bool:
    """True when a new build of ``model`` may embed with ``manifest``'s ONNX encoder instead of exporting again.

    That needs the same model name, the same model files as when the export was made (``model_files_digest``),
    the same ``--quantize`` choice, the current export format, and export files whose checksums still match.
    A rebuild then never imports torch: the export was checked against sentence-transformers when it was
    made, and the fingerprint it carries lets later exports find it too.

    Args:
        check_files: hash the export in ``manifest["_build_dir"]``; False for an index whose export lives
            elsewhere and is checked when fetched (PostgreSQL: ``backends.postgres.fetch_encoder``).
    """
    from .embedding import canonical_model_name

    entry = (manifest or {}).get("encoder") or {}
    if entry.get("backend") != "onnx" or entry.get("export_version") != EXPORT_VERSION:
        return False
    quantize = resolve_quantize(quantize, manifest)
    if manifest.get("model") != canonical_model_name(model) or entry.get("quantize", "none") != quantize:
        return False
    digest = entry.get("model_files")
    if not digest or digest != model_files_digest(model):
        return False
    if not check_files:
        return True
    build = Path(manifest.get("_build_dir", ""))
    try:  # a damaged export is not passed on: the rebuild exports afresh (how --force repairs an index)
        return (sha256_file(build / entry["file"]) == entry["sha256"]
                and sha256_file(build / entry["tokenizer"]) == entry["tokenizer_sha256"])
    except (OSError, KeyError):
        return False


# --------------------------------------------------------------------------- the machine's export cache

EXPORT_CACHE_KEEP = 4  # exports the cache holds (about 90 MB each for all-MiniLM-L6-v2); the least recently used go


def export_cache_dir() -> Path | None:
    """Where ONNX exports are kept for every index on this machine; None when the cache is off.

    ``QA_EXPORT_CACHE`` names the folder ("off" turns the cache off); else ``$XDG_CACHE_HOME/qa-service/onnx``,
    else ``~/.cache/qa-service/onnx``.
    """
    value = os.environ.get("QA_EXPORT_CACHE")
    if value is not None:
        return None if value.strip().lower() in ("", "off", "0", "no", "false") else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qa-service" / "onnx"


def _cache_key(model_files: str, quantize: str) -> str:
    return f"{model_files[:32]}-{quantize}-v{EXPORT_VERSION}"


def cached_export(model: str, quantize: str) -> dict | None:
    """Return a manifest (``model``, ``dimension``, ``encoder``, ``_build_dir``) of a cached export of ``model``'s
    files, fit to embed a new index with (``shareable_encoder``, checksums included); None when there is none.

    A new index folder of a model this machine has exported before then starts without loading torch or
    exporting again (~15 s), as a rebuild of an existing index does with its live export.
    """
    root, digest = export_cache_dir(), model_files_digest(model)
    if root is None or digest is None:
        return None
    folder = root / _cache_key(digest, quantize)
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    manifest["_build_dir"] = str(folder)
    if not shareable_encoder(manifest, model, quantize):
        logger.info("not using the cached ONNX export in %s: it does not match the model or its checksums; "
                    "removing it", folder)
        shutil.rmtree(folder, ignore_errors=True)  # the next export of this model takes its place
        return None
    try:
        os.utime(folder)  # used: kept longest
    except OSError:
        pass
    return manifest


def remember_export(manifest: dict | None) -> None:
    """Keep the ONNX export of a build (its manifest, as ``read_manifest`` gives) in the machine's export cache.

    Best effort: a cache that cannot be written is logged and skipped. The entry is assembled in a temporary
    folder and renamed into place, so a reader sees all of it or nothing. An entry for the same export (same
    checksum and size) is left as it is without hashing it again: ``cached_export`` checks the checksums before
    any use and removes an entry that fails them. Files are hard-linked where the cache shares the index's file
    system (builds are immutable).
    """
    entry = (manifest or {}).get("encoder") or {}
    root = export_cache_dir()
    if root is None or entry.get("backend") != "onnx" or not entry.get("model_files"):
        return
    folder = root / _cache_key(entry["model_files"], entry.get("quantize", "none"))
    tmp = root / f".tmp-{os.getpid()}-{time.time_ns()}"
    try:
        source = Path(manifest["_build_dir"])
        if folder.exists():
            try:
                cached = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
                if cached.get("encoder", {}).get("sha256") == entry.get("sha256") and \
                        (folder / entry["file"]).stat().st_size == (source / entry["file"]).stat().st_size:
                    return
            except (OSError, ValueError, KeyError):
                pass
            shutil.rmtree(folder, ignore_errors=True)
        for key in ("file", "tokenizer"):
            (tmp / entry[key]).parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(source / entry[key], tmp / entry[key])
        cached = {"model": manifest["model"], "dimension": manifest["dimension"],
                  "encoder": {**entry, "reused_from": None}, "cached_from": source.name}
        (tmp / "manifest.json").write_text(json.dumps(cached, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp, folder)
    except (OSError, KeyError) as exc:
        logger.info("could not keep the ONNX export in the cache %s: %s", root, exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune_cache(root)


def _prune_cache(root: Path) -> None:
    try:
        entries = [p for p in root.iterdir() if p.is_dir()]
        kept = sorted((p for p in entries if not p.name.startswith(".")), key=lambda p: p.stat().st_mtime,
                      reverse=True)
        for path in kept[EXPORT_CACHE_KEEP:]:
            shutil.rmtree(path, ignore_errors=True)
        for path in entries:  # a writer killed mid-copy; a running one finishes within the hour
            if path.name.startswith(".tmp-") and time.time() - path.stat().st_mtime > 3600:
                shutil.rmtree(path, ignore_errors=True)
    except OSError:
        pass


def _export_fp32(embedder, path: Path) -> tuple[list[str], int, dict]:
    """Export the sentence-transformers model (all its modules, then L2 norm) to ``path``, fused for onnxruntime.

    The transformer is traced with its plain ("eager") attention, whose graph onnxruntime's transformer optimizer
    recognises and fuses (``_fuse``); the default SDPA attention traces into a pattern it cannot fuse.

    Returns the graph's input names, the tokenizer's padding id and the fused operators ({} when none).
    """
    import warnings

    import torch

    model = embedder.model
    tokenizer = model.tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("the model has no fast (Rust) tokenizer to serve with")
    # Two texts of different lengths, so the traced graph takes the attention-mask path (never a shortcut
    # for unpadded batches) and both axes are seen to vary.
    sample = tokenizer(["A short question?", "A longer sentence, so that this batch of two needs padding."],
                       padding=True, truncation=True, max_length=embedder.max_seq_length, return_tensors="pt")
    names = [name for name in INPUTS if name in sample]
    unknown = set(sample) - set(names)
    if unknown or "input_ids" not in names or "attention_mask" not in names:
        raise ValueError(f"the tokenizer returns inputs this encoder does not feed: {sorted(unknown)}")

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *tensors):
            features = self.inner(dict(zip(names, tensors)))
            return (torch.nn.functional.normalize(features["sentence_embedding"], p=2, dim=1),
                    features["token_embeddings"])

    wrapped = Wrapped(model).eval()
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes[OUTPUT] = {0: "batch"}
    axes[TOKENS] = {0: "batch", 1: "sequence"}
    inputs = tuple(sample[name] for name in names)
    with torch.no_grad(), warnings.catch_warnings(), _eager_attention(model):
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; agreement is checked afterwards
        torch.onnx.export(wrapped, inputs, str(path), dynamo=False, input_names=names, output_names=[OUTPUT, TOKENS],
                          dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    fused = _fuse(path, _transformer_config(model), {name: t.numpy() for name, t in zip(names, inputs)})
    return names, int(pad_id), fused


def _transformer_config(model):
    """The Hugging Face config of the sentence-transformers model's transformer module, or None."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "num_attention_heads"):
            return config
    return None


@contextmanager
def _eager_attention(model):
    """Within the block, the model's transformer uses its plain attention implementation (restored after)."""
    modules = [m for m in model.modules() if hasattr(m, "set_attn_implementation")
               and getattr(getattr(m, "config", None), "_attn_implementation", None) not in (None, "eager")]
    before = [m.config._attn_implementation for m in modules]
    for module in modules:
        try:
            module.set_attn_implementation("eager")
        except (ValueError, NotImplementedError) as exc:  # a model without eager attention: export as it is
            logger.info("exporting with %s attention: %s", module.config._attn_implementation, exc)
    try:
        yield
    finally:
        for module, implementation in zip(modules, before):
            module.set_attn_implementation(implementation)


# onnxruntime's transformer optimizer knows these encoder families' attention/normalisation patterns.
FUSABLE_MODEL_TYPES = {"bert": "bert", "distilbert": "bert", "roberta": "bert", "xlm-roberta": "bert",
                       "mpnet": "bert", "electra": "bert"}
FUSION_MIN_COSINE = 0.99999  # fused vs unfused graph on the export's sample; else the unfused graph is kept


def _fuse(path: Path, config, sample: dict) -> dict:
    """Replace ``path`` by onnxruntime's fused transformer graph when that computes the same vectors.

    Attention, skip + layer normalisation, bias + GELU and the embedding layer become one operator each
    (695 nodes -> 69 for all-MiniLM-L6-v2): measured 7% less CPU per question at one thread, 7% faster builds,
    vectors equal to 1e-6. Returns the fused operator counts; {} (graph unchanged) when the model family is
    unknown to the optimizer, nothing fused, or the fused graph disagrees.
    """
    kind = FUSABLE_MODEL_TYPES.get(getattr(config, "model_type", None))
    if kind is None:
        return {}
    candidate = path.with_name(path.stem + ".fused.onnx")
    try:
        import onnxruntime as ort
        from onnxruntime.transformers.optimizer import optimize_model

        optimized = optimize_model(str(path), model_type=kind, num_heads=int(config.num_attention_heads),
                                   hidden_size=int(config.hidden_size), opt_level=0)
        fused = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
        if not fused.get("Attention"):
            return {}
        optimized.save_model_to_file(str(candidate))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        outputs = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]).run(None, sample)[0]
                   for p in (path, candidate)]
        agreement = float(np.min(np.sum(outputs[0] * outputs[1], axis=1)))
        if agreement >= FUSION_MIN_COSINE:
            candidate.replace(path)
            return fused
        logger.info("kept the unfused ONNX graph: the fused one agrees only to cosine %.6f", agreement)
    except Exception as exc:  # an optimizer that cannot handle the graph leaves a correct, slower one
        logger.info("kept the unfused ONNX graph: %s: %s", type(exc).__name__, exc)
    finally:
        candidate.unlink(missing_ok=True)
    return {}


def _quantize_int8(source: Path, target: Path) -> None:
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Per-channel weights: plain per-tensor QInt8 measured mean cosine 0.94 to fp32 on SciFact, per-channel 0.995
    # (onnxruntime's suggested pre-processing changed neither). It logs that hint with ``logging.warning``, which
    # would also configure the root logger of our host process: drop the hint, and give root a handler meanwhile.
    root = logging.getLogger()
    hint = _DropLogRecords("pre-processing before quantization")
    placeholder = logging.NullHandler() if not root.handlers else None
    root.addFilter(hint)
    if placeholder:
        root.addHandler(placeholder)
    try:
        # The fused graph's contrib operators (Attention, ...) have no type in ONNX's shape inference: say float.
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"DefaultTensorType": TensorProto.FLOAT})
    finally:
        root.removeFilter(hint)
        if placeholder:
            root.removeHandler(placeholder)


class _DropLogRecords(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _reuse_export(builds: Iterable[Path], fingerprint: str, precision: str, folder: Path) -> dict | None:
    """Hard-link a matching export from an earlier build into ``folder``; return its manifest entry."""
    for build in sorted(builds, key=lambda p: p.name, reverse=True):
        if build.name.startswith("."):
            continue
        try:
            entry = json.loads((build / "manifest.json").read_text(encoding="utf-8")).get("encoder") or {}
        except (OSError, ValueError):
            continue
        if not (entry.get("backend") == "onnx" and entry.get("fingerprint") == fingerprint
                and entry.get("precision") == precision):
            continue
        try:
            for key in ("file", "tokenizer"):
                link_or_copy(build / entry[key], folder / Path(entry[key]).name)
            if sha256_file(folder / Path(entry["file"]).name) != entry["sha256"]:
                raise ValueError("checksum mismatch")
        except (OSError, KeyError, ValueError) as exc:
            logger.info("not reusing the ONNX export of build %s: %s", build.name, exc)
            for path in folder.iterdir():
                path.unlink()
            continue
        return {**entry, "reused_from": build.name}
    return None


def _probe_texts(passages: Sequence[str], n: int = 8) -> list[str]:
    picks = [passages[i] for i in np.linspace(0, len(passages) - 1, min(n, len(passages)), dtype=int)] if passages else []
    return list(PROBE_TEXTS) + picks


def prepare_encoder(embedder: Embedder, quantize: str, build_dir: Path, builds: Path,
                    passages: Sequence[str] = ()) -> tuple[Embedder, dict]:
    """Return the embedder that must encode this build's passages and its manifest ``encoder`` entry.

    For a ``SentenceTransformerEmbedder``: export (or reuse) the ONNX encoder into ``build_dir/model`` and
    return an ``OnnxEmbedder`` for it, after checking it agrees with sentence-transformers on probe texts
    and a sample of ``passages``. Other embedders (fakes, custom ones) are returned unchanged.

    Args:
        quantize: "none" (fp32) or "int8".
        builds: the index's ``builds`` folder, searched for an earlier export of the same model.
    """
    from .embedding import SentenceTransformerEmbedder

    precision = encoder_precision(quantize)
    if not isinstance(embedder, SentenceTransformerEmbedder):
        return embedder, {"backend": getattr(embedder, "backend", "external"), "class": type(embedder).__name__}
    started = time.perf_counter()
    folder = Path(build_dir) / MODEL_DIR
    try:
        folder.mkdir()
        fingerprint = model_fingerprint(embedder)
        previous = [p for p in Path(builds).iterdir() if p.is_dir()] if Path(builds).is_dir() else []
        entry = _reuse_export(previous, fingerprint, precision, folder)
        if entry is not None:
            onnx = OnnxEmbedder(folder / MODEL_FILES[entry["precision"]], folder / TOKENIZER_FILE, name=embedder.name,
                                dimension=embedder.dimension, max_seq_length=entry["max_seq_length"],
                                input_names=entry["inputs"], pad_id=entry["pad_id"], precision=entry["precision"],
                                threads=INDEXING_THREADS, token_pooling=entry.get("token_pooling"))
            entry.update(quantize=quantize, model_files=model_files_digest(embedder.path))
            logger.info("reused the ONNX encoder of build %s (%.1f s)", entry["reused_from"],
                        time.perf_counter() - started)
            return onnx, entry
        # int8 is quantised from the fp32 graph, so an earlier fp32 export of the same model saves the export.
        base = _reuse_export(previous, fingerprint, "fp32", folder) if precision == "int8" else None
        if base is not None:
            inputs, pad_id, checked = base["inputs"], base["pad_id"], base.get("agreement_min_cosine")
        else:
            inputs, pad_id, fused = _export_fp32(embedder, folder / MODEL_FILES["fp32"])
            (folder / TOKENIZER_FILE).write_text(embedder.model.tokenizer.backend_tokenizer.to_str(), encoding="utf-8")
            checked = None
        onnx, entry = _finish(embedder, precision, folder, inputs, pad_id, passages, checked)
        entry["fused"] = base.get("fused", {}) if base is not None else fused
        entry.update(fingerprint=fingerprint, quantize=quantize, reused_from=None,
                     model_files=model_files_digest(embedder.path))
        logger.info("exported %s to ONNX %s (min cosine to sentence-transformers %.6f, %.1f s)", embedder.name,
                    entry["precision"], entry["agreement_min_cosine"], time.perf_counter() - started)
        return onnx, entry
    except Exception as exc:
        shutil.rmtree(folder, ignore_errors=True)
        logger.warning("Could not export %s to ONNX (%s: %s); passages and questions will be encoded with "
                       "sentence-transformers on torch instead (slower start-up and queries).",
                       embedder.name, type(exc).__name__, exc)
        return embedder, {"backend": "sentence-transformers", "precision": "fp32", "quantize": quantize,
                          "max_seq_length": embedder.max_seq_length, "reason": f"{type(exc).__name__}: {exc}"}


def _finish(embedder, precision: str, folder: Path, inputs: Sequence[str], pad_id: int,
            passages: Sequence[str], fp32_agreement: float | None = None) -> tuple[OnnxEmbedder, dict]:
    """Check the fp32 graph in ``folder`` against the model, quantise it if asked; return it and its entry.

    Args:
        fp32_agreement: the fp32 graph's recorded agreement when it comes from an earlier build (not re-checked).
    """
    import torch

    fp32 = folder / MODEL_FILES["fp32"]
    probes = _probe_texts(passages)
    reference = embedder.encode(probes, batch_size=16)

    def load(path: Path, precision_: str) -> OnnxEmbedder:
        return OnnxEmbedder(path, folder / TOKENIZER_FILE, name=embedder.name, dimension=embedder.dimension,
                            max_seq_length=embedder.max_seq_length, input_names=inputs, pad_id=pad_id,
                            precision=precision_, threads=INDEXING_THREADS,
                            token_pooling=token_pooling_of(embedder.model))

    def agreement_of(candidate: OnnxEmbedder) -> float:
        return float(np.min(np.sum(candidate.encode(probes, batch_size=16) * reference, axis=1)))

    onnx = None
    agreement = fp32_agreement
    if agreement is None:
        onnx = load(fp32, "fp32")
        agreement = agreement_of(onnx)
        if agreement < MIN_COSINE["fp32"]:
            raise ValueError(f"the exported graph disagrees with sentence-transformers (min cosine {agreement:.6f})")
    if precision == "int8":
        int8 = folder / MODEL_FILES["int8"]
        _quantize_int8(fp32, int8)
        candidate = load(int8, "int8")
        int8_agreement = agreement_of(candidate)
        if int8_agreement >= MIN_COSINE["int8"]:
            fp32.unlink()
            onnx, agreement = candidate, int8_agreement
        else:
            logger.warning("The int8 encoder of %s agrees too little with the model (min cosine %.4f < %.2f); "
                           "keeping fp32.", embedder.name, int8_agreement, MIN_COSINE["int8"])
            int8.unlink()
    if onnx is None:
        onnx = load(fp32, "fp32")
    model_file = Path(onnx.model_file)
    entry = {
        "backend": "onnx",
        "precision": onnx.precision,
        "file": f"{MODEL_DIR}/{model_file.name}",
        "sha256": sha256_file(model_file),
        "tokenizer": f"{MODEL_DIR}/{TOKENIZER_FILE}",
        "tokenizer_sha256": sha256_file(folder / TOKENIZER_FILE),
        "max_seq_length": embedder.max_seq_length,
        "inputs": list(inputs),
        "pad_id": pad_id,
        "output": OUTPUT,
        "token_output": TOKENS,
        "token_pooling": onnx.token_pooling,
        "opset": OPSET,
        "export_version": EXPORT_VERSION,
        "exported_with": {"torch": torch.__version__.split("+")[0]},
        "agreement_min_cosine": round(agreement, 7),
    }
    return onnx, entry
