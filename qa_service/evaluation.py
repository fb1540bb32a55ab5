"""Batch evaluation: read question files or BEIR folders, run them, score them with ir-measures, report.

Two input formats:

* **Question files** (JSON Lines, ``{"id", "question", "answers", "sources", "kind"}``), run against the
  seeds index. The retrieval unit is the passage: a passage is relevant when it comes from one of the
  question's ``sources`` and contains one of its ``answers`` after Unicode / quote / whitespace folding.
  In-process, every passage of the index is judged, so nDCG has its true ideal ranking ("exact"
  judgments); over HTTP the index cannot be read, so the passages retrieved by any mode of the run are
  judged ("pooled", the TREC way). ``recall@k`` is the share of answerable questions with a relevant
  passage in the top k (ir-measures' ``Success@k``).
* **BEIR folders** (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``). The corpus is indexed
  once into its own cached index directory, with the title as the first paragraph of the text so it is
  searchable. Passage hits are reduced to documents (a document ranks where its best passage ranks,
  "max-passage") and scored against the qrels with the standard ``R@k``.

All metric formulas come from ir-measures (pytrec_eval backend); this module only builds qrels and runs
and averages per-query values over *every* question (a question with no results scores 0). Run scores
handed to pytrec_eval are derived from ranks, so its tie-breaking can never reorder what the service
returned.

In-process, question files and BEIR corpora are scored on the raw passage ranking
(``search_many(..., group=False)`` where the Searcher groups results); ``--grouped`` scores the grouped
results the API shows instead (with pooled judgments). Over HTTP the API's own output is scored.

Questions are searched in batches through ``Searcher.search_many`` (embedded together). Latency is the
single-question path a user sees (``Searcher.ask`` in-process, one POST per question over HTTP), timed on
an evenly spaced sample in-process and on every question over HTTP.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import re
import sqlite3
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import numpy as np

from .config import Settings
from .errors import QAError
from .types import Article

logger = logging.getLogger(__name__)

CUTOFFS = (1, 3, 5, 10)
CURVE_CUTOFFS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 20, 30, 50)
METRIC_NAMES = tuple(f"recall@{k}" for k in CUTOFFS) + ("mrr@10", "ndcg@10")
DEFAULT_DEPTH = 100  # passages per question (question files; the cap for BEIR corpora)
MIN_BEIR_DEPTH = 30
BEIR_DEPTH_PER_PASSAGES_PER_DOC = 20  # BEIR: 20 x (passages per document), for >= 10 distinct documents
HTTP_DEPTH = 50  # the service caps k (Settings.max_k)
UNANSWERABLE_KIND = "unanswerable"


class EvaluationError(QAError):
    code = "evaluation_error"


class DatasetError(EvaluationError):
    """The question file or BEIR folder cannot be read."""

    code = "dataset_invalid"


class UnknownMode(EvaluationError):
    """A retrieval mode the Searcher (or service) does not offer."""

    code = "unknown_mode"


class ServiceError(EvaluationError):
    """The HTTP service could not be reached or answered with an error."""

    code = "service_error"
    status = 502


# --------------------------------------------------------------------------- datasets

@dataclass(frozen=True)
class Question:
    id: str
    text: str
    answers: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    kind: str = "unknown"

    @property
    def answerable(self) -> bool:
        return bool(self.answers)


@dataclass
class Dataset:
    """Questions plus what decides relevance: answers/sources (``questions``) or qrels (``beir``)."""

    name: str
    format: str  # "questions" | "beir"
    path: Path
    questions: list[Question]
    qrels: dict[str, dict[str, int]] | None = None  # beir only: query id -> doc id -> grade

    def answerable(self) -> list[Question]:
        if self.format == "beir":
            return list(self.questions)
        return [q for q in self.questions if q.answerable]


def _str_list(value, what: str, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DatasetError(f"{where}: {what!r} must be a list of strings.")
    return tuple(v for v in value if v.strip())


def load_questions(path: Path | str) -> Dataset:
    """Read a JSON Lines question file; raise ``DatasetError`` naming the bad line."""
    path = Path(path)
    questions: list[Question] = []
    seen: set[str] = set()
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path} is not UTF-8 text (invalid byte at offset {exc.start}).") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DatasetError(f"{where}: not valid JSON ({exc.msg}).") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: each line must be a JSON object.")
        text = row.get("question")
        if not isinstance(text, str) or not text.strip():
            raise DatasetError(f"{where}: \"question\" must be a non-empty string.")
        qid = str(row.get("id", f"line{lineno}"))
        if qid in seen:
            raise DatasetError(f"{where}: duplicate question id {qid!r}.")
        seen.add(qid)
        answers = _str_list(row.get("answers"), "answers", where)
        sources = _str_list(row.get("sources"), "sources", where)
        if answers and not sources:
            raise DatasetError(f"{where}: an answerable question needs \"sources\".")
        kind = row.get("kind") or (UNANSWERABLE_KIND if not answers else "unknown")
        questions.append(Question(qid, text.strip(), answers, sources, str(kind)))
    if not questions:
        raise DatasetError(f"{path} holds no questions.")
    return Dataset(path.stem, "questions", path, questions)


def _beir_files(folder: Path, split: str) -> tuple[Path, Path, Path]:
    corpus, queries, qrels = folder / "corpus.jsonl", folder / "queries.jsonl", folder / "qrels" / f"{split}.tsv"
    missing = [p.relative_to(folder).as_posix() for p in (corpus, queries, qrels) if not p.is_file()]
    if missing:
        raise DatasetError(f"{folder} is not a BEIR folder: missing {', '.join(missing)}.")
    return corpus, queries, qrels


def _read_jsonl(path: Path) -> Iterable[tuple[int, dict]]:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DatasetError(f"{path}, line {lineno}: not valid JSON ({exc.msg}).") from None
            if not isinstance(row, dict) or "_id" not in row:
                raise DatasetError(f"{path}, line {lineno}: expected an object with an \"_id\".")
            yield lineno, row


def load_beir(folder: Path | str, split: str = "test") -> Dataset:
    """Read a BEIR folder's qrels and the queries they judge (the corpus is read when indexing)."""
    folder = Path(folder)
    _, queries_path, qrels_path = _beir_files(folder, split)
    qrels: dict[str, dict[str, int]] = {}
    with open(qrels_path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.rstrip("\n").split("\t")
            if not line.strip():
                continue
            if len(parts) < 3 or not re.fullmatch(r"-?\d+", parts[-1].strip()):
                if lineno == 1:
                    continue  # header: query-id corpus-id score
                raise DatasetError(f"{qrels_path}, line {lineno}: expected 'query-id<TAB>corpus-id<TAB>score'.")
            qrels.setdefault(parts[0].strip(), {})[parts[1].strip()] = int(parts[-1])
    if not qrels:
        raise DatasetError(f"{qrels_path} holds no judgments.")
    texts, answers = {}, {}
    for _, row in _read_jsonl(queries_path):
        qid = str(row["_id"])
        texts[qid] = str(row.get("text") or "")
        metadata = row.get("metadata")
        gold = metadata.get("answers") if isinstance(metadata, dict) else None
        if isinstance(gold, list):  # SQuAD-style gold answer strings: they score the answer sentence
            answers[qid] = tuple(str(a) for a in gold if isinstance(a, str) and a.strip())
    missing = [qid for qid in qrels if qid not in texts]
    if missing:
        raise DatasetError(f"{queries_path} lacks {len(missing)} judged queries (e.g. {missing[0]!r}).")
    # qrels order, as BEIR; relevance stays the qrels' alone (answers only score answer sentences)
    questions = [Question(qid, texts[qid], answers.get(qid, ()), kind="beir") for qid in qrels]
    return Dataset(folder.name, "beir", folder, questions, qrels)


def load_dataset(path: Path | str, split: str = "test") -> Dataset:
    """Read ``path``: a BEIR folder or a JSON Lines question file."""
    path = Path(path)
    if path.is_dir():
        return load_beir(path, split)
    if path.is_file():
        return load_questions(path)
    raise DatasetError(f"{path} does not exist.")


def beir_articles(folder: Path | str) -> list[Article]:
    """Turn a BEIR corpus into ``Article`` records: id = ``_id``, text = title, blank line, text."""
    corpus = Path(folder) / "corpus.jsonl"
    if not corpus.is_file():
        raise DatasetError(f"{folder} has no corpus.jsonl.")
    articles: list[Article] = []
    seen: set[str] = set()
    for _, row in _read_jsonl(corpus):
        doc_id = str(row["_id"])
        title = " ".join(str(row.get("title") or "").split())
        body = str(row.get("text") or "").strip()
        # The title is its own paragraph, so it is searchable and packed with the first sentences.
        text = f"{title}\n\n{body}" if title and body else (title or body)
        if not text or doc_id in seen:
            logger.warning("skipped BEIR document %r: %s", doc_id, "duplicate id" if text else "empty")
            continue
        seen.add(doc_id)
        digest = hashlib.sha256(json.dumps([title, body], ensure_ascii=False).encode("utf-8")).hexdigest()
        articles.append(Article(id=doc_id, source=doc_id, title=title or None, date=None, text=text,
                                content_hash=digest))
    if not articles:
        raise DatasetError(f"{corpus} holds no documents.")
    return articles


def beir_index_dir(folder: Path | str, cache_root: Path | str, whole_documents: bool = False) -> Path:
    """Return ``cache_root/<name>-<corpus sha256[:12]>`` (``-whole`` added for whole-document passages).

    A new corpus gets a new folder, and the two ways of cutting it into passages each keep their own,
    so switching ``whole_documents`` back and forth never rebuilds either.
    """
    folder = Path(folder)
    h = hashlib.sha256()
    with open(folder / "corpus.jsonl", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return Path(cache_root) / f"{folder.name}-{h.hexdigest()[:12]}{WHOLE_DOCUMENT_SUFFIX if whole_documents else ''}"


# Whole-document passages (the MTEB/BEIR protocol: one vector per document, ``title + text`` cut by the
# model at its max_seq_length). The store caps passages at the model's window, so documents are packed
# into one passage by counting tokens as the model reads them (at most max_seq_length - 2 of any text);
# the encoder then truncates each document exactly as sentence-transformers does.
WHOLE_DOCUMENT_MAX_TOKENS = 1 << 20
WHOLE_DOCUMENT_SUFFIX = "-whole"


def whole_document_embedder(embedder):
    """Return a copy of ``embedder`` whose ``count_tokens`` counts only the tokens the model reads.

    With it every text fits one window, so chunking makes one passage per document (and never cuts a
    long sentence: the encoder truncates it). Encoding, the model and its ONNX export are unchanged.
    """
    import copy

    window = max(1, int(embedder.max_seq_length) - 2)  # [CLS] and [SEP] take two places
    count = embedder.count_tokens
    whole = copy.copy(embedder)
    whole.count_tokens = lambda text: min(count(text), window)
    whole.counts_add_up = False  # clipped counts do not add up
    return whole


def beir_settings_for(settings: Settings, index_dir: Path, whole_documents: bool = False) -> Settings:
    """Settings of a BEIR corpus's index: its own folder, and whole-document passages if asked."""
    if whole_documents:
        return settings.with_(index_dir=index_dir, max_tokens=WHOLE_DOCUMENT_MAX_TOKENS)
    return settings.with_(index_dir=index_dir)


def retrieval_config(settings: Settings, whole_documents: bool = False):
    """The Searcher's ``RetrievalConfig`` for an evaluation; None keeps the service's defaults.

    Whole documents are scored by the plain passage cosine (``sentence_weight=0``), as MTEB scores them,
    instead of mixing in the cosine of the document's best sentence.
    """
    if not whole_documents:
        return None
    from .retrieval.searcher import RetrievalConfig

    return RetrievalConfig(reranker=settings.reranker, sentence_weight=0.0)


def ensure_beir_index(folder: Path | str, settings: Settings, cache_root: Path | str, embedder=None,
                      progress: bool = False, whole_documents: bool = False) -> tuple[Settings, str]:
    """Index the BEIR corpus under ``cache_root`` unless a fresh build is there; return its settings and a note.

    Freshness is the store's own check (model, chunking settings, every document's hash), so a
    changed model or chunking rebuilds too.

    Args:
        whole_documents: one passage per document (see ``whole_document_embedder``), in its own folder.
    """
    from .articles import writer_lock
    from .store import build_index, index_status

    index_dir = beir_index_dir(folder, cache_root, whole_documents)
    beir_settings = beir_settings_for(settings, index_dir, whole_documents)
    articles = beir_articles(folder)
    each = ", one passage each" if whole_documents else ""
    with writer_lock(index_dir, timeout=None):  # two evaluations of one corpus build it once
        fresh, reason = index_status(beir_settings, articles)
        if fresh:
            return beir_settings, f"using cached index {index_dir} ({len(articles)} documents{each})"
        if embedder is None:  # torch only when there is something to embed
            from .embedding import load_embedder

            embedder = load_embedder(settings.model)
        if whole_documents:
            embedder = whole_document_embedder(embedder)
        logger.info("indexing %s into %s (%s)", folder, index_dir, reason)
        summary = build_index(articles, embedder, beir_settings, progress=progress)
    reused = f", vectors of {summary.reused_articles} reused" if getattr(summary, "reused_articles", 0) else ""
    return beir_settings, (f"indexed {summary.articles} documents, {summary.passages} passages into {index_dir} "
                           f"in {summary.seconds:.1f} s ({reason}{reused})")


# --------------------------------------------------------------------------- relevance

_QUOTES = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'", "\u00b4": "'", "`": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2212": "-",
    "\u00ad": None, "\u200b": None, "\ufeff": None,
})
_SPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Fold Unicode compatibility forms, curly quotes, dashes and runs of whitespace; keep case."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).translate(_QUOTES)).strip()


def _matches_source(question: Question, article_id: str, source: str) -> bool:
    return source in question.sources or article_id in question.sources


def passage_is_relevant(question: Question, article_id: str, source: str, text: str,
                        _normalized: tuple[str, ...] | None = None) -> bool:
    """True when the passage comes from one of the question's sources and contains one of its answers."""
    if not question.answers or not _matches_source(question, article_id, source):
        return False
    answers = _normalized if _normalized is not None else tuple(normalize_text(a) for a in question.answers)
    folded = normalize_text(text)
    return any(a and a in folded for a in answers)


def passage_docno(article_id: str, start: int, end: int) -> str:
    return f"{article_id}@{start}-{end}"


# --------------------------------------------------------------------------- backends

class Backend(Protocol):
    """Where questions go: a local ``Searcher`` or a running service."""

    name: str
    batched: bool

    def default_mode(self) -> str: ...

    def check_modes(self, modes: Sequence[str | None]) -> None: ...

    def search_many(self, questions: Sequence[str], k: int, mode: str | None) -> list[list[dict]]: ...

    def ask(self, question: str, k: int, mode: str | None) -> dict: ...


def _hit_dict(hit) -> dict:
    """The parts of a hit that evaluation reads (rank, score, text, citation).

    A ``Hit`` is read field by field instead of ``Hit.to_dict()``, which deep-copies answers and groups
    that scoring never looks at (0.6 ms of about 15 ms per SQuAD dev question at depth 41).
    """
    if isinstance(hit, dict):
        return hit
    c = hit.citation
    return {"rank": hit.rank, "score": hit.score, "text": hit.text, "answer": hit.extra.get("answer"),
            "citation": {"article_id": c.article_id, "source": c.source, "start": c.start, "end": c.end}}


class LocalBackend:
    """Runs questions through an in-process ``Searcher``; passes ``mode=`` only if the Searcher takes it.

    Args:
        grouped: score the grouped results the API shows (``group=True``, where the Searcher folds
            overlapping windows and same-fact passages into one result) instead of the raw passage
            ranking. BEIR runs always use the raw ranking: grouping would hide documents.
    """

    batched = True
    name = "in-process"

    def __init__(self, searcher, grouped: bool = False):
        self.searcher = searcher
        params = inspect.signature(searcher.search_many).parameters
        self._search_mode = "mode" in params
        self._ask_mode = "mode" in inspect.signature(searcher.ask).parameters
        self._extra = {"group": grouped} if "group" in params else {}
        # Exact judgments need hits that are the index's own passages, i.e. an ungrouped ranking.
        self.raw_passages = not (grouped and "group" in params)

    def default_mode(self) -> str:
        param = inspect.signature(self.searcher.search_many).parameters.get("mode")
        if param is not None and isinstance(param.default, str):
            return param.default
        return "dense"

    def offered_modes(self) -> tuple[str, ...] | None:
        """The modes the Searcher declares (``modes`` / ``MODES``), or None when it does not say."""
        if not self._search_mode:
            return ("dense",)
        for holder in (self.searcher, type(self.searcher), inspect.getmodule(type(self.searcher))):
            for attr in ("modes", "MODES"):
                value = getattr(holder, attr, None)
                if isinstance(value, (list, tuple, set, frozenset)) and value:
                    return tuple(value)
                if isinstance(value, dict) and value:
                    return tuple(value)
        return None

    def check_modes(self, modes: Sequence[str | None]) -> None:
        offered = self.offered_modes()
        for mode in modes:
            if mode is None:
                continue
            if offered is not None:
                if mode not in offered:
                    how = ("has no mode parameter, so it only does dense retrieval" if not self._search_mode
                           else f"offers {', '.join(offered)}")
                    raise UnknownMode(f"Unknown retrieval mode {mode!r}: this Searcher {how}.")
                continue
            try:  # the Searcher does not list its modes: ask it
                self.searcher.search_many(["mode probe"], k=1, mode=mode)
            except (QAError, ValueError, KeyError, TypeError) as exc:
                raise UnknownMode(f"Unknown retrieval mode {mode!r}: the Searcher refused it "
                                  f"({getattr(exc, 'message', None) or exc}).") from None

    def search_many(self, questions: Sequence[str], k: int, mode: str | None) -> list[list[dict]]:
        kwargs = {"mode": mode} if (mode is not None and self._search_mode) else {}
        hits_per_question = self.searcher.search_many(list(questions), k=k, **kwargs, **self._extra)
        return [[_hit_dict(h) for h in hits] for hits in hits_per_question]

    def ask(self, question: str, k: int, mode: str | None) -> dict:
        kwargs = {"mode": mode} if (mode is not None and self._ask_mode) else {}
        return self.searcher.ask(question, k=k, **kwargs)

    def passages_per_document(self) -> float | None:
        try:
            count = getattr(self.searcher, "article_count", None)  # a count, where the searcher keeps one
            if count is None:
                count = len(self.searcher.articles())
            return self.searcher.passage_count / max(1, count)
        except (AttributeError, TypeError):
            return None

    def all_passages(self) -> list[tuple[str, str, int, int, str]] | None:
        """Every passage of the index as ``(article_id, source, start, end, text)``, for exact judgments."""
        from .store import PASSAGES_DB

        build = self.searcher.manifest.get("_build_dir") if isinstance(getattr(self.searcher, "manifest", None), dict) else None
        if not build:
            return None
        try:
            con = sqlite3.connect(f"file:{Path(build) / PASSAGES_DB}?mode=ro", uri=True)
            try:
                return con.execute('SELECT p.article_id, a.source, p.start, p."end", p.text FROM passages p '
                                   "JOIN articles a ON a.id = p.article_id").fetchall()
            finally:
                con.close()
        except sqlite3.Error as exc:
            logger.warning("cannot read the index passages (%s); judging retrieved passages only", exc)
            return None


class HttpBackend:
    """Runs questions one by one against a service's ``POST /api/ask``."""

    batched = False

    def __init__(self, url: str, timeout: float = 60.0):
        url = url.rstrip("/")
        if not re.match(r"^https?://", url):
            raise EvaluationError(f"--url must start with http:// or https://, got {url!r}.")
        self.base = url
        self.endpoint = url if url.endswith("/api/ask") else url + "/api/ask"
        self.name = url
        self.timeout = timeout

    def default_mode(self) -> str:
        return "default"

    def check_modes(self, modes: Sequence[str | None]) -> None:
        for mode in modes:
            if mode is not None:
                try:
                    self.ask("mode probe", 1, mode)
                except ServiceError as exc:
                    if exc.status in (400, 422):
                        raise UnknownMode(f"Unknown retrieval mode {mode!r}: {exc.message}") from None
                    raise

    def ask(self, question: str, k: int, mode: str | None) -> dict:
        import urllib.error
        import urllib.request

        body = {"question": question, "k": k}
        if mode is not None:
            body["mode"] = mode
        request = urllib.request.Request(self.endpoint, data=json.dumps(body).encode("utf-8"), method="POST",
                                         headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            message = f"HTTP {exc.code}"
            try:
                err = json.loads(exc.read().decode("utf-8")).get("error") or {}
                message = f"{err.get('message') or message} ({err.get('code', exc.code)})"
            except (ValueError, AttributeError):
                pass
            raise ServiceError(f"The service at {self.base} answered with an error: {message}", status=exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServiceError(f"Cannot reach the service at {self.base} ({reason}). Is it running?") from None
        except ValueError:
            raise ServiceError(f"The service at {self.base} did not answer with JSON.") from None
        if not isinstance(payload, dict) or payload.get("ok") is False or not isinstance(payload.get("results"), list):
            err = payload.get("error") if isinstance(payload, dict) else None
            raise ServiceError(f"The service at {self.base} answered unexpectedly: "
                               f"{(err or {}).get('message') if isinstance(err, dict) else str(payload)[:200]}")
        return payload

    def search_many(self, questions: Sequence[str], k: int, mode: str | None) -> list[list[dict]]:
        return [self.ask(q, k, mode)["results"] for q in questions]


# --------------------------------------------------------------------------- running

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


# --------------------------------------------------------------------------- scoring

def _measures(dataset_format: str, cutoffs: Sequence[int] = CUTOFFS) -> dict[str, object]:
    import ir_measures

    hit_measure = ir_measures.Success if dataset_format == "questions" else ir_measures.R
    out: dict[str, object] = {f"recall@{k}": hit_measure @ k for k in cutoffs}
    out["mrr@10"] = ir_measures.RR @ 10
    out["ndcg@10"] = ir_measures.nDCG @ 10
    return out


def build_qrels(dataset: Dataset, runs: Sequence[ModeRun],
                passages: Sequence[tuple[str, str, int, int, str]] | None = None) -> tuple[dict[str, dict[str, int]], str]:
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
    import ir_measures

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


def default_depth(dataset: Dataset, backend: Backend) -> int:
    """Passages to retrieve per question when ``--depth`` is not given.

    BEIR runs need at least 10 distinct documents after max-passage: 20 times the corpus's passages
    per document does that (SciFact, 4.5 per abstract: 91; SQuAD paragraphs, 2.0: 41; checked with
    ``questions_under_10_docs``), without paying for 100 passages on corpora of short documents
    (on SQuAD dev, 41 instead of 100 moves nDCG@10 by 0.0005 and halves the run time).
    """
    if not backend.batched:
        return HTTP_DEPTH
    per_doc = backend.passages_per_document() if hasattr(backend, "passages_per_document") else None
    if dataset.format != "beir" or not per_doc:
        return DEFAULT_DEPTH
    return int(min(DEFAULT_DEPTH, max(MIN_BEIR_DEPTH, math.ceil(BEIR_DEPTH_PER_PASSAGES_PER_DOC * per_doc))))


def evaluate(dataset: Dataset, backend: Backend, modes: Sequence[str | None] = (None,), depth: int | None = None,
             batch_size: int = 128, latency_sample: int = 200, progress: bool = False) -> list[dict]:
    """Run ``dataset`` once per mode on the same questions; return one summary per mode."""
    if depth is None:
        depth = default_depth(dataset, backend)
    if depth < 1:
        raise EvaluationError("The retrieval depth must be at least 1.")
    modes = list(modes) or [None]
    labels = [m or backend.default_mode() for m in modes]
    if len(set(labels)) != len(labels):
        raise UnknownMode(f"A mode is listed twice: {', '.join(labels)}.")
    backend.check_modes(modes)
    runs = [run_mode(dataset, backend, m, depth, batch_size, latency_sample, progress) for m in modes]
    passages = (backend.all_passages() if dataset.format == "questions" and getattr(backend, "raw_passages", False)
                else None)
    qrels, judgments = build_qrels(dataset, runs, passages)
    return [summarize(dataset, run, qrels, judgments, backend.name, depth) for run in runs]


# --------------------------------------------------------------------------- reports

def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table_rows(summaries: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["metric"] + [s["mode"] for s in summaries]
    rows = [[name] + [_fmt(s["metrics"][name]) for s in summaries] for name in METRIC_NAMES]
    if any(s.get("answer_sentence", {}).get("n") for s in summaries):
        rows.append(["answer in sentence@1"] + [_fmt(s["answer_sentence"]["holds_answer"]) for s in summaries])
    rows.append(["latency p50 ms"] + [_fmt(s["latency_ms"]["p50"], 1) for s in summaries])
    rows.append(["latency p95 ms"] + [_fmt(s["latency_ms"]["p95"], 1) for s in summaries])
    rows.append(["questions/s (batched)" if summaries and summaries[0]["backend"] == "in-process" else "questions/s"]
                + [_fmt(s["questions_per_s"], 1) for s in summaries])
    if summaries and summaries[0]["format"] == "questions":
        rows.append(["unanswerable flagged"] + [_fmt(s["abstention"]["unanswerable_flagged"]) for s in summaries])
        rows.append(["answerable refused"] + [_fmt(s["abstention"]["answerable_refused_rate"]) for s in summaries])
    return header, rows


def _kind_rows(summaries: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    kinds = list(summaries[0]["by_kind"]) if summaries else []
    header = ["kind", "n"] + [f"{s['mode']} R@1/R@5/MRR" for s in summaries]
    rows = []
    for kind in kinds:
        row = [kind, str(summaries[0]["by_kind"][kind]["n"])]
        for s in summaries:
            m = s["by_kind"][kind]
            row.append("n/a" if m["recall@1"] is None else
                       f"{_fmt(m['recall@1'])}/{_fmt(m['recall@5'])}/{_fmt(m['mrr@10'])}")
        rows.append(row)
    return header, rows


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _title(summaries: Sequence[dict]) -> str:
    s = summaries[0]
    what = (f"{s['n']} questions ({s['n_answerable']} answerable, {s['abstention']['unanswerable']} unanswerable)"
            if s["format"] == "questions" else f"{s['n']} queries")
    unit = "passages" if s["format"] == "questions" else "documents (max-passage)"
    return (f"{s['dataset']}: {what}; {s['backend']}; top {s['depth']} passages, scored as {unit}, "
            f"{s['judgments']} judgments")


def format_table(summaries: Sequence[dict]) -> str:
    """Return the terminal report: one column per mode, plus the per-kind breakdown for question files."""
    parts = [_title(summaries), "", _text_table(*_table_rows(summaries))]
    if summaries and summaries[0]["by_kind"]:
        parts += ["", _text_table(*_kind_rows(summaries))]
    missing = summaries[0].get("no_relevant_passage") if summaries else None
    if missing:
        parts += ["", f"no passage in the index contains the answer of: {', '.join(missing)}"]
    return "\n".join(parts)


def format_markdown(summaries: Sequence[dict], chart: str | None = None) -> str:
    """Return report.md."""
    parts = [f"# Evaluation: {summaries[0]['dataset']}", "", _title(summaries) + ".", "",
             _md_table(*_table_rows(summaries))]
    if summaries[0]["by_kind"]:
        parts += ["", "## By kind", "", _md_table(*_kind_rows(summaries))]
    if summaries[0].get("no_relevant_passage"):
        parts += ["", "No passage in the index contains the answer of: " + ", ".join(summaries[0]["no_relevant_passage"])]
    if chart:
        parts += ["", f"![recall@k per mode]({chart})"]
    parts += ["", "recall@k: share of answerable questions with a relevant passage in the top k (Success@k)"
              if summaries[0]["format"] == "questions" else "recall@k: standard R@k over the qrels", ""]
    return "\n".join(parts)


def plot_recall_curves(summaries: Sequence[dict], path: Path | str) -> None:
    """Draw recall@k against k, one line per mode, into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    try:
        for s in summaries:
            points = [(int(k), v) for k, v in s["recall_curve"].items() if v is not None]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=s["mode"])
        ax.set_xscale("log")
        ticks = [int(k) for k in summaries[0]["recall_curve"] if int(k) in (1, 2, 3, 5, 10, 20, 50)] if summaries else []
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("k (passages)" if summaries and summaries[0]["format"] == "questions" else "k (documents)")
        ax.set_ylabel("recall@k")
        ax.set_title(f"{summaries[0]['dataset']}: recall@k" if summaries else "recall@k")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        _atomic_write(Path(path), lambda fh: fig.savefig(fh, format="png"), binary=True)
    finally:
        plt.close(fig)


def _atomic_write(path: Path, write, binary: bool = False) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def summary_json(summaries: Sequence[dict]) -> dict | list[dict]:
    """Return what ``--json`` prints: the summary of the one mode, or a list with several."""
    return summaries[0] if len(summaries) == 1 else list(summaries)


def write_report(summaries: Sequence[dict], out_dir: Path | str) -> list[Path]:
    """Write report.json, report.md and recall.png into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "report.json", out_dir / "report.md", out_dir / "recall.png"]
    _atomic_write(paths[0], lambda fh: json.dump(summary_json(summaries), fh, indent=2, ensure_ascii=False))
    _atomic_write(paths[1], lambda fh: fh.write(format_markdown(summaries, chart=paths[2].name)))
    plot_recall_curves(summaries, paths[2])
    return paths
