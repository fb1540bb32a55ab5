"""Measure the no-answer signal on an off-corpus split of a BEIR set (SQuAD dev, say).

Half of the corpus's articles are indexed; questions about that half must be judged answerable,
questions about the other half must be flagged. Articles, not paragraphs, are split (a SQuAD doc id
is ``<article>-<paragraph>``), so an off-corpus question cannot be answered by a sibling paragraph.
The figures: AUC of ``answer_confidence`` (threshold-free), the share of off-corpus questions
flagged, and the share of answerable questions wrongly refused.
"""

from __future__ import annotations

import hashlib
import logging
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


def off_corpus_split(folder: Path | str, settings: Settings, cache_root: Path | str, n_questions: int = 2000,
                     embedder=None, progress: Callable | None = None) -> AbstentionReport:
    """Index every other article of ``folder`` and ask ``n_questions`` questions spread over both halves."""
    from sklearn.metrics import roc_auc_score

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
    labels, confidence, verdicts = [], [], []
    for i, q in enumerate(sample):
        gold = {article_key(d) for d, rel in dataset.qrels[q.id].items() if rel > 0}
        labels.append(bool(gold & indexed_keys))
        result = searcher.ask(q.text, k=5)
        confidence.append(float(result["answer_confidence"]))
        verdicts.append(bool(result["answerable"]))
        if progress:
            progress(i + 1, len(sample))
    n_ans = sum(labels)
    n_unans = len(labels) - n_ans
    auc = float(roc_auc_score(labels, confidence)) if 0 < n_ans < len(labels) else None
    flagged = sum(1 for y, v in zip(labels, verdicts) if not y and not v) / max(1, n_unans)
    refused = sum(1 for y, v in zip(labels, verdicts) if y and not v) / max(1, n_ans)
    return AbstentionReport(folder.name, len(indexed_keys), len(keys) - len(indexed_keys), n_ans, n_unans,
                            auc, flagged, refused)
