"""The sentence-transformers encoder on torch (CPU): the source of an index's ONNX export and its fallback.

torch and sentence-transformers are imported only when an encoder is built, never by importing this module.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Sequence

import numpy as np

from ..errors import ModelNotFound
from .models import canonical_model_name, resolve_model_path
from .vectors import Group, normalize_rows, pool_groups
from .vocabulary import token_counts_add_up, whole_words

logger = logging.getLogger(__name__)

# Plain attention, asked for through transformers' public ``attn_implementation`` argument: its graph is the one
# onnxruntime's optimizer fuses when the model is exported (docs/decisions/onnx-export-and-fusion.md).
EAGER = {"attn_implementation": "eager"}


class SentenceTransformerEmbedder:
    """Embeds with sentence-transformers on torch (CPU), offline; same interface as ``OnnxEmbedder``."""

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
            try:
                self.model = SentenceTransformer(path, device="cpu", model_kwargs=EAGER)
            except (ValueError, TypeError, NotImplementedError) as exc:  # a model without plain attention
                logger.info("loading %s with its default attention: %s", model, exc)
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
        self.token_pooling = token_pooling_of(self.model)

    def encode_pooled(self, texts: Sequence[str], groups: Sequence[Sequence[Group]], batch_size: int = 32,
                      progress: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
        """Embed ``texts`` and, from the same forward pass, pool each text's ``groups`` (``vectors.pool_groups``).

        Only for a mean-pooling model, whose text vector is itself the mean of its token vectors: a group's
        vector is then that part of the text read in the context of the whole text ("late chunking").
        """
        if self.token_pooling != "mean":
            raise ValueError(f"{self.name} does not mean-pool its token vectors")
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32), []
        outputs = self.model.encode(texts, batch_size=batch_size, show_progress_bar=progress, output_value=None,
                                    convert_to_numpy=False)
        vectors, pooled = [], []
        for text, out, ranges in zip(texts, outputs, groups):
            enc = self._tokenizer(text, truncation=True, max_length=self.max_seq_length, verbose=False,
                                  return_offsets_mapping=True, return_special_tokens_mask=True)
            tokens = out["token_embeddings"].float().cpu().numpy()
            if "attention_mask" in out:  # rows come padded to their batch's longest text
                tokens = tokens[out["attention_mask"].cpu().numpy().astype(bool)]
            if len(tokens) != len(enc["input_ids"]):
                raise ValueError("token vectors and tokenizer offsets disagree")
            vectors.append(out["sentence_embedding"].float().cpu().numpy())
            pooled.append(pool_groups(tokens, np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2),
                                      np.asarray(enc["special_tokens_mask"], dtype=bool), ranges))
        return normalize_rows(np.stack(vectors)), pooled

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

    @functools.cached_property
    def counts_add_up(self) -> bool:
        """Whether ``count_tokens`` of texts joined by whitespace is the sum of their counts."""
        backend = getattr(self._tokenizer, "backend_tokenizer", None)  # a fast (Rust) tokenizer only
        return backend is not None and token_counts_add_up(backend.to_str())

    @functools.cached_property
    def known_words(self) -> frozenset[str]:
        """The words the model's tokenizer holds whole (``whole_words``)."""
        return whole_words(self._tokenizer.get_vocab())


def token_pooling_of(model) -> str | None:
    """Return "mean" when a sentence-transformers model is its transformer, mean pooling and at most a
    normalisation (so the mean of any tokens' vectors lives in the model's own vector space), else None."""
    try:
        modules = list(model)
    except TypeError:
        return None
    kinds = [type(m).__name__ for m in modules]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        return None
    pooling = modules[1]
    mode = getattr(pooling, "pooling_mode", None)  # sentence-transformers 5.x; older ones name the method
    if mode is None and hasattr(pooling, "get_pooling_mode_str"):
        mode = pooling.get_pooling_mode_str()
    return "mean" if mode == "mean" else None
