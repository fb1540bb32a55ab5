"""Batch evaluation: question files, BEIR folders, metric plumbing on hand-made cases, modes, HTTP, CLI."""

from __future__ import annotations

import json
import math
import random
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from qa_service import evaluation as ev
from qa_service.cli import cli

from .support.paths import SEEDS, SHARED
from .support.fakes import FakeEmbedder

DEV = SHARED / "eval" / "dev.jsonl"
SCIFACT = SHARED / "benchmarks" / "scifact"
LOG2 = math.log2


# --------------------------------------------------------------------------- helpers

def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _beir_folder(root: Path, docs, queries, qrels) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _write_jsonl(root / "corpus.jsonl", docs)
    _write_jsonl(root / "queries.jsonl", queries)
    (root / "qrels").mkdir(exist_ok=True)
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels), encoding="utf-8")
    return root


def _hit(article_id, start, end, text, source=None, rank=1):
    return {"rank": rank, "score": 1.0 / rank, "text": text,
            "citation": {"article_id": article_id, "source": source or article_id, "title": None, "date": None,
                         "start": start, "end": end}}


class StubBackend:
    """Returns canned hits per question text; ``answerable`` flags when given."""

    batched = True
    name = "stub"
    raw_passages = True

    def __init__(self, results: dict, passages=None, flags: dict | None = None):
        self.results, self.passages, self.flags = results, passages, flags
        self.search_calls = []

    def default_mode(self):
        return "dense"

    def check_modes(self, modes):
        for m in modes:
            if m not in (None, "dense", "lexical"):
                raise ev.UnknownMode(f"Unknown retrieval mode {m!r}")

    def search_many(self, questions, k, mode):
        self.search_calls.append(len(questions))
        return [self.results[q][:k] for q in questions]

    def ask(self, question, k, mode):
        out = {"results": self.results[question][:k]}
        if self.flags is not None:
            out["answerable"] = self.flags[question]
        return out

    def all_passages(self):
        return self.passages


# --------------------------------------------------------------------------- reading inputs

def test_normalize_text_folds_quotes_whitespace_and_compatibility_forms():
    assert ev.normalize_text("Iran\u2019s  \n minister\u00a0said \u201cno\u201d") == 'Iran\'s minister said "no"'
    assert ev.normalize_text("\ufb01nal \u2013 1") == "final - 1"
    assert ev.normalize_text("Case") != ev.normalize_text("case")


def test_passage_is_relevant_needs_source_and_answer():
    q = ev.Question("q", "?", ("Iran's minister",), ("a.txt",), "fact")
    assert ev.passage_is_relevant(q, "a", "a.txt", "Then Iran\u2019s\nminister spoke.")
    assert ev.passage_is_relevant(ev.Question("q", "?", ("x y",), ("a",)), "a", "a.txt", "x  y")  # id as source
    assert not ev.passage_is_relevant(q, "b", "b.txt", "Then Iran's minister spoke.")
    assert not ev.passage_is_relevant(q, "a", "a.txt", "The minister spoke.")


def test_load_questions_reads_the_dev_set():
    ds = ev.load_dataset(DEV)
    assert ds.format == "questions" and ds.name == "dev" and len(ds.questions) == 15
    assert sum(not q.answerable for q in ds.questions) == 2
    assert {q.kind for q in ds.questions} >= {"fact", "multi-source", "unanswerable"}


