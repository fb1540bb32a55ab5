"""The one search path: a ``Searcher`` owns a loaded index and the query encoder.

The CLI, the web app and the evaluation script all call ``Searcher.search`` / ``Searcher.ask``, so
the three ways of use can never disagree.

One question flows through these stages, all from data stored at index time (nothing per query
re-embeds passages or sentences; the question vector is computed once and shared):

1. spelling variants of names are looked up in the index vocabulary (``lexical.Vocabulary``);
2. dense (FAISS) and lexical (BM25) retrieval each propose candidates, restricted by the filters
   before ranking;
3. every candidate gets both exact scores, its dense score also looks at its best sentence, and the
   two are fused (reciprocal rank fusion or a score-normalised convex combination, see ``fusion``);
4. a date named in the question gently prefers articles from that time;
5. ``answer`` picks each passage's answering sentence, drops overlapping windows of one article and
   groups passages from different articles that report the same fact.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import Settings
from ..embedding import Embedder, load_embedder, load_index_encoder
from ..errors import ArticleNotFound, IndexCorrupt, IndexMismatch, InvalidRequest
from ..store import (LEXICAL, PASSAGES_DB, SENTENCE_VECTORS, VECTORS, VOCABULARY, check_model, read_manifest,
                     rebuild_hint)
from ..types import Article, Citation, Filters, Hit
from . import fusion
from .dates import date_preference
from .dense import DenseIndex
from .lexical import LexicalIndex, Vocabulary, analyze

logger = logging.getLogger(__name__)

MODES = ("hybrid", "dense", "lexical")


@dataclass(frozen=True)
class RetrievalConfig:
    """How candidates are found and fused.

    Defaults were chosen on SQuAD dev (10,570 questions) and checked on SciFact and the news dev
    questions, one configuration for all (see README "Retrieval quality"): a convex combination of
    scores beat reciprocal rank fusion at every constant and weight tried.
    """

    fusion: str = "convex"  # "convex" or "rrf"
    alpha: float = 0.7  # convex fusion: weight of the dense score (lexical gets 1 - alpha)
    rrf_k: float = 60.0  # rrf: the constant
    dense_weight: float = 1.0  # rrf: weight of the dense ranking
    lexical_weight: float = 1.0  # rrf: weight of the lexical ranking
    sentence_weight: float = 0.5  # dense score = (1 - w) * passage cosine + w * best sentence cosine
    sentence_bm25_weight: float = 0.3  # lexical score mixes passage BM25 with its best sentence's BM25 ...
    bigram_weight: float = 0.2  # ... and BM25 over word pairs (phrases shared with the question)
    candidates: int = 50
    date_boost: float = 0.3  # share of the query's score range given to a date match
    reranker: str | None = None  # cross-encoder name or folder; None: no reranking
    rerank_top: int = 20


@dataclass
class Candidate:
    pid: int
    score: float
    dense: float
    lexical: float


class Searcher:
    """Answer questions from one index directory."""

    def __init__(self, settings: Settings | None = None, embedder: Embedder | None = None,
                 config: RetrievalConfig | None = None):
        self.settings = settings or Settings.from_env()
        self.config = config or RetrievalConfig(reranker=self.settings.reranker)
        index_dir = Path(self.settings.index_dir)
        manifest = read_manifest(index_dir)
        if embedder is None:
            check_model(manifest, self.settings.model, index_dir)
            # The index's ONNX export when it has one (no torch in this process), else the model itself.
            embedder = load_index_encoder(manifest) or load_embedder(self.settings.model)
        elif manifest.get("model") != embedder.name:
            raise IndexMismatch(f"The index in {index_dir} was built with model {manifest.get('model')!r}, "
                                f"not {embedder.name!r}. {rebuild_hint(index_dir)}")
        if embedder.dimension != manifest.get("dimension"):
            raise IndexMismatch(f"The index in {index_dir} holds {manifest.get('dimension')}-d vectors but the model "
                                f"makes {embedder.dimension}-d ones. {rebuild_hint(index_dir)}")
        self.embedder = embedder
        self.manifest = manifest
        build = Path(manifest["_build_dir"])
        try:
            self.dense = DenseIndex(build / VECTORS, manifest.get("faiss"))
            self._db = sqlite3.connect(f"file:{build / PASSAGES_DB}?mode=ro", uri=True, check_same_thread=False)
            rows = self._db.execute("SELECT id, source, title, date, text, content_hash FROM articles ORDER BY id").fetchall()
            self._articles = {r[0]: Article(*r) for r in rows}
            prow = self._db.execute("SELECT article_id, first_sentence, last_sentence FROM passages ORDER BY id").fetchall()
            srow = self._db.execute('SELECT start, "end" FROM sentences ORDER BY id').fetchall()
            self.lexical = LexicalIndex.load(build / LEXICAL / "passages", len(prow))
            self.lexical_bigrams = LexicalIndex.load(build / LEXICAL / "bigrams", len(prow), "bigrams")
            self.lexical_sentences = LexicalIndex.load(build / LEXICAL / "sentences", len(srow))
            self.vocabulary = Vocabulary.load(build / VOCABULARY)
            self.sentence_vectors = np.load(build / SENTENCE_VECTORS, mmap_mode="r")
        except (RuntimeError, sqlite3.DatabaseError, OSError, ValueError) as exc:
            raise IndexCorrupt(f"The index in {index_dir} cannot be read ({type(exc).__name__}). {rebuild_hint(index_dir)}") from exc
        self._lock = threading.Lock()
        self.reranker = None
        if self.config.reranker:
            from .rerank import CrossEncoderReranker

            self.reranker = CrossEncoderReranker(self.config.reranker, self.config.rerank_top)
        ids = sorted(self._articles)
        self._article_pos = {a: i for i, a in enumerate(ids)}
        self._article_ids = ids
        self._passage_article = np.array([self._article_pos[r[0]] for r in prow], dtype=np.int32)
        self._passage_sentences = np.array([(r[1], r[2]) for r in prow], dtype=np.int64).reshape(-1, 2)
        self._sentence_spans = np.array(srow, dtype=np.int64).reshape(-1, 2)
        self._passage_counts = np.bincount(self._passage_article, minlength=len(ids)) if len(ids) else np.zeros(0, int)
        self._article_dates = [self._articles[a].date for a in ids]
        if not (len(prow) == self.dense.size == self.lexical.size) or len(srow) != len(self.sentence_vectors):
            raise IndexCorrupt(f"The index in {index_dir} has {self.dense.size} vectors for "
                               f"{len(prow)} passages. {rebuild_hint(index_dir)}")

    # ------------------------------------------------------------------ articles
    @property
    def model_name(self) -> str:
        return self.embedder.name

    @property
    def passage_count(self) -> int:
        return int(self.dense.size)

    def articles(self) -> list[Article]:
        return [self._articles[a] for a in self._article_ids]

    def article(self, article_id: str) -> Article:
        try:
            return self._articles[article_id]
        except (KeyError, TypeError):
            raise ArticleNotFound(f"There is no article with id {article_id!r}.") from None

    def passage_count_for(self, article_id: str) -> int:
        return int(self._passage_counts[self._article_pos[article_id]])

    # ------------------------------------------------------------------ search
    def _allowed_passages(self, filters: Filters | None) -> np.ndarray | None:
        if filters is None or filters.is_empty():
            return None
        keep = np.ones(len(self._article_ids), dtype=bool)
        if filters.sources:
            by_name = {a.source: a.id for a in self._articles.values()}
            wanted = set()
            unknown = []
            for s in filters.sources:
                if s in self._articles:
                    wanted.add(s)
                elif s in by_name:
                    wanted.add(by_name[s])
                else:
                    unknown.append(s)
            if unknown:
                raise InvalidRequest(f"Unknown source(s): {', '.join(map(repr, unknown[:5]))}. "
                                     "Use article ids or file names from /api/articles.", code="unknown_source")
            keep &= np.array([a in wanted for a in self._article_ids])
        if filters.date_from or filters.date_to:
            lo, hi = filters.date_from or "0000-00-00", filters.date_to or "9999-99-99"
            keep &= np.array([bool(d) and lo <= d <= hi for d in self._article_dates])
        return np.flatnonzero(keep[self._passage_article]).astype(np.int64)

    def _passages(self, ids: Sequence[int]) -> dict[int, tuple[str, int, int, str]]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        with self._lock:
            rows = self._db.execute(f'SELECT id, article_id, start, "end", text FROM passages WHERE id IN ({marks})',
                                    [int(i) for i in ids]).fetchall()
        return {r[0]: r[1:] for r in rows}

    def prepare(self, question: str) -> tuple[str, str]:
        """Return ``(dense_text, lexical_text)``: the question in the corpus's spellings, and with all variants."""
        corrected, variants = self.vocabulary.correct(question)
        extra = " ".join(v for options in variants.values() for v in options)
        return corrected, f"{corrected} {extra}".strip()

    def encode_questions(self, questions: Sequence[str]) -> np.ndarray:
        return self.embedder.encode(list(questions), batch_size=self.settings.batch_size)

    def _sentence_max(self, pids: np.ndarray, qvec: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Return each passage's best sentence cosine, and all its sentence cosines."""
        best = np.empty(len(pids), dtype=np.float32)
        per_passage = []
        for i, pid in enumerate(pids):
            first, last = self._passage_sentences[pid]
            sims = np.asarray(self.sentence_vectors[first:last + 1]) @ qvec
            per_passage.append(sims)
            best[i] = sims.max() if len(sims) else 0.0
        return best, per_passage

    def _lexical_mix(self, text: str, pids: np.ndarray, passage_scores: np.ndarray) -> np.ndarray:
        """Return the lexical evidence of candidates ``pids`` on a 0..1 scale.

        Passage BM25, the BM25 of the passage's best sentence and BM25 over word pairs, each divided by
        its best score over the whole index for this question, then averaged with the configured weights.
        """
        cfg = self.config

        def scaled(scores: np.ndarray, all_scores: np.ndarray) -> np.ndarray:
            top = float(all_scores.max()) if len(all_scores) else 0.0  # best over the index, not the candidates
            return scores / top if top > 0 else np.zeros_like(scores)

        sentence_all = self.lexical_sentences.scores(text)
        sentence_best = np.array([sentence_all[r[0]:r[1] + 1].max() if r[1] >= r[0] else 0.0
                                  for r in self._passage_sentences[pids]], dtype=np.float32)
        bigram_all = self.lexical_bigrams.scores(text)
        ws, wb = cfg.sentence_bm25_weight, cfg.bigram_weight
        mix = ((1 - ws) * scaled(passage_scores[pids], passage_scores) + ws * scaled(sentence_best, sentence_all)
               + wb * scaled(bigram_all[pids], bigram_all))
        return mix / (1 + wb)

    def _rank(self, question: str, qvec: np.ndarray, lexical_text: str, n: int, mode: str,
              allowed: np.ndarray | None) -> tuple[list[Candidate], dict[int, np.ndarray]]:
        cfg = self.config
        pool = max(cfg.candidates, n)
        ids: set[int] = set()
        if mode in ("dense", "hybrid"):
            _, dids = self.dense.search(qvec.reshape(1, -1), pool, allowed)
            ids.update(int(i) for i in dids[0] if i >= 0)
        lex_all = None
        if mode in ("lexical", "hybrid"):
            lex_all = self.lexical.scores(lexical_text)
            _, lids = self.lexical.search(lexical_text, pool, allowed, scores=lex_all)
            ids.update(int(i) for i in lids)
        if not ids:
            return [], {}
        pids = np.array(sorted(ids), dtype=np.int64)
        lex = np.zeros(len(pids), dtype=np.float32) if lex_all is None else lex_all[pids]
        pvecs = self.dense.vectors(pids)
        passage_cos = pvecs @ qvec
        sent_best, sent_sims = self._sentence_max(pids, qvec)
        w = cfg.sentence_weight
        dense = (1 - w) * passage_cos + w * sent_best
        if mode == "dense":
            fused = dense.astype(np.float64)
        elif mode == "lexical":
            fused = lex.astype(np.float64)
        elif cfg.fusion == "convex":
            fused = fusion.convex_fusion(dense, self._lexical_mix(lexical_text, pids, lex_all), cfg.alpha)
        else:
            fused = fusion.reciprocal_rank_fusion([dense, lex], [cfg.dense_weight, cfg.lexical_weight], cfg.rrf_k,
                                                  present=[np.ones(len(pids), bool), lex > 0])
        preference = date_preference(question, [self._article_dates[a] for a in self._passage_article[pids]])
        if preference is not None and mode == "hybrid":
            # A bonus the size of a few ranks: enough to order close calls, not to override relevance.
            spread = float(fused.max() - fused.min()) if len(fused) > 1 else 0.0
            fused = fused + cfg.date_boost * spread * preference
        order = np.argsort(-fused, kind="stable")
        cands = [Candidate(int(pids[i]), float(fused[i]), float(dense[i]), float(lex[i])) for i in order]
        if self.reranker is not None and cands:
            cands = self._rerank(question, cands)
        sims = {int(pids[i]): sent_sims[i] for i in order}
        return cands, sims

    def _rerank(self, question: str, cands: list[Candidate]) -> list[Candidate]:
        """Reorder the best ``rerank_top`` candidates by the cross-encoder; their score becomes its score."""
        head, tail = cands[: self.reranker.top_n], cands[self.reranker.top_n:]
        rows = self._passages([c.pid for c in head])
        scores = self.reranker.scores(question, [rows[c.pid][3] for c in head])
        for cand, score in zip(head, scores):
            cand.score = float(score)
        head.sort(key=lambda c: -c.score)
        return head + tail

    def search(self, question: str, k: int = 5, filters: Filters | None = None, mode: str = "hybrid",
               group: bool = True) -> list[Hit]:
        """Return the top ``k`` passages for ``question``, best first."""
        return self.search_many([question], k, filters, mode, group=group)[0]

    def search_many(self, questions: Sequence[str], k: int = 5, filters: Filters | None = None,
                    mode: str = "hybrid", group: bool = True) -> list[list[Hit]]:
        """Search several questions at once (embedded in one batch).

        Args:
            group: fold overlapping windows and same-fact passages of other outlets into one result
                (the API's behaviour); evaluation of raw passage ranking may turn it off.
        """
        from ..answer import build_hits

        if mode not in MODES:
            raise InvalidRequest(f"Unknown mode {mode!r}; choose one of {', '.join(MODES)}.", code="invalid_mode")
        allowed = self._allowed_passages(filters)
        prepared = [self.prepare(q) for q in questions]
        vectors = self.encode_questions([p[0] for p in prepared])
        out = []
        for question, (_dense_text, lexical_text), qvec in zip(questions, prepared, vectors):
            cands, sims = self._rank(question, qvec, lexical_text, max(k * 4, 20), mode, allowed)
            out.append(build_hits(self, question, cands, sims, k, group=group))
        return out

    def ask(self, question: str, k: int = 5, filters: Filters | None = None, mode: str = "hybrid") -> dict:
        """Return the result structure shared by ``qa-service ask --json`` and the JSON API."""
        from ..answer import answerability

        started = time.perf_counter()
        hits = self.search(question, k, filters, mode)
        verdict = answerability(self, question, hits)
        return {"question": question, "mode": mode, "answerable": verdict.answerable,
                "answer_confidence": verdict.score,
                "results": [h.to_dict() for h in hits],
                "took_ms": round((time.perf_counter() - started) * 1000, 3)}

    # helpers used by ``answer``
    def sentence_span(self, sid: int) -> tuple[int, int]:
        s, e = self._sentence_spans[sid]
        return int(s), int(e)

    def passage_sentence_ids(self, pid: int) -> range:
        first, last = self._passage_sentences[pid]
        return range(int(first), int(last) + 1)

    def citation(self, article_id: str, start: int, end: int) -> Citation:
        a = self._articles[article_id]
        return Citation(a.id, a.source, a.title, a.date, start, end)

    def question_terms(self, question: str) -> list[str]:
        return analyze(self.prepare(question)[1])
