"""Measure the no-answer signal on an off-corpus split of a BEIR set (SQuAD dev, say).

Half of the corpus's articles are indexed; questions about that half must be judged answerable,
questions about the other half must be flagged. Articles, not paragraphs, are split (a SQuAD doc id
is ``<article>-<paragraph>``), so an off-corpus question cannot be answered by a sibling paragraph.
The figures: AUC of ``answer_confidence`` (threshold-free), the share of off-corpus questions
flagged, and the share of answerable questions wrongly refused. ``refit_on_split`` gives the constants
``answer.answerability`` holds (docs/decisions/no-answer-verdict.md).
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import Settings
from .evaluation import beir_articles, load_beir

logger = logging.getLogger(__name__)


def article_key(doc_id: str) -> str:
    """Return the article a BEIR document belongs to (``<article>-<paragraph>`` → ``<article>``)."""
    head, sep, tail = doc_id.rpartition("-")
    return head if sep and tail.isdigit() else doc_id


@dataclass
class AbstentionReport:
    dataset: str
    indexed_articles: int
    held_out_articles: int
    answerable: int
    unanswerable: int
    auc: float | None
    unanswerable_flagged: float
    answerable_refused_rate: float

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class Evidence:
    """What the verdict saw for one question of the split, and whether its gold article was indexed."""

    coverage: float
    answer_cosine: float
    answer_type: bool
    answerable: bool  # the label: the question's article is in the indexed half
    confidence: float  # the shipped model's answer_confidence
    verdict: bool  # the shipped model's answerable


def split_evidence(folder: Path | str, settings: Settings, cache_root: Path | str, n_questions: int = 2000,
                   embedder=None, progress: Callable | None = None) -> tuple[list[Evidence], int, int]:
    """Index every other article of ``folder``; return the evidence for ``n_questions`` questions spread over
    both halves, and the numbers of indexed and held-out articles."""
    from .answer import answerability
    from .retrieval import Searcher
    from .store import build_index, index_status

    folder = Path(folder)
    dataset = load_beir(folder)
    articles = beir_articles(folder)
    keys = sorted({article_key(a.id) for a in articles})
    indexed_keys = set(keys[::2])
    subset = [a for a in articles if article_key(a.id) in indexed_keys]
    digest = hashlib.sha256("\n".join(a.content_hash for a in subset).encode()).hexdigest()[:12]
    split_settings = settings.with_(index_dir=Path(cache_root) / f"{folder.name}-offcorpus-{digest}")
    fresh, reason = index_status(split_settings, subset)
    if not fresh:
        if embedder is None:
            from .embedding import load_embedder

            embedder = load_embedder(settings.model)
        logger.info("indexing half of %s (%s)", folder.name, reason)
        build_index(subset, embedder, split_settings)
    searcher = Searcher(split_settings, embedder=embedder) if embedder is not None else Searcher(split_settings)

    questions = [q for q in dataset.questions if dataset.qrels.get(q.id)]
    step = max(1, len(questions) // n_questions)
    sample = questions[::step][:n_questions]
    rows = []
    for i, q in enumerate(sample):
        gold = {article_key(d) for d, rel in dataset.qrels[q.id].items() if rel > 0}
        with searcher.backend.snapshot():  # what Searcher.ask does, keeping the verdict's features
            verdict = answerability(searcher, q.text, searcher.search(q.text, k=5))
        f = verdict.features
        rows.append(Evidence(float(f.get("coverage", 0.0)), float(f.get("answer_cosine", 0.0)),
                             bool(f.get("answer_type", True)), bool(gold & indexed_keys), verdict.score,
                             verdict.answerable))
        if progress:
            progress(i + 1, len(sample))
    return rows, len(indexed_keys), len(keys) - len(indexed_keys)


def off_corpus_split(folder: Path | str, settings: Settings, cache_root: Path | str, n_questions: int = 2000,
                     embedder=None, progress: Callable | None = None) -> AbstentionReport:
    """Index every other article of ``folder`` and ask ``n_questions`` questions spread over both halves."""
    from sklearn.metrics import roc_auc_score

    rows, n_indexed, n_held_out = split_evidence(folder, settings, cache_root, n_questions, embedder, progress)
    labels = [r.answerable for r in rows]
    n_ans = sum(labels)
    n_unans = len(labels) - n_ans
    auc = float(roc_auc_score(labels, [r.confidence for r in rows])) if 0 < n_ans < len(labels) else None
    flagged = sum(1 for r in rows if not r.answerable and not r.verdict) / max(1, n_unans)
    refused = sum(1 for r in rows if r.answerable and not r.verdict) / max(1, n_ans)
    return AbstentionReport(Path(folder).name, n_indexed, n_held_out, n_ans, n_unans, auc, flagged, refused)


@dataclass
class VerdictModel:
    """The constants of ``answer.answerability``: z = coverage_w x coverage + cosine_w x cosine + bias."""

    coverage_w: float
    cosine_w: float
    bias: float
    threshold: float

    def to_dict(self) -> dict:
        return {k: round(v, 2) for k, v in self.__dict__.items()}


def fit_verdict_model(rows: list[Evidence], max_refused: float = 0.01) -> VerdictModel:
    """Fit the verdict's logistic model on split evidence (scikit-learn's L2 default), and its threshold: the
    highest (to 0.01) that refuses at most ``max_refused`` of the answerable questions on the model alone
    (the answer-type check refuses some more on its own). Round the weights as ``answer.py`` holds them."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    x = np.array([[r.coverage, r.answer_cosine] for r in rows])
    y = np.array([r.answerable for r in rows])
    if y.all() or not y.any():
        raise ValueError("the split needs both answerable and unanswerable questions")
    lr = LogisticRegression().fit(x, y)
    (coverage_w, cosine_w), bias = (round(float(w), 2) for w in lr.coef_[0]), round(float(lr.intercept_[0]), 2)
    p = 1.0 / (1.0 + np.exp(-(x @ np.array([coverage_w, cosine_w]) + bias)))
    answerable = np.sort(p[y])
    # the highest threshold t with share(p < t) <= max_refused: the (k+1)-th lowest answerable probability
    k = int(np.floor(max_refused * len(answerable)))
    threshold = math.floor(float(answerable[min(k, len(answerable) - 1)]) * 100) / 100
    return VerdictModel(coverage_w, cosine_w, bias, threshold)


def refit_on_split(folder: Path | str, settings: Settings, cache_root: Path | str,
                   n_questions: int = 2000) -> VerdictModel:
    """Collect the split's evidence and fit the verdict model: what ``answer.py``'s constants come from."""
    rows, _, _ = split_evidence(folder, settings, cache_root, n_questions)
    return fit_verdict_model(rows)