def test_the_extra_news_questions_are_answered_by_their_sources():
    """benchmarks/news_extra.jsonl: each answer is written in one of its seed articles, word for word."""
    dataset = ev.load_questions(Path(__file__).parent.parent / "benchmarks" / "news_extra.jsonl")
    texts = {p.name: ev.normalize_text(p.read_text(encoding="utf-8")) for p in SEEDS.glob("*.txt")}
    assert len(dataset.questions) == 34 and len(dataset.answerable()) == 31
    for q in dataset.answerable():
        for answer in q.answers:
            assert any(ev.normalize_text(answer) in texts[source] for source in q.sources), (q.id, answer)
    assert not any(q.sources for q in dataset.questions if not q.answerable)


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not valid JSON"),
    ('{"id": "a", "question": "again?"}', "duplicate question id"),
    ('{"id": "b", "question": ""}', "non-empty string"),
    ('{"id": "b", "question": "x?", "answers": "y"}', "needs \"sources\""),
    ('{"id": "b", "question": "x?", "answers": [1], "sources": ["s"]}', "list of strings"),
])
def test_load_questions_names_the_bad_line(tmp_path, line, message):
    path = tmp_path / "q.jsonl"
    path.write_text('{"id": "a", "question": "ok?"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ev.DatasetError, match=message):
        ev.load_questions(path)


def test_load_beir_keeps_judged_queries_in_qrels_order(tmp_path):
    folder = _beir_folder(tmp_path / "mini", [{"_id": "d1", "title": "T", "text": "x"}],
                          [{"_id": "q0", "text": "unjudged"}, {"_id": "q2", "text": "two"},
                           {"_id": "q1", "text": "one"}],
                          [("q2", "d1", 1), ("q1", "d1", 2), ("q1", "d9", 0)])
    ds = ev.load_dataset(folder)
    assert ds.format == "beir" and ds.name == "mini"
    assert [q.id for q in ds.questions] == ["q2", "q1"]
    assert ds.qrels == {"q2": {"d1": 1}, "q1": {"d1": 2, "d9": 0}}
    (folder / "qrels" / "test.tsv").unlink()
    with pytest.raises(ev.DatasetError, match="missing qrels/test.tsv"):
        ev.load_dataset(folder)


def test_answer_sentences_are_scored_where_the_first_result_is_relevant(tmp_path):
    """``answer in sentence@1``: of the questions whose first result is relevant, the share whose answer sentence
    holds a gold answer; BEIR queries bring their answers in ``metadata.answers`` (SQuAD)."""
    ds, results, passages = _question_case()
    results["one"][0]["answer"] = {"text": "Iran's minister said nothing."}  # C: first result not relevant
    results["two"][0]["answer"] = {"text": "And more."}  # relevant, answer sentence holds "more"
    results["three"][0]["answer"] = {"text": "Iran\u2019s minister"}  # relevant, but misses "said X"
    (s,) = ev.evaluate(ds, StubBackend(results, passages), depth=100)
    assert s["answer_sentence"] == {"n": 2, "holds_answer": 0.5}
    assert "answer in sentence@1" in ev.format_table([s])
    folder = _beir_folder(tmp_path / "sq", [{"_id": "d1", "title": "T", "text": "Denver won. Then a parade."}],
                          [{"_id": "q1", "text": "Who won?", "metadata": {"answers": ["Denver Broncos", "Denver"]}},
                           {"_id": "q2", "text": "What came next?"}],
                          [("q1", "d1", 1), ("q2", "d1", 1)])
    beir = ev.load_dataset(folder)
    assert [q.answers for q in beir.questions] == [("Denver Broncos", "Denver"), ()]
    hit = {**_hit("d1", 0, 26, "Denver won. Then a parade."), "answer": {"text": "Then a parade."}}
    (s,) = ev.evaluate(beir, StubBackend({"Who won?": [hit], "What came next?": [hit]}), depth=10)
    assert s["answer_sentence"] == {"n": 1, "holds_answer": 0.0}  # q2 has no gold answer to look for


def test_beir_articles_make_the_title_searchable(tmp_path):
    folder = _beir_folder(tmp_path / "b", [{"_id": 7, "title": "A  title", "text": "Body text."},
                                           {"_id": "8", "title": "", "text": "Only body."}], [], [])
    a, b = ev.beir_articles(folder)
    assert (a.id, a.source, a.title, a.text) == ("7", "7", "A title", "A title\n\nBody text.")
    assert (b.title, b.text) == (None, "Only body.")
    assert a.content_hash and a.content_hash != b.content_hash


# --------------------------------------------------------------------------- metric plumbing

def test_beir_metrics_match_hand_computed_values():
    """q1: relevant d1,d2 ranked 2nd and 4th; q2: graded d5 first; q3: nothing retrieved."""
    ds = ev.Dataset("hand", "beir", Path("."), [ev.Question(q, q) for q in ("q1", "q2", "q3")],
                    {"q1": {"d1": 1, "d2": 1}, "q2": {"d5": 2}, "q3": {"d6": 1}})
    # d3 appears with two passages: only its best counts (max-passage), so d1 is 2nd, d2 4th.
    results = {"q1": [_hit("d3", 0, 5, "", rank=1), _hit("d1", 0, 5, "", rank=2), _hit("d3", 5, 9, "", rank=3),
                      _hit("d4", 0, 5, "", rank=4), _hit("d2", 0, 5, "", rank=5)],
               "q2": [_hit("d5", 0, 5, "")], "q3": []}
    (summary,) = ev.evaluate(ds, StubBackend(results), depth=100)
    m = summary["metrics"]
    ndcg_q1 = (1 / LOG2(3) + 1 / LOG2(5)) / (1 + 1 / LOG2(3))
    expected = {"recall@1": 1 / 3, "recall@3": (0.5 + 1) / 3, "recall@5": 2 / 3, "recall@10": 2 / 3,
                "mrr@10": (0.5 + 1) / 3, "ndcg@10": (ndcg_q1 + 1) / 3}
    assert m == pytest.approx(expected, abs=1e-9)
    assert summary["n"] == summary["n_answerable"] == 3 and summary["judgments"] == "qrels"
    assert summary["recall_curve"]["2"] == pytest.approx(0.5 / 3 + 1 / 3)
    assert summary["questions_under_10_docs"] == 3


def test_rank_order_is_kept_whatever_the_doc_ids_and_scores():
    """pytrec_eval breaks score ties by doc id; the service's order must win."""
    ds = ev.Dataset("ties", "beir", Path("."), [ev.Question("q", "q")], {"q": {"a": 1}})
    results = {"q": [_hit("z", 0, 1, "", rank=1), _hit("a", 0, 1, "", rank=2)]}
    (summary,) = ev.evaluate(ds, StubBackend(results))
    assert summary["metrics"]["mrr@10"] == pytest.approx(0.5)
    assert summary["metrics"]["recall@1"] == 0


def _question_case():
    questions = [ev.Question("q1", "one", ("Iran's minister",), ("art1.txt",), "fact"),
                 ev.Question("q2", "two", ("more",), ("art1",), "fact"),
                 ev.Question("q3", "three", ("said X",), ("art1.txt",), "paraphrase"),
                 ev.Question("q4", "four", (), (), "unanswerable")]
    A = ("art1", "art1.txt", 0, 30, "Iran\u2019s minister said X today.")
    B = ("art1", "art1.txt", 20, 60, "He said X. And more.")
    C = ("art2", "art2.txt", 0, 30, "Iran's minister said nothing.")  # answer, wrong source
    D = ("art2", "art2.txt", 20, 60, "Other text.")

    def h(row, rank):
        return _hit(row[0], row[2], row[3], row[4], row[1], rank)

    results = {"one": [h(C, 1), h(A, 2), h(D, 3)], "two": [h(B, 1)],
               "three": [h(A, 1), h(D, 2), h(C, 3), h(B, 4)], "four": [h(D, 1)]}
    return ev.Dataset("hand", "questions", Path("."), questions), results, [A, B, C, D]


def test_question_metrics_match_hand_computed_values():
    ds, results, passages = _question_case()
    flags = {"one": False, "two": True, "three": True, "four": False}
    backend = StubBackend(results, passages, flags)
    (s,) = ev.evaluate(ds, backend, depth=100, batch_size=3)
    ndcg_q1 = 1 / LOG2(3)  # the only relevant passage (A, curly apostrophe) at rank 2
    ndcg_q3 = (1 + 1 / LOG2(5)) / (1 + 1 / LOG2(3))  # A and B relevant, at ranks 1 and 4
    assert s["metrics"] == pytest.approx({"recall@1": 2 / 3, "recall@3": 1.0, "recall@5": 1.0, "recall@10": 1.0,
                                          "mrr@10": (0.5 + 1 + 1) / 3, "ndcg@10": (ndcg_q1 + 1 + ndcg_q3) / 3})
    assert s["n"] == 4 and s["n_answerable"] == 3 and s["judgments"] == "exact"
    assert s["by_kind"]["fact"]["recall@1"] == pytest.approx(0.5) and s["by_kind"]["fact"]["n"] == 2
    assert s["by_kind"]["paraphrase"]["mrr@10"] == pytest.approx(1.0)
    assert s["by_kind"]["unanswerable"] == {**{k: None for k in ev.METRIC_NAMES}, "n": 1}
    assert s["abstention"] == {"unanswerable": 1, "unanswerable_flagged": 1.0,
                               "answerable_refused_rate": pytest.approx(1 / 3)}
    assert s["latency_ms"]["n"] == 4 and s["latency_ms"]["p50"] is not None
    assert backend.search_calls == [3, 1]  # batched, not one by one
    assert s["no_relevant_passage"] == []


def test_pooled_judgments_and_missing_no_answer_signal():
    ds, results, _ = _question_case()
    results["three"] = results["three"][:1]  # B is never retrieved: the pool does not know it is relevant
    (s,) = ev.evaluate(ds, StubBackend(results, passages=None, flags=None), depth=100)
    assert s["judgments"] == "pooled"
    assert s["metrics"]["ndcg@10"] == pytest.approx((1 / LOG2(3) + 1 + 1) / 3)
    assert s["abstention"] == {"unanswerable": 1, "unanswerable_flagged": None, "answerable_refused_rate": None}


def test_several_modes_share_questions_and_report(tmp_path):
    ds, results, passages = _question_case()
    summaries = ev.evaluate(ds, StubBackend(results, passages), modes=["dense", "lexical"])
    assert [s["mode"] for s in summaries] == ["dense", "lexical"]
    table = ev.format_table(summaries)
    assert "dense" in table and "lexical" in table and "recall@10" in table and "paraphrase" in table
    paths = ev.write_report(summaries, tmp_path / "out")
    assert [p.name for p in paths] == ["report.json", "report.md", "recall.png"]
    assert isinstance(json.loads(paths[0].read_text()), list)
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| recall@1 |" in paths[1].read_text()
    with pytest.raises(ev.UnknownMode):
        ev.evaluate(ds, StubBackend(results, passages), modes=["dense", "sparse"])
    with pytest.raises(ev.UnknownMode, match="twice"):
        ev.evaluate(ds, StubBackend(results, passages), modes=["dense", "dense"])


def test_without_the_eval_extra_scoring_and_the_chart_say_how_to_install_it(tmp_path, monkeypatch):
    ds, results, passages = _question_case()
    summaries = ev.evaluate(ds, StubBackend(results, passages))
    monkeypatch.setitem(sys.modules, "ir_measures", None)  # ``import ir_measures`` now fails
    with pytest.raises(ev.EvaluationError, match=r"Scoring needs ir-measures.*pip install -e '\.\[eval\]'"):
        ev.evaluate(ds, StubBackend(results, passages))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ev.EvaluationError, match=r"chart needs matplotlib.*\[eval\]"):
        ev.plot_recall_curves(summaries, tmp_path / "recall.png")
    assert not (tmp_path / "recall.png").exists()


