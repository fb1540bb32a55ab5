"""The off-corpus split used to measure the no-answer signal, on a tiny hand-made BEIR folder."""

from __future__ import annotations

import json

from qa_service.abstention import article_key, off_corpus_split
from qa_service.config import Settings

from .support.fakes import FakeEmbedder

TOPICS = {
    "Apollo": "The Apollo program landed astronauts on the Moon in 1969. Neil Armstrong walked first.",
    "Basalt": "Basalt is a volcanic rock formed from rapidly cooled lava. It is rich in iron and magnesium.",
    "Cricket": "Cricket is played with a bat and ball between two teams of eleven players on a field.",
    "Danube": "The Danube river flows through ten countries and empties into the Black Sea.",
}


def _beir(folder):
    folder.mkdir()
    (folder / "qrels").mkdir()
    corpus, queries, qrels = [], [], ["query-id\tcorpus-id\tscore"]
    for t, text in TOPICS.items():
        for p, sentence in enumerate(text.split(". ")):
            corpus.append({"_id": f"{t}-{p}", "title": t, "text": sentence})
        queries.append({"_id": f"q-{t}", "text": f"What is said about {t.lower()}?"})
        qrels.append(f"q-{t}\t{t}-0\t1")
    (folder / "corpus.jsonl").write_text("\n".join(json.dumps(c) for c in corpus))
    (folder / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in queries))
    (folder / "qrels" / "test.tsv").write_text("\n".join(qrels))
    return folder


def test_article_key():
    assert article_key("Super_Bowl_50-12") == "Super_Bowl_50"
    assert article_key("12345") == "12345"
    assert article_key("a-b") == "a-b"


def test_off_corpus_split_reports(tmp_path):
    folder = _beir(tmp_path / "tiny")
    settings = Settings(model=FakeEmbedder.name)
    report = off_corpus_split(folder, settings, tmp_path / "cache", n_questions=10, embedder=FakeEmbedder())
    assert (report.indexed_articles, report.held_out_articles) == (2, 2)
    assert (report.answerable, report.unanswerable) == (2, 2)
    assert report.auc is None or 0.0 <= report.auc <= 1.0
    assert 0.0 <= report.unanswerable_flagged <= 1.0 and 0.0 <= report.answerable_refused_rate <= 1.0
    again = off_corpus_split(folder, settings, tmp_path / "cache", n_questions=10, embedder=FakeEmbedder())
    assert again == report  # cached index, same questions, same figures


def test_verdict_model_fit_separates_and_caps_refusals():
    """fit_verdict_model: weights that rank answerable evidence higher, and a threshold refusing <= 1% of it."""
    import numpy as np

    from qa_service.abstention import Evidence, fit_verdict_model

    rng = np.random.default_rng(0)
    rows = []
    for answerable in [True] * 400 + [False] * 400:
        mean = (0.7, 0.6) if answerable else (0.3, 0.35)
        cov, cos = rng.normal(mean, 0.12)
        rows.append(Evidence(float(cov), float(cos), True, answerable, 0.0, False))
    model = fit_verdict_model(rows, max_refused=0.01)
    assert model.coverage_w > 0 and model.cosine_w > 0 and model.bias < 0
    z = np.array([model.coverage_w * r.coverage + model.cosine_w * r.answer_cosine + model.bias for r in rows])
    p = 1 / (1 + np.exp(-z))
    labels = np.array([r.answerable for r in rows])
    refused = float(np.mean(p[labels] < model.threshold))
    flagged = float(np.mean(p[~labels] < model.threshold))
    assert refused <= 0.01 and flagged > 0.5
    # one notch (0.01) higher would refuse more than allowed: the threshold is as strict as the cap lets it be
    assert float(np.mean(p[labels] < model.threshold + 0.01)) > 0.01 or model.threshold >= 0.99


def test_split_evidence_matches_the_report(tmp_path):
    from qa_service.abstention import split_evidence

    folder = _beir(tmp_path / "tiny")
    settings = Settings(model=FakeEmbedder.name)
    rows, n_indexed, n_held_out = split_evidence(folder, settings, tmp_path / "cache", 10, FakeEmbedder())
    report = off_corpus_split(folder, settings, tmp_path / "cache", n_questions=10, embedder=FakeEmbedder())
    assert (n_indexed, n_held_out) == (2, 2) and len(rows) == 4
    assert sum(r.answerable for r in rows) == report.answerable
    assert all(0.0 <= r.coverage <= 1.0 and -1.0 <= r.answer_cosine <= 1.0 for r in rows)
