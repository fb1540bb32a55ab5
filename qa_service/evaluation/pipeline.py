"""``evaluate``: run a dataset once per mode on the same questions, judge the passages, score each mode."""

from __future__ import annotations

import math
from typing import Sequence

from .backends import Backend
from .datasets import Dataset
from .errors import EvaluationError, UnknownMode
from .metrics import build_qrels, summarize
from .runners import BEIR_DEPTH_PER_PASSAGES_PER_DOC, DEFAULT_DEPTH, HTTP_DEPTH, MIN_BEIR_DEPTH, run_mode


def default_depth(dataset: Dataset, backend: Backend) -> int:
    """Passages to retrieve per question when ``--depth`` is not given.

    BEIR runs take 20 times the corpus's passages per document (30..100), enough for 10 distinct documents
    after max-passage without paying for 100 passages on short documents; see docs/decisions/evaluation-method.md.
    """
    if not backend.batched:
        return HTTP_DEPTH
    per_doc = backend.passages_per_document() if hasattr(backend, "passages_per_document") else None
    if dataset.format != "beir" or not per_doc:
        return DEFAULT_DEPTH
    return int(min(DEFAULT_DEPTH, max(MIN_BEIR_DEPTH, math.ceil(BEIR_DEPTH_PER_PASSAGES_PER_DOC * per_doc))))


def evaluate(dataset: Dataset, backend: Backend, modes: Sequence[str | None] = (None,), depth: int | None = None,
             batch_size: int = 128, latency_sample: int = 200, progress: bool = False) -> list[dict]:
    """Run ``dataset`` once per mode on the same questions; return one summary per mode."""
    if depth is None:
        depth = default_depth(dataset, backend)
    if depth < 1:
        raise EvaluationError("The retrieval depth must be at least 1.")
    modes = list(modes) or [None]
    labels = [m or backend.default_mode() for m in modes]
    if len(set(labels)) != len(labels):
        raise UnknownMode(f"A mode is listed twice: {', '.join(labels)}.")
    backend.check_modes(modes)
    runs = [run_mode(dataset, backend, m, depth, batch_size, latency_sample, progress) for m in modes]
    passages = (backend.all_passages() if dataset.format == "questions" and getattr(backend, "raw_passages", False)
                else None)
    qrels, judgments = build_qrels(dataset, runs, passages)
    return [summarize(dataset, run, qrels, judgments, backend.name, depth) for run in runs]
