"""Turn text into L2-normalised float32 vectors.

Two encoders share one interface (``Embedder``): ``torch_encoder.SentenceTransformerEmbedder`` (index time, the
source of the export) and ``onnx_encoder.OnnxEmbedder`` (what serving uses: the index's own ONNX export,
without torch). ``export`` makes and checks that export, ``export_cache`` reuses earlier ones, ``ray`` embeds
a build on a Ray actor pool. Importing this package imports neither torch nor onnxruntime.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from .models import DEFAULT_MODEL, canonical_model_name, is_default_model, resolve_model_path
from .vectors import Group, normalize_rows, pool_groups
from .vocabulary import token_counts_add_up, whole_words

__all__ = ["DEFAULT_MODEL", "Embedder", "Group", "canonical_model_name", "is_default_model", "load_embedder",
           "load_index_encoder", "normalize_rows", "pool_groups", "resolve_model_path", "token_counts_add_up",
           "whole_words"]


class Embedder(Protocol):
    """What the index builder and the searcher need from an embedding model."""

    name: str
    dimension: int
    max_seq_length: int

    def encode(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Return float32 ``[len(texts), dimension]`` rows of unit length."""

    def count_tokens(self, text: str) -> int:
        """Return the number of model tokens in ``text``, without special tokens."""


def load_embedder(model: str) -> Embedder:
    """Build the sentence-transformers embedder for ``model`` (a name or a folder)."""
    from .torch_encoder import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder(model)


def load_index_encoder(manifest: dict, pin_threads: bool = False) -> Embedder | None:
    """Return the index's own torch-free question encoder (its ONNX export), or None when it has none.

    ``pin_threads``: the opt-in ``encoder_cores`` tuning keeps the encoder's threads on separate CPUs
    (``qa_service.tuning.encoder_cores``); off, the encoder runs as ``onnx_encoder.SERVING_THREADS`` describes.
    """
    from .onnx_encoder import OnnxEmbedder, onnx_backend_is_used

    if not onnx_backend_is_used(manifest):
        return None
    if not pin_threads:
        return OnnxEmbedder.from_manifest(manifest)
    from ..tuning.encoder_cores import pin_threads as pin

    encoder = OnnxEmbedder.from_manifest(manifest, open_session=False)
    pin(encoder)  # opens the session with pinned threads, or leaves it to open() when it cannot
    encoder.open()
    return encoder
