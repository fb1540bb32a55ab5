"""The off-corpus split used to measure the no-answer signal, on a tiny hand-made BEIR folder."""

from __future__ import annotations

import json

from qa_service.abstention import article_key, off_corpus_split
from qa_service.config import Settings

from .fakes import FakeEmbedder

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
