"""The torch-free serving encoder: an index's ONNX export on onnxruntime, tokenised with ``tokenizers``.

This module imports only numpy, onnxruntime and tokenizers (the latter two when an encoder is built); the
torch-bound export that writes what it reads lives in ``export`` (docs/decisions/onnx-export-and-fusion.md).
It also answers the manifest's questions about an index's encoder (precision, backend, staleness).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..errors import IndexCorrupt, ModelNotFound
from .vectors import Group, normalize_rows, pool_groups
from .vocabulary import token_counts_add_up, whole_words

logger = logging.getLogger(__name__)

# Bump when the exported graph changes, so older exports are not reused (3: token vectors as a second output).
EXPORT_VERSION = 3
MODEL_DIR = "model"
TOKENIZER_FILE = "tokenizer.json"
MODEL_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
QUANTIZE_CHOICES = ("none", "int8")
OUTPUT = "sentence_embedding"
TOKENS = "token_embeddings"  # [batch, sequence, dimension], before pooling: what sentence vectors are pooled from
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# A serving encoder runs each question on two onnxruntime intra-op threads (one on a one-CPU machine), unpinned,
# and its pool threads sleep between operators and between runs: faster alone than one thread, and never busy
# once a question is answered. Pinning and core sharing are the opt-in ``encoder_cores`` tuning
# (docs/decisions/encoder-threads-and-core-sharing.md).
SERVING_THREADS = max(1, min(2, os.cpu_count() or 1))
INDEXING_THREADS = 2
SESSION_CONFIG = {"session.intra_op.allow_spinning": "0"}  # onnxruntime's documented session config keys

# How a session is run: ``runner(session, output_names, feeds)``; None runs ``session.run`` itself.
Runner = Callable[[object, list, dict], list]


def resolve_quantize(quantize: str, manifest: dict | None) -> str:
    """Return the ``--quantize`` choice a build means: "auto" (the default) keeps the precision of the index
    ``manifest`` describes, or fp32 ("none") when there is none; "none" and "int8" are kept as chosen.

    So an index built with ``--quantize int8`` stays int8 when a later build refreshes it without repeating the
    choice (docs/decisions/int8-precision.md).
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