def test_serving_and_importing_evaluation_load_none_of_the_eval_extra():
    """The eval extra's packages are imported only when scoring or charting, never by the service."""
    import subprocess

    code = ("import sys, qa_service.web.server, qa_service.retrieval, qa_service.evaluation\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('ir_measures', 'pytrec_eval', 'matplotlib', 'sklearn')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_default_depth_gives_beir_runs_ten_documents():
    beir = ev.Dataset("b", "beir", Path("."), [ev.Question("q", "q")], {"q": {"d": 1}})
    questions, _, _ = _question_case()

    class Sized(StubBackend):
        def __init__(self, per_doc):
            super().__init__({})
            self.per_doc = per_doc

        def passages_per_document(self):
            return self.per_doc

    assert [ev.default_depth(beir, Sized(p)) for p in (4.54, 2.03, 1.0, 12.0)] == [91, 41, 30, 100]
    assert ev.default_depth(questions, Sized(2.0)) == ev.DEFAULT_DEPTH
    assert ev.default_depth(beir, ev.HttpBackend("http://127.0.0.1:1")) == ev.HTTP_DEPTH


# --------------------------------------------------------------------------- modes on a Searcher

class _OldSearcher:
    """A Searcher from before modes existed."""

    def __init__(self):
        self.calls = []

    def search_many(self, questions, k=5, filters=None):
        self.calls.append({})
        return [[] for _ in questions]

    def ask(self, question, k=5, filters=None):
        return {"results": []}


class _ModeSearcher:
    def __init__(self):
        self.calls = []

    def search_many(self, questions, k=5, filters=None, mode="hybrid", group=True):
        if mode not in ("hybrid", "dense"):
            raise ValueError(f"unknown mode {mode}")
        self.calls.append({"mode": mode, "group": group})
        return [[] for _ in questions]

    def ask(self, question, k=5, filters=None, mode="hybrid"):
        return {"results": []}


def test_mode_is_passed_only_when_the_searcher_takes_it():
    old = ev.LocalBackend(_OldSearcher())
    assert old.default_mode() == "dense"
    old.check_modes([None, "dense"])
    with pytest.raises(ev.UnknownMode, match="only does dense"):
        old.check_modes(["lexical"])
    old.search_many(["q"], 3, "dense")
    assert old.searcher.calls == [{}]

    new = ev.LocalBackend(_ModeSearcher())
    assert new.default_mode() == "hybrid"
    new.check_modes(["dense"])
    with pytest.raises(ev.UnknownMode, match="refused"):
        new.check_modes(["lexical"])
    new.searcher.calls.clear()
    new.search_many(["q"], 3, "dense")
    assert new.searcher.calls == [{"mode": "dense", "group": False}]  # raw passage ranking
    assert ev.LocalBackend(_ModeSearcher(), grouped=True).raw_passages is False


# --------------------------------------------------------------------------- BEIR with the fake embedder

def _topic_beir(root: Path, topics: list[str], text) -> Path:
    """One document per topic (titled by its first word, ``text(topic)``), queried by its next two words."""
    docs = [{"_id": f"d{i}", "title": t.split()[0].title(), "text": text(t)} for i, t in enumerate(topics)]
    queries = [{"_id": f"q{i}", "text": " ".join(t.split()[1:3])} for i, t in enumerate(topics)]
    return _beir_folder(root, docs, queries, [(f"q{i}", f"d{i}", 1) for i in range(len(topics))])


def _tiny_beir(root: Path) -> Path:
    topics = ["volcano lava eruption magma", "penguin antarctic ice colony", "violin orchestra concerto bow",
              "tomato garden soil seedling", "satellite orbit rocket launch", "bakery bread flour yeast"]
    return _topic_beir(root, topics, lambda t: f"This text is about {t}. " * 3)


def test_beir_index_is_cached_by_content(tmp_path):
    folder = _tiny_beir(tmp_path / "tiny")
    from qa_service.config import Settings

    settings = Settings(index_dir=tmp_path / "index", model=FakeEmbedder.name)
    emb = FakeEmbedder()
    beir_settings, note = ev.ensure_beir_index(folder, settings, tmp_path / "cache", emb)
    assert note.startswith("indexed 6 documents") and beir_settings.index_dir.parent == tmp_path / "cache"
    assert beir_settings.index_dir.name.startswith("tiny-")
    again, note = ev.ensure_beir_index(folder, settings, tmp_path / "cache", emb)
    assert note.startswith("using cached index") and again.index_dir == beir_settings.index_dir
    with open(folder / "corpus.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"_id": "d9", "title": "New", "text": "new words"}) + "\n")
    changed, note = ev.ensure_beir_index(folder, settings, tmp_path / "cache", emb)
    assert note.startswith("indexed 7 documents") and changed.index_dir != beir_settings.index_dir


def _long_beir(root: Path) -> Path:
    """Three documents of about 400 fake tokens each: several 128-token passages by default, over the model's window."""
    topics = ["volcano lava eruption magma crater", "penguin antarctic ice colony krill",
              "violin orchestra concerto bow strings"]
    return _topic_beir(root, topics,
                       lambda t: " ".join(f"Sentence {j} tells more about the {t} and nothing else."
                                          for j in range(30)))


def test_whole_documents_index_one_passage_per_document(tmp_path):
    from qa_service.config import Settings
    from qa_service.retrieval import Searcher

    folder = _long_beir(tmp_path / "long")
    settings = Settings(index_dir=tmp_path / "index", model=FakeEmbedder.name)
    emb = FakeEmbedder()
    articles = {a.id: a for a in ev.beir_articles(folder)}
    assert all(emb.count_tokens(a.text) > emb.max_seq_length for a in articles.values())

    chunked, _ = ev.ensure_beir_index(folder, settings, tmp_path / "cache", emb)
    whole, note = ev.ensure_beir_index(folder, settings, tmp_path / "cache", emb, whole_documents=True)
    assert note.startswith("indexed 3 documents, 3 passages")
    assert whole.index_dir != chunked.index_dir and whole.index_dir.name.endswith(ev.WHOLE_DOCUMENT_SUFFIX)
    assert Searcher(chunked, embedder=emb).passage_count > 3 * 3  # the default cuts each into 128-token windows

    config = ev.retrieval_config(settings, whole_documents=True)
    assert config.sentence_weight == 0.0 and ev.retrieval_config(settings) is None
    searcher = Searcher(whole, embedder=emb, config=config)
    assert searcher.passage_count == 3
    assert all(searcher.passage_count_for(doc) == 1 for doc in articles)
    (hits,) = searcher.search_many(["penguin krill"], k=3, mode="dense", group=False)
    assert len(hits) == 3 and hits[0].citation.article_id == "d1"
    qvec = emb.encode([searcher.prepare("penguin krill")[0]])[0]
    for hit in hits:  # each passage is its whole document, and its dense score is the plain cosine
        text = articles[hit.citation.article_id].text
        assert (hit.citation.start, hit.citation.end, hit.text) == (0, len(text), text)
        assert hit.extra["scores"]["dense"] == pytest.approx(float(emb.encode([text])[0] @ qvec), abs=1e-5)

    # Cached under its own key: both stay fresh, neither rebuilds the other.
    assert ev.ensure_beir_index(folder, settings, tmp_path / "cache", emb)[1].startswith("using cached index")
    again = ev.ensure_beir_index(folder, settings, tmp_path / "cache", emb, whole_documents=True)[1]
    assert again.startswith("using cached index") and "one passage each" in again


def test_whole_document_embedder_counts_what_the_model_reads():
    emb = FakeEmbedder()
    whole = ev.whole_document_embedder(emb)
    long_text = "word " * 1000
    assert emb.count_tokens(long_text) == 1000 and whole.count_tokens(long_text) == emb.max_seq_length - 2
    assert whole.count_tokens("two words") == 2
    assert isinstance(whole, FakeEmbedder) and whole.name == emb.name and emb.count_tokens(long_text) == 1000


# --------------------------------------------------------------------------- HTTP

class _StubService:
    """A tiny /api/ask server: canned hits, an error for a bad mode."""

    def __init__(self, results):
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                if body.get("mode") not in (None, "dense", "hybrid"):
                    status, payload = 400, {"ok": False, "error": {"code": "mode_unknown", "message": "Unknown mode"}}
                elif self.path != "/api/ask":
                    status, payload = 404, {"ok": False, "error": {"code": "not_found", "message": "Not found"}}
                else:
                    status = 200
                    payload = {"ok": True, "results": results.get(body["question"], [])[:body["k"]],
                               "answerable": body["question"] != "four"}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub_service():
    ds, results, _ = _question_case()
    service = _StubService(results)
    yield ds, service
    service.close()


def test_http_backend_scores_the_service_answers(stub_service):
    ds, service = stub_service
    summaries = ev.evaluate(ds, ev.HttpBackend(service.url), modes=["dense", "hybrid"])
    dense, hybrid = summaries
    assert dense["backend"] == service.url and dense["depth"] == ev.HTTP_DEPTH and dense["judgments"] == "pooled"
    assert dense["metrics"]["recall@1"] == pytest.approx(2 / 3) and dense["metrics"]["mrr@10"] == pytest.approx(5 / 6)
    assert dense["abstention"] == {"unanswerable": 1, "unanswerable_flagged": 1.0, "answerable_refused_rate": 0.0}
    assert dense["latency_ms"]["n"] == 4
    assert {"question": "one", "k": 50, "mode": "dense"} in service.requests
    with pytest.raises(ev.UnknownMode, match="Unknown mode"):
        ev.evaluate(ds, ev.HttpBackend(service.url), modes=["sparse"])


def test_http_errors_are_sentences(stub_service):
    ds, service = stub_service
    with pytest.raises(ev.ServiceError, match="Not found"):
        ev.HttpBackend(service.url + "/other").ask("one", 5, None)
    service.close()
    with pytest.raises(ev.ServiceError, match="Cannot reach the service"):
        ev.HttpBackend(service.url).ask("one", 5, None)
    service.server = type("Closed", (), {"shutdown": lambda s: None, "server_close": lambda s: None})()
    with pytest.raises(ev.EvaluationError, match="http://"):
        ev.HttpBackend("localhost:8000")


def test_http_against_the_real_web_app_agrees_with_in_process(fake_searcher):
    """The API shows grouped results; scored in-process the same way, the figures must be the same."""
    web = pytest.importorskip("qa_service.web")
    if not hasattr(web, "create_app"):
        pytest.skip("the web app is not there yet")
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, web.create_app(searcher=fake_searcher), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ds = ev.load_dataset(DEV)
        (over_http,) = ev.evaluate(ds, ev.HttpBackend(f"http://127.0.0.1:{server.server_port}"), modes=["dense"])
        (local,) = ev.evaluate(ds, ev.LocalBackend(fake_searcher, grouped=True), modes=["dense"], depth=ev.HTTP_DEPTH)
    finally:
        server.shutdown()
    assert over_http["metrics"] == pytest.approx(local["metrics"])
    assert over_http["by_kind"] == local["by_kind"]
    assert over_http["abstention"]["unanswerable_flagged"] is not None  # the service sends "answerable"


# --------------------------------------------------------------------------- CLI (fake model)

@pytest.fixture
def fake_model(monkeypatch):
    """Make ``--model fake-hash-64`` load the fake embedder everywhere the CLI looks."""
    import qa_service.embedding
    import qa_service.retrieval.searcher

    real = qa_service.embedding.load_embedder

    def fake(name):
        return FakeEmbedder() if name == FakeEmbedder.name else real(name)

    monkeypatch.setattr(qa_service.embedding, "load_embedder", fake)
    monkeypatch.setattr(qa_service.retrieval.searcher, "load_embedder", fake)
    return ["--model", FakeEmbedder.name]


def test_cli_eval_question_file_json_and_report(tmp_path, fake_model):
    args = ["eval", str(DEV), "--index-dir", str(tmp_path / "index"), "--seeds-dir", str(SEEDS), *fake_model]
    result = CliRunner().invoke(cli, args + ["--json", "--out", str(tmp_path / "out"), "--mode", "dense"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["dataset"] == "dev" and summary["mode"] == "dense" and summary["n"] == 15
    assert set(summary["metrics"]) == set(ev.METRIC_NAMES)
    assert all(0 <= v <= 1 for v in summary["metrics"].values())
    assert set(summary["abstention"]) == {"unanswerable", "unanswerable_flagged", "answerable_refused_rate"}
    assert summary["abstention"]["unanswerable"] == 2 and "multi-source" in summary["by_kind"]
    assert (tmp_path / "out" / "recall.png").is_file()

    bad = CliRunner().invoke(cli, args + ["--mode", "dense,telepathy"])
    assert bad.exit_code == 2 and "telepathy" in bad.output


def test_cli_eval_beir_folder(tmp_path, fake_model):
    folder = _tiny_beir(tmp_path / "tiny")
    result = CliRunner().invoke(cli, ["eval", str(folder), "--cache-dir", str(tmp_path / "cache"), "--json",
                                      "--mode", "dense", *fake_model])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["format"] == "beir" and summary["n"] == 6 and summary["judgments"] == "qrels"
    assert summary["metrics"]["recall@10"] == 1.0  # six documents: every one is in the top 10
    assert summary["metrics"]["recall@1"] >= 0.5  # the fake embedder matches shared words
    table = CliRunner().invoke(cli, ["eval", str(folder), "--cache-dir", str(tmp_path / "cache"), *fake_model])
    assert table.exit_code == 0 and "ndcg@10" in table.stdout and "using cached index" in table.stderr
    whole = CliRunner().invoke(cli, ["eval", str(folder), "--cache-dir", str(tmp_path / "cache"), "--json",
                                     "--mode", "dense", "--whole-documents", *fake_model])
    assert whole.exit_code == 0, whole.output
    assert "indexed 6 documents, 6 passages" in whole.stderr
    assert json.loads(whole.stdout)["metrics"]["recall@10"] == 1.0


def test_cli_eval_bad_inputs(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n", encoding="utf-8")
    result = CliRunner().invoke(cli, ["eval", str(bad)])
    assert result.exit_code == 2 and "bad.jsonl, line 1" in result.output
    folder = tmp_path / "notbeir"
    folder.mkdir()
    result = CliRunner().invoke(cli, ["eval", str(folder)])
    assert result.exit_code == 2 and "not a BEIR folder" in result.output
    result = CliRunner().invoke(cli, ["eval", str(DEV), "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 1 and "Cannot reach the service" in result.output
    result = CliRunner().invoke(cli, ["eval", str(DEV), "--whole-documents"])
    assert result.exit_code == 2 and "--whole-documents applies to BEIR folders" in result.output


# --------------------------------------------------------------------------- end to end, real model

def _scifact_slice(root: Path, n_queries: int = 10, n_docs: int = 30) -> Path:
    lines = (SCIFACT / "qrels" / "test.tsv").read_text(encoding="utf-8").splitlines()[1:]
    qrels = [tuple(line.split("\t")) for line in lines]
    chosen = list(dict.fromkeys(q for q, _, _ in qrels))[:n_queries]
    rows = [(q, d, int(s)) for q, d, s in qrels if q in chosen]
    wanted = {d for _, d, _ in rows}
    corpus = [json.loads(line) for line in (SCIFACT / "corpus.jsonl").open(encoding="utf-8")]
    fillers = [d for d in corpus if d["_id"] not in wanted]
    random.Random(0).shuffle(fillers)
    docs = [d for d in corpus if d["_id"] in wanted] + fillers[:max(0, n_docs - len(wanted))]
    queries = [json.loads(line) for line in (SCIFACT / "queries.jsonl").open(encoding="utf-8")]
    return _beir_folder(root, docs, [q for q in queries if q["_id"] in chosen], rows)


@pytest.mark.slow
def test_e2e_scifact_slice_and_dev_set_with_the_real_model(tmp_path):
    folder = _scifact_slice(tmp_path / "scifact-mini")
    runner = CliRunner()
    result = runner.invoke(cli, ["eval", str(folder), "--cache-dir", str(tmp_path / "cache"), "--json",
                                 "--mode", "dense", "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["n"] == 10 and summary["mode"] == "dense"
    assert summary["metrics"]["ndcg@10"] > 0.6  # 30 abstracts: the real model finds most claims' evidence
    assert json.loads((tmp_path / "report" / "report.json").read_text())["metrics"] == summary["metrics"]

    result = runner.invoke(cli, ["eval", str(DEV), "--json", "--index-dir", str(tmp_path / "index"),
                                 "--seeds-dir", str(SEEDS)])
    assert result.exit_code == 0, result.output
    dev = json.loads(result.stdout)
    assert dev["n"] == 15 and dev["n_answerable"] == 13 and dev["judgments"] == "exact"
    assert dev["metrics"]["recall@10"] >= 0.8 and dev["no_relevant_passage"] == []
