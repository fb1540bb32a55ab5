"""The one search path: a ``Searcher`` owns an index backend (``backends``) and the query encoder.

The CLI, the web app and the evaluation script all call ``Searcher.search`` / ``Searcher.ask``, so
the three ways of use can never disagree.

One question flows through these stages, all from data stored at index time (nothing per query
re-embeds passages or sentences; the question vector is computed once and shared):

1. spelling variants of names are looked up in the index vocabulary (``lexical.Vocabulary``);
2. the backend's dense (FAISS or pgvector) and lexical (BM25) retrieval each propose candidates,
   restricted by the filters before ranking, each with all the evidence fusion needs;
3. every candidate gets both exact scores, its dense score also looks at its best sentence, its lexical
   score weighs words by how rare they are in the index and in English (``lexical.blended_idf``), and the
   two are fused (reciprocal rank fusion or a score-normalised convex combination, see ``fusion``);
4. a date named in the question gently prefers articles from that time;
5. ``answer`` picks each passage's answering sentence, drops overlapping windows of one article, folds the
   copies of one syndicated story (articles sharing a ``story``) into one result and groups passages from
   different articles that report the same fact.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..config import Settings
from ..backends import IndexBackend, open_backend
from ..chunking import forbid_forks
from ..embedding import Embedder, load_embedder
from ..errors import IndexMismatch, InvalidRequest
from ..ingest import UNTITLED, lead_title
from ..manifest import check_model
from ..types import MODES, Article, ArticleInfo, Citation, Filters, Hit
from . import fusion
from .dates import date_preference
from .lexical import BACKGROUND_DOCS, analyze, fold

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrievalConfig:
    """How candidates are found and fused.

    One configuration for every corpus: a convex combination of scores (it beat reciprocal rank fusion), and a
    dense score led by the best sentence, whose vector carries its passage's context
    (docs/decisions/fusion-weights.md).
    """

    fusion: str = "convex"  # "convex" or "rrf"
    alpha: float = 0.65  # convex fusion: weight of the dense score (lexical gets 1 - alpha)
    rrf_k: float = 60.0  # rrf: the constant
    dense_weight: float = 1.0  # rrf: weight of the dense ranking
    lexical_weight: float = 1.0  # rrf: weight of the lexical ranking
    sentence_weight: float = 0.85  # dense score = (1 - w) * passage cosine + w * best sentence cosine
    sentence_bm25_weight: float = 0.3  # lexical score mixes passage BM25 with its best sentence's BM25 ...
    bigram_weight: float = 0.2  # ... and BM25 over word pairs (phrases shared with the question)
    background_docs: float = BACKGROUND_DOCS  # hybrid: term idf blended with English's (lexical.blended_idf)
    candidates: int = 50
    date_boost: float = 0.3  # share of the query's score range given to a date match
    reranker: str | None = None  # cross-encoder name or folder; None: no reranking
    rerank_top: int = 20


def best_of_runs(runs: Sequence[np.ndarray]) -> np.ndarray:
    """Return the maximum of each array in ``runs`` (0 for an empty one) as float32: one pass, not one call each."""
    lengths = np.fromiter((len(r) for r in runs), dtype=np.int64, count=len(runs))
    best = np.zeros(len(runs), dtype=np.float32)
    has = lengths > 0
    if has.any():
        starts = np.zeros(len(runs), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        best[has] = np.maximum.reduceat(np.concatenate(runs).astype(np.float32, copy=False), starts[has])
    return best


@dataclass
class Candidate:
    pid: int
    score: float
    dense: float
    lexical: float


class Searcher:
    """Answer questions from one index backend (``backends``: a FAISS directory or PostgreSQL)."""

    def __init__(self, settings: Settings | None = None, embedder: Embedder | None = None,
                 config: RetrievalConfig | None = None, backend: IndexBackend | None = None):
        self.settings = settings or Settings.from_env()
        self.config = config or RetrievalConfig(reranker=self.settings.reranker)
        self.backend = backend or open_backend(self.settings)
        manifest = self.backend.manifest
        where, hint = self.backend.describe(), self.backend.rebuild_hint()
        if embedder is None:
            check_model(manifest, self.settings.model, where)
            # The index's ONNX export when it has one (no torch in this process), else the model itself.
            embedder = self.backend.load_encoder() or load_embedder(self.settings.model)
        elif manifest.get("model") != embedder.name:
            raise IndexMismatch(f"The index in {where} was built with model {manifest.get('model')!r}, "
                                f"not {embedder.name!r}. {hint}")
        if embedder.dimension != manifest.get("dimension"):
            raise IndexMismatch(f"The index in {where} holds {manifest.get('dimension')}-d vectors but the model "
                                f"makes {embedder.dimension}-d ones. {hint}")
        self.embedder = embedder
        forbid_forks()  # a process that answers questions never forks (chunking.forbid_forks says why)
        self._prepared: tuple | None = None  # (vocabulary, {question: prepare(question)})
        self._titles: tuple | None = None  # (vocabulary, {article id: display_title})
        self.reranker = None
        if self.config.reranker:
            from .rerank import CrossEncoderReranker

            self.reranker = CrossEncoderReranker(self.config.reranker, self.config.rerank_top)

    # ------------------------------------------------------------------ articles
    @property
    def manifest(self) -> dict:
        return self.backend.manifest

    @property
    def model_name(self) -> str:
        return self.embedder.name

    @property
    def passage_count(self) -> int:
        return int(self.backend.passage_count)

    @property
    def vocabulary(self):
        return self.backend.vocabulary

    @property
    def article_count(self) -> int:
        return int(self.backend.article_count)

    def articles(self) -> list[Article]:
        return self.backend.articles()

    def catalog(self) -> list[ArticleInfo]:
        """Every article's id, source, title and date, without reading texts: what lists of articles show."""
        return self.backend.catalog()

    def article(self, article_id: str) -> Article:
        return self.backend.article(article_id)

    def article_info(self, article_id: str) -> ArticleInfo:
        """One article's entry without its text (title, date, story, ...): what citations and folding read."""
        return self.backend.article_info(article_id)

    TITLE_CACHE = 4096  # display titles remembered (per vocabulary, like ``prepare``)

    def display_title(self, article: Article | ArticleInfo | str) -> str:
        """The title to show for an article: its own, else its lead sentence shortened (``ingest.lead_title``).

        Never its file name or id: a list of hex file names tells a reader nothing. The lead is read from the
        index and remembered for the current vocabulary (a write or reload starts afresh), since lists show the
        same articles page after page.
        """
        info = self.article_info(article) if isinstance(article, str) else article
        if info.title and info.title.strip():
            return info.title
        if isinstance(info, ArticleInfo) and info.lead_title:  # stored at index time: nothing to read here
            return info.lead_title
        vocabulary = self.vocabulary
        memo = self._titles
        if memo is None or memo[0] is not vocabulary:
            memo = self._titles = (vocabulary, {})
        title = memo[1].get(info.id)
        if title is None:
            text = info.text if isinstance(info, Article) else self.backend.lead(info.id)
            title = lead_title(text) or UNTITLED
            if len(memo[1]) >= self.TITLE_CACHE:
                memo[1].clear()
            memo[1][info.id] = title
        return title

    def passage_count_for(self, article_id: str) -> int:
        return self.backend.passage_count_for(article_id)

    # ------------------------------------------------------------------ search
    def _passages(self, ids: Sequence[int]) -> dict[int, tuple[str, int, int, str]]:
        return self.backend.passages(ids)

    PREPARED_CACHE = 512  # questions whose spelling corrections are remembered (per vocabulary)

    def prepare(self, question: str) -> tuple[str, str]:
        """Return ``(dense_text, lexical_text)``: the question in the corpus's spellings, and with all variants.

        One answer needs this three times (search, answer sentences, the no-answer verdict) and each is a pass of
        regular expressions over the question, so results are remembered for the current vocabulary; a new
        vocabulary object (a reload, another PostgreSQL generation) starts a new memory
        (docs/decisions/hot-path-caches.md).
        """
        return self._prepared_entry(question)[:2]

    def spelling_variants(self, question: str) -> dict[str, tuple[str, ...]]:
        """Each folded word of ``question`` that the passages also spell otherwise -> those spellings
        ("araqchi" -> ("araghchi",)): what ``prepare`` added for BM25, by word (the no-answer coverage)."""
        return self._prepared_entry(question)[2]

    def _prepared_entry(self, question: str) -> tuple[str, str, dict[str, tuple[str, ...]]]:
        vocabulary = self.vocabulary
        memo = self._prepared
        if memo is None or memo[0] is not vocabulary:
            memo = self._prepared = (vocabulary, {})
        cached = memo[1].get(question)
        if cached is not None:
            return cached
        corrected, variants = vocabulary.correct(question, getattr(self.embedder, "known_words", frozenset()))
        extra = " ".join(v for options in variants.values() for v in options)
        by_word: dict[str, tuple[str, ...]] = {}
        for token, options in variants.items():
            by_word[fold(token)] = tuple(options)
            if "-" in token:  # "al-Hayyah" is also the words "al" and "hayyah"
                by_word[fold(token).rpartition("-")[2]] = tuple(dict.fromkeys(o.rpartition("-")[2] for o in options))
        result = (corrected, f"{corrected} {extra}".strip(), by_word)
        if len(memo[1]) >= self.PREPARED_CACHE:
            memo[1].clear()
        memo[1][question] = result
        return result

    def encode_questions(self, questions: Sequence[str]) -> np.ndarray:
        return self.embedder.encode(list(questions), batch_size=self.settings.batch_size)

    def _rank(self, question: str, qvec: np.ndarray, lexical_text: str, n: int, mode: str,
              selection) -> tuple[list[Candidate], dict[int, np.ndarray]]:
        cfg = self.config
        pool = max(cfg.candidates, n)
        want_mix = mode == "hybrid" and cfg.fusion == "convex"
        ev = self.backend.candidates(qvec, lexical_text, pool, mode, selection, want_mix,
                                     (cfg.sentence_bm25_weight, cfg.bigram_weight), cfg.background_docs)
        if not len(ev.pids):
            return [], {}
        pids, lex = ev.pids, ev.lexical
        sent_best = best_of_runs(ev.sentence_cosines)
        w = cfg.sentence_weight
        dense = (1 - w) * ev.passage_cosine + w * sent_best
        if mode == "dense":
            fused = dense.astype(np.float64)
        elif mode == "lexical":
            fused = lex.astype(np.float64)
        elif cfg.fusion == "convex":
            fused = fusion.convex_fusion(dense, ev.lexical_mix, cfg.alpha)
        else:
            fused = fusion.reciprocal_rank_fusion([dense, lex], [cfg.dense_weight, cfg.lexical_weight], cfg.rrf_k,
                                                  present=[np.ones(len(pids), bool), lex > 0])
        preference = date_preference(question, ev.dates)
        if preference is not None and mode == "hybrid":
            # A bonus the size of a few ranks: enough to order close calls, not to override relevance.
            spread = float(fused.max() - fused.min()) if len(fused) > 1 else 0.0
            fused = fused + cfg.date_boost * spread * preference
        # Only the best ``n`` are ever read (``build_hits`` considers as many), or the reranker's head if it is longer:
        # the cross-encoder may lift a candidate from beyond ``n`` into it.
        keep = max(n, self.reranker.top_n) if self.reranker is not None else n
        order = np.argsort(-fused, kind="stable")[:keep].tolist()
        ids, fused, dense, lex = pids[order].tolist(), fused[order].tolist(), dense[order].tolist(), lex[order].tolist()
        cands = [Candidate(*row) for row in zip(ids, fused, dense, lex)]
        if self.reranker is not None and cands:
            cands = self._rerank(question, cands)
        sims = {pid: ev.sentence_cosines[i] for pid, i in zip(ids, order)}
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
            group: fold overlapping windows, copies of one story and same-fact passages of other outlets into
                one result (the API's behaviour); evaluation of raw passage ranking may turn it off.
        """
        from ..answer import build_hits

        if mode not in MODES:
            raise InvalidRequest(f"Unknown mode {mode!r}; choose one of {', '.join(MODES)}.", code="invalid_mode")
        with self.backend.snapshot():
            selection = self.backend.selection(filters)
            prepared = [self.prepare(q) for q in questions]
            vectors = self.encode_questions([p[0] for p in prepared])
            out = []
            for question, (_dense_text, lexical_text), qvec in zip(questions, prepared, vectors):
                cands, sims = self._rank(question, qvec, lexical_text, max(k * 4, 20), mode, selection)
                out.append(build_hits(self, question, cands, sims, k, group=group))
        return out

    def ask(self, question: str, k: int = 5, filters: Filters | None = None, mode: str = "hybrid") -> dict:
        """Return the result structure shared by ``qa-service ask --json`` and the JSON API."""
        from ..answer import answerability

        started = time.perf_counter()
        with self.backend.snapshot():  # one consistent view for the search and the verdict
            hits = self.search(question, k, filters, mode)
            verdict = answerability(self, question, hits)
        return {"question": question, "mode": mode, "answerable": verdict.answerable,
                "answer_confidence": verdict.score,
                # names of the question no article mentions (each caps the confidence; ``answer.unfamiliar_names``)
                "names_not_in_articles": verdict.features.get("unfamiliar_names", []),
                "results": [h.to_dict() for h in hits],
                "took_ms": round((time.perf_counter() - started) * 1000, 3)}

    # helpers used by ``answer``
    def passage_sentences(self, pid: int) -> list[tuple[int, int, int]]:
        return self.backend.passage_sentences(pid)

    def sentence_vectors(self, sids: Sequence[int]) -> np.ndarray:
        return self.backend.sentence_vectors(sids)

    def citation(self, article_id: str, start: int, end: int) -> Citation:
        a = self.backend.article_info(article_id)  # no text: a citation carries offsets, not the article
        return Citation(a.id, a.source, a.title, a.date, start, end, a.source_url, a.outlet)

    def question_terms(self, question: str) -> list[str]:
        return analyze(self.prepare(question)[1])