class OnnxEmbedder:
    """Embeds with an exported ONNX graph on onnxruntime; tokenises with the model's ``tokenizer.json``.

    Same interface as ``SentenceTransformerEmbedder``; never imports torch. Inputs are truncated to
    ``max_seq_length`` tokens and a batch is padded only to its longest member. Safe to call from several threads.
    """

    backend = "onnx"

    def __init__(self, model_file: str | Path, tokenizer_file: str | Path, *, name: str, dimension: int,
                 max_seq_length: int, input_names: Sequence[str] = INPUTS, pad_id: int = 0,
                 precision: str = "fp32", threads: int = SERVING_THREADS, token_pooling: str | None = None,
                 open_session: bool = True):
        """``open_session=False`` leaves creating the onnxruntime session to ``open()`` (or the first encode), so
        a build can cut its articles with the tokenizer alone first. ``token_pooling`` is provisional until then."""
        try:
            import onnxruntime  # noqa: F401  (checked here, used in new_session)
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
        self.tokenizer_file = str(tokenizer_file)
        self._tokenizer = Tokenizer.from_file(self.tokenizer_file)
        self._tokenizer.no_padding()  # padded per batch, in numpy (also keeps the tokenizer read-only: thread-safe)
        self._tokenizer.enable_truncation(self.max_seq_length)
        self._counter = None
        self.threads = max(1, int(threads))
        self._session = None
        self.runner: Runner | None = None  # set only by the opt-in tuning (qa_service.tuning.encoder_cores)
        self._requested_pooling = token_pooling
        self.token_pooling = token_pooling
        self._index_dir: Path | None = None  # set by ``from_manifest``: open() then reports a damaged encoder as such
        if open_session:
            self.open()

    def new_session(self, threads: int, config: Mapping[str, str] = SESSION_CONFIG):
        """Return a new onnxruntime session of this graph on ``threads`` intra-op threads, with ``config`` as its
        session config entries."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        for key, value in config.items():
            options.add_session_config_entry(key, value)
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        return ort.InferenceSession(self.model_file, options, providers=["CPUExecutionProvider"])

    def open(self, session=None) -> None:
        """Create the onnxruntime session (or take ``session``, made by ``new_session``), if not yet done, and check
        the graph's inputs and outputs."""
        if self._session is not None:
            return
        try:
            candidate = session if session is not None else self.new_session(self.threads)
            missing = set(self.input_names) - {i.name for i in candidate.get_inputs()}
            if missing:
                raise ValueError(f"the ONNX model has no input(s) {sorted(missing)}")
        except Exception as exc:
            if self._index_dir is None:
                raise
            raise _unreadable(self._index_dir, exc) from exc
        self._session = candidate
        # "mean" when the graph also gives token vectors and the model mean-pools them (``encode_pooled``).
        has_tokens = TOKENS in {o.name for o in candidate.get_outputs()}
        self.token_pooling = self._requested_pooling if has_tokens else None

    @property
    def is_open(self) -> bool:
        """Whether the onnxruntime session exists yet (``open_session=False`` defers it)."""
        return self._session is not None

    @property
    def session(self):
        """The onnxruntime session every run uses unless a tuning ``runner`` picks another (opened on first use)."""
        if self._session is None:
            self.open()
        return self._session

    @classmethod
    def from_manifest(cls, manifest: dict, threads: int = SERVING_THREADS, open_session: bool = True) -> "OnnxEmbedder":
        """Load the encoder recorded in an index manifest (as returned by ``store.read_manifest``)."""
        entry = manifest["encoder"]
        build = Path(manifest["_build_dir"])
        try:
            embedder = cls(build / entry["file"], build / entry["tokenizer"], name=manifest["model"],
                           dimension=manifest["dimension"], max_seq_length=entry["max_seq_length"],
                           input_names=entry.get("inputs", INPUTS), pad_id=entry.get("pad_id", 0),
                           precision=entry.get("precision", "fp32"), threads=threads,
                           token_pooling=entry.get("token_pooling"), open_session=False)
        except Exception as exc:  # a missing tokenizer file, a bad entry
            raise _unreadable(build.parent.parent, exc) from exc
        embedder._index_dir = build.parent.parent
        if open_session:
            embedder.open()  # a missing model file, a damaged graph (onnxruntime's own error types): IndexCorrupt
        return embedder

    def warm_up(self, session) -> None:
        """Run ``session`` once on a short text, so its lazy set-up happens before any request."""
        self._run([self._tokenizer.encode("warm up")], session=session)

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
        feeds = {name: feeds[name] for name in self.input_names}
        if session is not None:
            result = session.run(list(outputs), feeds)
        elif self.runner is not None:
            result = self.runner(self.session, list(outputs), feeds)
        else:
            result = self.session.run(list(outputs), feeds)
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
        rows (``vectors.pool_groups``: NaN where a group holds no token, e.g. past the truncation). Needs a
        graph with token vectors of a mean-pooling model (``token_pooling == "mean"``).
        """
        if self.token_pooling != "mean":
            raise ValueError("this ONNX encoder cannot pool token vectors "
                             "(an older export, or not a mean-pooling model)")
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
        """The words the model's tokenizer holds whole (``vocabulary.whole_words``)."""
        return whole_words(self._tokenizer.get_vocab())

    @functools.cached_property
    def counts_add_up(self) -> bool:
        """Whether ``count_tokens`` of texts joined by whitespace is the sum of their counts."""
        return token_counts_add_up(self._tokenizer.to_str())

    def count_tokens(self, text: str) -> int:
        if self._counter is None:
            from tokenizers import Tokenizer

            counter = Tokenizer.from_file(self.tokenizer_file)
            counter.no_padding()
            counter.no_truncation()
            self._counter = counter
        return len(self._counter.encode(text, add_special_tokens=False).ids)


def _unreadable(index_dir: Path, exc: Exception) -> IndexCorrupt:
    return IndexCorrupt(f"The index in {index_dir} has an unreadable ONNX encoder ({type(exc).__name__}). Rebuild it "
                        f"with: qa-service index SEEDS_DIR --index-dir {index_dir} --force")
