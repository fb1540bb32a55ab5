"""From ranked passages to results: the answering sentence, same-fact grouping across outlets, and
whether the articles answer the question at all.

All of it works from what the index stored (sentence vectors, BM25 vocabulary); nothing is embedded here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .retrieval.lexical import _stopwords, analyze, fold, words
from .types import Hit

if TYPE_CHECKING:  # pragma: no cover
    from .retrieval.searcher import Candidate, Searcher

# Two answer sentences from different articles whose vectors are this close report the same fact.
SAME_FACT_COSINE = 0.80
_NUMBER = re.compile(r"\d[\d,.]*\d|\d")


def _numbers(text: str) -> set[str]:
    return {n.replace(",", "") for n in _NUMBER.findall(text)}


def _term_overlap(question_terms: set[str], text: str) -> float:
    if not question_terms:
        return 0.0
    return len(question_terms & set(analyze(text))) / len(question_terms)


def build_hits(searcher: "Searcher", question: str, cands: list["Candidate"], sims: dict[int, np.ndarray],
               k: int, group: bool = True) -> list[Hit]:
    """Turn ranked candidates into at most ``k`` hits with answer sentences (and groups, if ``group``)."""
    qterms = set(searcher.question_terms(question))
    rows = searcher._passages([c.pid for c in cands[: max(4 * k, 20)]])
    hits: list[Hit] = []
    chosen: list[tuple[Hit, str, int, int, np.ndarray, set[str]]] = []  # hit, article, start, end, vec, numbers
    for cand in cands:
        if len(hits) >= k or cand.pid not in rows:
            break
        article_id, start, end, text = rows[cand.pid]
        sids = list(searcher.passage_sentence_ids(cand.pid))
        # The answering sentence: closest to the question, nudged by shared words.
        sent_scores = []
        for sid, sim in zip(sids, sims.get(cand.pid, np.zeros(len(sids)))):
            s, e = searcher.sentence_span(sid)
            sent_text = searcher.article(article_id).text[s:e]
            sent_scores.append(float(sim) + 0.2 * _term_overlap(qterms, sent_text))
        best = int(np.argmax(sent_scores)) if sent_scores else 0
        s, e = searcher.sentence_span(sids[best]) if sids else (start, end)
        answer_text = searcher.article(article_id).text[s:e]
        vec = np.asarray(searcher.sentence_vectors[sids[best]]) if sids else None

        if group:
            if any(a == article_id and start < ce and cs < end for _, a, cs, ce, _, _ in chosen):
                continue  # an overlapping window of a passage already shown
            same = None
            for entry in chosen:
                if entry[1] != article_id and vec is not None and entry[4] is not None \
                        and float(entry[4] @ vec) >= SAME_FACT_COSINE:
                    same = entry
                    break
            if same is not None:
                other = same[0]
                citation = searcher.citation(article_id, start, end).__dict__.copy()
                citation.update({"text": text, "answer": {"text": answer_text, "start": s, "end": e},
                                 "score": round(cand.score, 6)})
                other.extra.setdefault("also_reported_by", []).append(citation)
                figures = _numbers(answer_text)
                if figures and same[5] and figures != same[5]:
                    other.extra["figures_differ"] = True
                continue
        hit = Hit(len(hits) + 1, cand.score, text, searcher.citation(article_id, start, end),
                  {"answer": {"text": answer_text, "start": s, "end": e},
                   "scores": {"dense": round(cand.dense, 6), "lexical": round(cand.lexical, 6)}})
        hit.extra["also_reported_by"] = []
        hits.append(hit)
        chosen.append((hit, article_id, start, end, vec, _numbers(answer_text)))
    for hit in hits:
        hit.extra.setdefault("figures_differ", False)
    return hits


# --------------------------------------------------------------------------- answerability

_WH_TIME = re.compile(r"^\s*(when\b|what (year|date|day|month|time)\b|on (which|what) (day|date|weekday)|"
                      r"in (which|what) (year|month))", re.I)
_WH_NUMBER = re.compile(r"^\s*(how (many|much|long|far|old|large|big|often)\b|what (percentage|number|amount)\b)", re.I)
_TIME_EXPR = re.compile(
    r"\b(\d{4}|\d{1,2}:\d{2}|(jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?|"
    r"(mon|tues|wednes|thurs|fri|satur|sun)day|yesterday|today|tomorrow|tonight|last (week|month|year|night)|"
    r"next (week|month|year)|(early|late|mid)[- ]\w+|century|decade|season|spring|summer|autumn|fall|winter|"
    r"\d+ (days?|weeks?|months?|years?) (ago|later|after|before))\b", re.I)


@dataclass
class Verdict:
    answerable: bool
    score: float
    features: dict = field(default_factory=dict)


# Minimum idf-weighted share of the question's words found in the best result (chosen on an off-corpus
# SQuAD split, not on the news dev questions; see README "No answer").
COVERAGE_THRESHOLD = 0.5


def answerability(searcher: "Searcher", question: str, hits: list[Hit]) -> Verdict:
    """Decide whether the top results answer ``question``.

    A similarity threshold cannot tell (unanswerable questions score as high as answerable ones), so the
    verdict looks at what the best results contain: the share of the question's informative words they
    hold (weighted by rarity in the index), and, for questions that ask for a time or a number, whether
    the answering sentence offers one that the question did not already state.
    """
    if not hits:
        return Verdict(False, 0.0, {"reason": "no passages"})
    score = max(coverage(searcher, question, h) for h in hits[:3])
    features = {"coverage": round(score, 4)}
    ok = score >= COVERAGE_THRESHOLD
    if ok:
        type_ok = answer_type_present(question, [h.extra.get("answer", {}).get("text", h.text) for h in hits[:3]])
        features["answer_type"] = type_ok
        ok = type_ok
    return Verdict(ok, score, features)


def coverage(searcher: "Searcher", question: str, hit: Hit) -> float:
    """Return the idf-weighted share of the question's content words found in ``hit`` (passage + title)."""
    counts = searcher.vocabulary.counts
    n = max(1, searcher.passage_count)
    stop = _stopwords()
    corrected = searcher.prepare(question)[0]
    qwords = {w for w in words(corrected) if w not in stop and len(w) > 1}
    if not qwords:
        return 0.0
    have = set(words(hit.text + " " + (hit.citation.title or "")))
    have_stems = set(analyze(hit.text + " " + (hit.citation.title or "")))
    total = got = 0.0
    for w in qwords:
        idf = math.log(1 + n / (1 + counts.get(w, 0)))
        total += idf
        if w in have or (analyze(w) and analyze(w)[0] in have_stems):
            got += idf
    return got / total if total else 0.0


def answer_type_present(question: str, sentences: list[str]) -> bool:
    """For time and number questions: does some answering sentence add a time or number the question lacks?"""
    q = fold(question)
    if _WH_TIME.search(question):
        asked = {m.group(0).lower() for m in _TIME_EXPR.finditer(q)}
        return any({m.group(0).lower() for m in _TIME_EXPR.finditer(fold(s))} - asked for s in sentences)
    if _WH_NUMBER.search(question):
        asked = _numbers(q)
        return any(_numbers(s) - asked or re.search(r"\b(one|two|three|four|five|six|seven|eight|nine|ten|dozens?|"
                                                     r"hundreds?|thousands?|millions?)\b", fold(s)) for s in sentences)
    return True
