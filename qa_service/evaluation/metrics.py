"""Scoring: qrels for each dataset format, per-query values from ir-measures, and the summary of one mode.

Every formula comes from ir-measures (pytrec_eval backend); this module builds qrels and runs and averages
per-query values over every question, a question with no results scoring 0. See
docs/decisions/evaluation-method.md.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from .datasets import Dataset
from .errors import import_extra
from .relevance import normalize_text, passage_docno, passage_is_relevant
from .runners import ModeRun

CUTOFFS = (1, 3, 5, 10)
CURVE_CUTOFFS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 20, 30, 50)
METRIC_NAMES = tuple(f"recall@{k}" for k in CUTOFFS) + ("mrr@10", "ndcg@10")


def _measures(dataset_format: str, cutoffs: Sequence[int] = CUTOFFS) -> dict[str, object]:
    ir_measures = import_extra("ir_measures", "ir-measures", "Scoring")

    hit_measure = ir_measures.Success if dataset_format == "questions" else ir_measures.R
    out: dict[str, object] = {f"recall@{k}": hit_measure @ k for k in cutoffs}
    out["mrr@10"] = ir_measures.RR @ 10
    out["ndcg@10"] = ir_measures.nDCG @ 10
    return out


def build_qrels(dataset: Dataset, runs: Sequence[ModeRun],
                passages: Sequence[tuple[str, str, int, int, str]] | None = None
                ) -> tuple[dict[str, dict[str, int]], str]:
    """Return ``(qrels, judgments)``: BEIR's own, or passage judgments for a question file.

    With ``passages`` (every passage of the index) the judgments are exact; without, the passages
    retrieved by any of ``runs`` are judged (pooled).
    """
    if dataset.format == "beir":
        return dataset.qrels or {}, "qrels"
    qrels: dict[str, dict[str, int]] = {}
    if passages is not None:
        by_source: dict[str, list[tuple[str, str, int, int, str]]] = {}
        for row in passages:
            by_source.setdefault(row[0], []).append(row)
            by_source.setdefault(row[1], []).append(row)
        for q in dataset.answerable():
            answers = tuple(normalize_text(a) for a in q.answers)
            rows = {r[:4]: r for s in q.sources for r in by_source.get(s, ())}.values()
            qrels[q.id] = {passage_docno(a, s, e): 1 for a, src, s, e, text in rows
                           if passage_is_relevant(q, a, src, text, answers)}
    # Returned units are judged on their own text too: the same as the index's passages when the
    # ranking is raw, and still right if a Searcher ever returns other spans.
    for run in runs:
        for qid, judged in run.judged.items():
            bucket = qrels.setdefault(qid, {})
            for docno, rel in judged.items():
                bucket[docno] = max(rel, bucket.get(docno, 0))
    return qrels, "exact" if passages is not None else "pooled"


def per_query_scores(qrels: dict[str, dict[str, int]], ranked: dict[str, list[str]],
                     measures: dict[str, object]) -> dict[str, dict[str, float]]:
    """Score each query with ir-measures; return ``{query id: {metric name: value}}`` (judged queries only)."""
    ir_measures = import_extra("ir_measures", "ir-measures", "Scoring")

    qrels_rows = [ir_measures.Qrel(qid, doc, int(rel)) for qid, docs in qrels.items() for doc, rel in docs.items()]
    # Rank-derived scores: pytrec_eval re-sorts by score (ties by doc id), which must not reorder our ranking.
    run_rows = [ir_measures.ScoredDoc(qid, doc, float(len(docs) - i))
                for qid, docs in ranked.items() if qid in qrels for i, doc in enumerate(docs)]
    names: dict[str, list[str]] = {}  # one measure may be asked for under several names
    for name, m in measures.items():
        names.setdefault(str(m), []).append(name)
    out: dict[str, dict[str, float]] = {}
    if not qrels_rows or not run_rows:
        return out
    unique = list({str(m): m for m in measures.values()}.values())
    for metric in ir_measures.iter_calc(unique, qrels_rows, run_rows):
        for name in names[str(metric.measure)]:
            out.setdefault(metric.query_id, {})[name] = float(metric.value)
    return out


def _mean(scores: dict[str, dict[str, float]], qids: Sequence[str], names: Iterable[str]) -> dict[str, float | None]:
    """Average over ``qids``; a query with no results (absent from ``scores``) counts as 0."""
    if not qids:
        return {name: None for name in names}
    return {name: float(np.mean([scores.get(q, {}).get(name, 0.0) for q in qids])) for name in names}


def _percentile(values: Sequence[float], p: float) -> float | None:
    return round(float(np.percentile(values, p)), 3) if len(values) else None


def summarize(dataset: Dataset, run: ModeRun, qrels: dict[str, dict[str, int]], judgments: str,
              backend_name: str, depth: int) -> dict:
    """Return the machine-readable summary of one mode (fractions in 0..1)."""
    measures = _measures(dataset.format)
    curve_cutoffs = [k for k in CURVE_CUTOFFS if k <= depth]
    curve_measures = {f"@{k}": m for k, m in zip(curve_cutoffs, _measures(dataset.format, curve_cutoffs).values())}
    scores = per_query_scores(qrels, run.ranked, {**measures, **curve_measures})
    judged = dataset.answerable()
    qids = [q.id for q in judged]
    summary: dict = {
        "dataset": dataset.name,
        "format": dataset.format,
        "mode": run.mode,
        "backend": backend_name,
        "n": len(dataset.questions),
        "n_answerable": len(judged),
        "depth": depth,
        "judgments": judgments,
        "metrics": _mean(scores, qids, measures),
        "recall_curve": {k.lstrip("@"): v for k, v in _mean(scores, qids, curve_measures).items()},
    }
    by_kind: dict[str, dict] = {}
    if dataset.format == "questions":
        for kind in sorted({q.kind for q in dataset.questions}):
            members = [q for q in dataset.questions if q.kind == kind]
            answerable = [q.id for q in members if q.answerable]
            by_kind[kind] = {**_mean(scores, answerable, measures), "n": len(members)}
        summary["no_relevant_passage"] = sorted(q for q in qids if not any(qrels.get(q, {}).values()))
    summary["by_kind"] = by_kind
    unanswerable = [q.id for q in dataset.questions if dataset.format == "questions" and not q.answerable]
    flagged = [run.answerable[q] is False for q in unanswerable if q in run.answerable]
    refused = [run.answerable[q] is False for q in qids if q in run.answerable]
    summary["abstention"] = {
        "unanswerable": len(unanswerable),
        "unanswerable_flagged": float(np.mean(flagged)) if flagged else None,
        "answerable_refused_rate": float(np.mean(refused)) if refused else None,
    }
    held = list(run.answer_in_sentence.values())
    summary["answer_sentence"] = {"n": len(held), "holds_answer": float(np.mean(held)) if held else None}
    summary["latency_ms"] = {"p50": _percentile(run.latencies_ms, 50), "p95": _percentile(run.latencies_ms, 95),
                             "n": len(run.latencies_ms)}
    summary["seconds"] = round(run.seconds, 3)
    summary["questions_per_s"] = round(len(dataset.questions) / run.seconds, 1) if run.seconds > 0 else None
    if dataset.format == "beir":
        summary["questions_under_10_docs"] = run.few_docs
    return summary
