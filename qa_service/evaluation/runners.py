"""Running a dataset's questions through a backend in one mode: ranked units, judgments, timings, verdicts.

Questions are searched in batches (embedded together) where the backend allows; latency is the
single-question path a user sees, timed on an evenly spaced sample in-process and on every question over HTTP.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .backends import Backend
from .datasets import Dataset, Question
from .relevance import normalize_text, passage_docno, passage_is_relevant

DEFAULT_DEPTH = 100  # passages per question (question files; the cap for BEIR corpora)
MIN_BEIR_DEPTH = 30
BEIR_DEPTH_PER_PASSAGES_PER_DOC = 20  # BEIR: 20 x (passages per document), for >= 10 distinct documents
HTTP_DEPTH = 50  # the service caps k (Settings.max_k)


@dataclass
class ModeRun:
    """What one mode returned: ranked unit ids per question, plus timings and the no-answer signal."""

    mode: str
    ranked: dict[str, list[str]] = field(default_factory=dict)
    judged: dict[str, dict[str, int]] = field(default_factory=dict)  # questions format: retrieved passage -> 0/1
    latencies_ms: list[float] = field(default_factory=list)
    answerable: dict[str, bool] = field(default_factory=dict)
    seconds: float = 0.0
    few_docs: int = 0  # BEIR questions with fewer than 10 distinct documents retrieved
    # Questions whose first result is relevant: does its answer sentence (the one the form highlights) hold a
    # gold answer string? Scores the answer step apart from retrieval.
    answer_in_sentence: dict[str, bool] = field(default_factory=dict)


def _evenly_spaced(n: int, m: int) -> list[int]:
    if m >= n:
        return list(range(n))
    if m <= 0:
        return []
    return sorted({int(i) for i in np.linspace(0, n - 1, m)})


def _answer_holds(hit: dict, answers: tuple[str, ...]) -> bool:
    answer = hit.get("answer")
    text = answer.get("text") if isinstance(answer, dict) else None
    folded = normalize_text(text) if text else ""
    return bool(folded) and any(a and a in folded for a in answers)


def _record(dataset: Dataset, run: ModeRun, question: Question, hits: list[dict],
            normalized: dict[str, tuple[str, ...]]) -> None:
    answers = normalized[question.id]
    if dataset.format == "beir":
        if hits and answers and dataset.qrels.get(question.id, {}).get(str(hits[0]["citation"]["article_id"]), 0) > 0:
            run.answer_in_sentence[question.id] = _answer_holds(hits[0], answers)
        docs: list[str] = []
        seen: set[str] = set()
        for hit in hits:  # best first, so a document's first passage is its best one (max-passage)
            doc = str(hit["citation"]["article_id"])
            if doc not in seen:
                seen.add(doc)
                docs.append(doc)
        run.ranked[question.id] = docs
        run.few_docs += len(docs) < 10
        return
    ranked, judged = [], {}
    for hit in hits:
        c = hit["citation"]
        docno = passage_docno(str(c["article_id"]), int(c["start"]), int(c["end"]))
        if docno in judged:
            continue
        ranked.append(docno)
        judged[docno] = int(passage_is_relevant(question, str(c["article_id"]), str(c.get("source") or ""),
                                                hit.get("text") or "", answers))
    if ranked and judged[ranked[0]]:
        run.answer_in_sentence[question.id] = _answer_holds(hits[0], answers)
    run.ranked[question.id] = ranked
    run.judged[question.id] = judged


def run_mode(dataset: Dataset, backend: Backend, mode: str | None, depth: int = DEFAULT_DEPTH,
             batch_size: int = 128, latency_sample: int = 200, progress: bool = False) -> ModeRun:
    """Run every question of ``dataset`` through ``backend`` in ``mode`` (None: the backend's default)."""
    from tqdm.auto import tqdm

    run = ModeRun(mode or backend.default_mode())
    questions = dataset.questions
    normalized = {q.id: tuple(normalize_text(a) for a in q.answers) for q in questions}
    started = time.perf_counter()
    bar = tqdm(total=len(questions), desc=f"eval {dataset.name} [{run.mode}]", unit="q", disable=not progress,
               leave=False)
    try:
        if backend.batched:
            # Keep each batch's passage lookup well under SQLite's bound-parameter limit.
            size = max(1, min(batch_size, 20000 // max(depth, 1)))
            for i in range(0, len(questions), size):
                batch = questions[i:i + size]
                for question, hits in zip(batch, backend.search_many([q.text for q in batch], depth, mode)):
                    _record(dataset, run, question, hits, normalized)
                bar.update(len(batch))
            run.seconds = time.perf_counter() - started
            _time_single_questions(dataset, backend, run, mode, depth, latency_sample)
        else:
            for question in questions:
                t0 = time.perf_counter()
                result = backend.ask(question.text, depth, mode)
                run.latencies_ms.append((time.perf_counter() - t0) * 1000)
                if isinstance(result.get("answerable"), bool):
                    run.answerable[question.id] = result["answerable"]
                if mode is None and isinstance(result.get("mode"), str):
                    run.mode = result["mode"]  # the service says which mode it used by default
                _record(dataset, run, question, result["results"], normalized)
                bar.update(1)
            run.seconds = time.perf_counter() - started
    finally:
        bar.close()
    return run


def _time_single_questions(dataset: Dataset, backend: Backend, run: ModeRun, mode: str | None, depth: int,
                           latency_sample: int) -> None:
    """Time ``ask`` on a sample; on question files also collect the no-answer signal for all, if there is one."""
    questions = dataset.questions
    sample = _evenly_spaced(len(questions), latency_sample)
    for i in sample:
        t0 = time.perf_counter()
        result = backend.ask(questions[i].text, depth, mode)
        run.latencies_ms.append((time.perf_counter() - t0) * 1000)
        if isinstance(result.get("answerable"), bool):
            run.answerable[questions[i].id] = result["answerable"]
    if run.answerable and dataset.format == "questions":
        done = set(sample)
        for i, question in enumerate(questions):
            if i not in done:
                result = backend.ask(question.text, depth, mode)
                if isinstance(result.get("answerable"), bool):
                    run.answerable[question.id] = result["answerable"]

