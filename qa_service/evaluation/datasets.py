"""Evaluation inputs: JSON Lines question files and BEIR folders (corpus, queries, qrels).

A question file's relevance comes from each question's ``answers`` and ``sources``; a BEIR folder's from
its qrels. See docs/decisions/evaluation-method.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..types import Article
from .errors import DatasetError

logger = logging.getLogger(__name__)

UNANSWERABLE_KIND = "unanswerable"


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
