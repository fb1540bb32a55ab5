"""From ranked passages to results: the answering sentence, syndicated copies folded into one result, same-fact
grouping across outlets, and whether the articles answer the question at all.

All of it works from what the index stored (sentence vectors, BM25 vocabulary); nothing is embedded here.
"""

from __future__ import annotations

import itertools
import math
import re
from functools import lru_cache
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .retrieval.lexical import _stopwords, analyze, background_idf, blended_idf, fold, words
from .types import Hit

if TYPE_CHECKING:  # pragma: no cover
    from .retrieval.searcher import Candidate, Searcher

# Two answer sentences from different articles whose vectors are this close report the same fact
# (docs/decisions/grouping.md).
SAME_FACT_COSINE = 0.80
_NUMBER = re.compile(r"\d[\d,.]*\d|\d")


def _numbers(text: str) -> set[str]:
    return {n.replace(",", "") for n in _NUMBER.findall(text)}


@lru_cache(maxsize=4096)
def _words(text: str) -> frozenset[str]:
    """The folded words of a passage with its title (``coverage``); cached like ``_terms``."""
    return frozenset(words(text))


@lru_cache(maxsize=65536)
def _terms(text: str) -> frozenset[str]:
    """The BM25 terms of a sentence; cached, since the same sentences come back question after question."""
    return frozenset(analyze(text))


# The answering sentence of a passage maximises: cosine to the question + ANSWER_OVERLAP_W x the share of the
# question's words it holds + ANSWER_TYPE_W if it holds what a when/who question asks for and the question does
# not (a time; a name) + ANSWER_NOVELTY_W x the share of its own words the question does not hold. The type and
# novelty terms keep a sentence on the question's topic from winning over the one that answers it; numbers get no
# typed bonus (docs/decisions/answer-sentence.md).
ANSWER_OVERLAP_W = 0.8
ANSWER_TYPE_W = 0.2
ANSWER_NOVELTY_W = 0.1
_WH_ENTITY = re.compile(r"^\s*(who|whom|whose)\b|\b(which|what) (\w+ ){0,3}(person|man|woman|leader|minister|president|"
                        r"official|group|organi[sz]ation|company|team|country|city|party|movement|player|author|"
                        r"king|queen)\b", re.I)
_CAPITALISED = re.compile(r"(?<!^)(?<![.!?]\s)\b[A-Z][a-z]+")  # a name's word, not a sentence's first


@dataclass(frozen=True)
class AskedFor:
    """What a question asks for, worked out once per question: its kind ("time", "entity" or None) and the
    lower-cased times or words it already holds."""

    kind: str | None
    held: frozenset[str]


def asked_for(question: str) -> AskedFor:
    """Classify ``question`` for ``answer_sentence_score``: a when-question, a who/which-person one, or neither."""
    if _WH_TIME.search(question):
        return AskedFor("time", frozenset(m.group(0).lower() for m in _TIME_EXPR.finditer(question)))
    if _WH_ENTITY.search(question):
        return AskedFor("entity", frozenset(w.lower() for w in re.findall(r"\w+", question)))
    return AskedFor(None, frozenset())


@lru_cache(maxsize=65536)
def _times_and_names(sentence: str) -> tuple[frozenset[str], frozenset[str]]:
    """The time expressions and capitalised (name) words of a sentence, lower-cased; cached like ``_terms``."""
    return (frozenset(m.group(0).lower() for m in _TIME_EXPR.finditer(sentence)),
            frozenset(m.group(0).lower() for m in _CAPITALISED.finditer(sentence)))


def answer_sentence_score(asked: AskedFor, qterms: set[str], sentence: str, cosine: float) -> float:
    """How well ``sentence`` answers the question (see ANSWER_OVERLAP_W); the highest of a passage is its answer."""
    terms = _terms(sentence)
    overlap = len(qterms & terms) / len(qterms) if qterms else 0.0
    novelty = len(terms - qterms) / len(terms) if terms else 0.0
    typed = 0.0
    if asked.kind is not None:
        times, names = _times_and_names(sentence)
        if (times if asked.kind == "time" else names) - asked.held:
            typed = ANSWER_TYPE_W
    return float(cosine) + ANSWER_OVERLAP_W * overlap + typed + ANSWER_NOVELTY_W * novelty


def build_hits(searcher: "Searcher", question: str, cands: list["Candidate"], sims: dict[int, np.ndarray],
               k: int, group: bool = True) -> list[Hit]:
    """Turn ranked candidates into at most ``k`` hits with answer sentences (and groups, if ``group``).

    Candidates are prepared (passage row, answering sentence, its vector) ``k`` at a time, as the loop below
    reaches them: most questions fill their ``k`` results from the first few, so the rest are never scored.
    With ``group``, copies of one syndicated story fold into the result of its best passage, also once ``k``
    results are found: the remaining candidates are looked through for copies only (``fold_story``).
    """
    qterms = set(searcher.question_terms(question))
    asked = asked_for(question)
    considered = cands[: max(4 * k, 20)]  # enough for k results after dropping overlaps and grouping
    rows = searcher._passages([c.pid for c in considered])
    stories: dict[str, str] = {}  # article id -> its story (its own id when it has none)

    def story_of(article_id: str) -> str:
        if article_id not in stories:
            stories[article_id] = searcher.article_info(article_id).story or article_id
        return stories[article_id]

    def prepare(cand: "Candidate"):
        article_id, start, end, text = rows[cand.pid]
        sentences = searcher.passage_sentences(cand.pid)
        # A passage is whole sentences, so each sentence is a slice of the passage's own text (the article's
        # text from ``start``): no article text is read here.
        cosines = sims.get(cand.pid)
        cosines = cosines.tolist() if cosines is not None else []
        best, best_score = 0, -math.inf
        for i, ((_, s, e), sim) in enumerate(zip(sentences, cosines or [0.0] * len(sentences))):
            score = answer_sentence_score(asked, qterms, text[s - start:e - start], sim)
            if score > best_score:  # the first of equal scores, as argmax
                best, best_score = i, score
        if not sentences:
            return cand, article_id, start, end, text, start, end, text, cand.dense, None
        sid, s, e = sentences[best]
        answer_cosine = cosines[best] if cosines else cand.dense
        return cand, article_id, start, end, text, s, e, text[s - start:e - start], answer_cosine, sid

    # Only candidates with a row, in order: a missing row (deleted meanwhile) ends the list, as it always has.
    ready = list(itertools.takewhile(lambda c: c.pid in rows, considered))

    def prepared_blocks():
        step = max(1, k)
        for first in range(0, len(ready), step):
            block = [prepare(cand) for cand in ready[first:first + step]]
            # The block's answer sentences' vectors (for grouping), fetched together: one lookup per block.
            wanted = [p[9] for p in block if p[9] is not None]
            vectors = dict(zip(wanted, searcher.sentence_vectors(wanted))) if group and wanted else {}
            for i, p in enumerate(block):
                yield first + i, p, vectors.get(p[9])

    def reported_by(article_id, start, end, text, s, e, answer_text, score) -> dict:
        citation = searcher.citation(article_id, start, end).__dict__.copy()
        citation.update({"text": text, "answer": {"text": answer_text, "start": s, "end": e},
                         "score": round(score, 6)})
        return citation

    hits: list[Hit] = []
    chosen: list[tuple[Hit, str, int, int, np.ndarray, set[str]]] = []  # hit, article, start, end, vec, numbers
    by_story: dict[str, list[Hit]] = {}  # story -> its results, best first
    seen = -1  # the last candidate looked at before ``k`` results were found
    for index, p, vec in prepared_blocks():
        seen = index
        cand, article_id, start, end, text, s, e, answer_text, answer_cosine, best_sid = p
        if group:
            if any(a == article_id and start < ce and cs < end for _, a, cs, ce, _, _ in chosen):
                continue  # an overlapping window of a passage already shown
            story = story_of(article_id)
            if story in by_story:
                folded = fold_story(by_story[story], article_id,
                                    lambda: reported_by(article_id, start, end, text, s, e, answer_text, cand.score))
                if folded is not False:
                    continue
            same = None
            for entry in chosen:
                if entry[1] != article_id and vec is not None and entry[4] is not None \
                        and float(entry[4] @ vec) >= SAME_FACT_COSINE:
                    same = entry
                    break
            if same is not None:
                other = same[0]
                other.extra.setdefault("also_reported_by", []).append(
                    {**reported_by(article_id, start, end, text, s, e, answer_text, cand.score), "same_story": False})
                figures = _numbers(answer_text)
                if figures and same[5] and figures != same[5]:
                    other.extra["figures_differ"] = True
                continue
        hit = Hit(len(hits) + 1, cand.score, text, searcher.citation(article_id, start, end),
                  {"answer": {"text": answer_text, "start": s, "end": e},
                   "scores": {"dense": round(cand.dense, 6), "lexical": round(cand.lexical, 6)}},
                  {"answer_cosine": answer_cosine})
        hit.extra["also_reported_by"] = []
        hits.append(hit)
        chosen.append((hit, article_id, start, end, vec, _numbers(answer_text)))
        if group:
            by_story.setdefault(story_of(article_id), []).append(hit)
        if len(hits) >= k:
            break
    if group and by_story:
        # The results are found; copies of their stories further down still belong under them.
        for cand in ready[seen + 1:]:
            article_id = rows[cand.pid][0]
            results = by_story.get(story_of(article_id))
            if results is None or all(h.citation.article_id == article_id for h in results):
                continue  # not a copy of a story shown (a passage of a shown article itself stays out)
            _, article_id, start, end, text, s, e, answer_text, _, _ = prepare(cand)
            if any(a == article_id and start < ce and cs < end for _, a, cs, ce, _, _ in chosen):
                continue
            fold_story(results, article_id,
                       lambda: reported_by(article_id, start, end, text, s, e, answer_text, cand.score))
    for hit in hits:
        hit.extra.setdefault("figures_differ", False)
    return hits


def fold_story(results: list[Hit], article_id: str, citation) -> bool | None:
    """Put a passage of ``article_id`` under a result of its story, as a copy: True when listed, None when that
    copy is already listed everywhere it could go (the passage is dropped), False when ``results`` are all of
    ``article_id`` itself (its own further passages stay results, as they always have).

    Copies of one syndicated story are one result, whatever their score: the first result of the story that
    comes from another article and does not list this one yet takes it (``citation()`` makes its entry).
    """
    others = [h for h in results if h.citation.article_id != article_id]
    if not others:
        return False
    for hit in others:
        listed = hit.extra.setdefault("also_reported_by", [])
        if not any(c.get("article_id") == article_id and c.get("same_story") for c in listed):
            listed.append({**citation(), "same_story": True})
            return True
    return None


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


# Logistic model of P(answerable | evidence), fitted on an off-corpus SQuAD split (half the Wikipedia
# articles indexed; questions about the other half are the unanswerable ones), never on the news dev
# questions: z = COVERAGE_W * coverage + COSINE_W * answer-sentence cosine + BIAS. Refit whenever the evidence
# changes (how sentence vectors or coverage are computed) with ``abstention.refit_on_split``
# (docs/decisions/no-answer-verdict.md).
COVERAGE_W, COSINE_W, BIAS = 7.65, 9.78, -7.93
# Refusing an answerable question costs more than showing passages for an unanswerable one (they are
# listed either way), so the threshold refuses at most 1% of the split's answerable questions.
THRESHOLD = 0.14
# The answer type may come from a lower result only if it scores at least this share of the best one's: a
# date in a passage about something else does not answer a when-question (docs/decisions/no-answer-verdict.md).
TYPE_SCORE_SHARE = 0.8


def answerability(searcher: "Searcher", question: str, hits: list[Hit]) -> Verdict:
    """Decide whether the top result answers ``question``.

    A similarity threshold alone cannot tell (on news, unanswerable questions score as high as
    answerable ones), so the verdict combines two kinds of evidence about the best result: how much of
    the question's informative vocabulary it holds (``coverage``, rarity-weighted) and how close its
    answering sentence is to the question; then it checks the answer's type: a question that asks
    when, how many, or "which <officials>" needs a sentence that supplies a time, a number or a name
    the question did not already state.
    """
    if not hits:
        return Verdict(False, 0.0, {"reason": "no passages"})
    top = hits[0]
    cov = coverage(searcher, question, top)
    cosine = float(top.signals.get("answer_cosine", 0.0))
    z = COVERAGE_W * cov + COSINE_W * cosine + BIAS
    probability = 1.0 / (1.0 + math.exp(-z))
    best = top.score
    sentences = [h.extra.get("answer", {}).get("text", h.text) for h in hits[:3]
                 if h is top or (best > 0 and h.score >= TYPE_SCORE_SHARE * best)]
    type_ok = answer_type_present(question, sentences)
    unfamiliar = unfamiliar_names(searcher, question)
    features = {"coverage": round(cov, 4), "answer_cosine": round(cosine, 4), "answer_type": type_ok,
                "unfamiliar_names": unfamiliar}
    # A missing answer type caps the confidence: the passages are on topic but do not say it. So does a name no
    # article mentions: the passages are about someone else.
    confidence = probability if type_ok and not unfamiliar else min(probability, 0.5 * THRESHOLD)
    return Verdict(confidence >= THRESHOLD, round(confidence, 4), features)


# A run of capitalised words in a question: a name ("Saudi Arabia's", "Yoav Gallant", "Newcastle"), not its first word.
_NAME_RUN = re.compile(r"(?<!^)(?<![.!?]\s)\b[A-Z][\w'’-]*(?:\s+(?:of\s+|al-|bin\s+)?[A-Z][\w'’-]*)*")
_ACRONYM = re.compile(r"(?:[A-Z]\.?){2,}(?:s|['’]s?)?")  # "ICC", "U.S.", "TDs", "IDF's"; not "O'Hara", "MacArthur"
_CALENDAR = frozenset("january february march april may june july august september october november december "
                      "monday tuesday wednesday thursday friday saturday sunday".split())


def _known_word(searcher: "Searcher", word: str, spellings: dict[str, tuple[str, ...]]) -> bool:
    """Is ``word`` (folded) in some passage, in another indexed spelling, or as the start of an indexed word?

    The prefix (all but the last three letters, at least four) lets a demonym find its country and back:
    "turkish" finds "turkey", "israeli" "israel", "lebanese" "lebanon", "iran" "iranian".
    """
    if searcher.vocabulary.counts.get(word, 0) or spellings.get(word):
        return True
    n = max(4, len(word) - 3)
    return len(word) >= n and searcher.vocabulary.has_prefix(word[:n])


def unfamiliar_names(searcher: "Searcher", question: str) -> list[str]:
    """Return the names in ``question`` that no indexed passage mentions: no word of the name, in any spelling.

    Articles that never mention Turkey cannot say what the Turkish president said, however well a passage about
    another president covers the rest of the question (the verdict's model sees how many words are found, not
    which). A name counts as mentioned when any of its words is ("Binyamin Netanyahu" by "Netanyahu"); months and
    weekdays (times, not names) and acronyms ("ICC", "TDs": a text may spell them out) are not checked
    (docs/decisions/name-check.md).
    """
    spellings = searcher.spelling_variants(question)
    stop = _stopwords()
    names = []
    for match in _NAME_RUN.finditer(searcher.prepare(question)[0]):
        tokens = [t for t in re.findall(r"[\w'’.-]+", match.group(0)) if not _ACRONYM.fullmatch(t)]
        checked = [w for t in tokens for w in words(t) if w not in stop and len(w) > 1 and w not in _CALENDAR]
        if checked and not any(_known_word(searcher, w, spellings) for w in checked):
            names.append(re.sub(r"['’]s?$", "", match.group(0)))  # "Saudi Arabia's" -> "Saudi Arabia"
    return names


def coverage(searcher: "Searcher", question: str, hit: Hit) -> float:
    """Return the idf-weighted share of the question's content words found in ``hit`` and its article's headline.

    An article without a headline lends its lead sentence instead, as BM25 reads it (``store.lexical_text``):
    a window that says "He stressed ..." is about the minister its lead names.

    The idf is blended with English's, as hybrid search's BM25 is (``lexical.blended_idf``): over a few
    articles "stand" or "say" occur nowhere and would count as the rarest words of "What does JCPOA stand
    for?" or "What did Araqchi say?", so a passage holding the name and the answer looked uncovered.
    """
    counts = searcher.vocabulary.counts
    n = max(1, searcher.passage_count)
    stop = _stopwords()
    corrected = searcher.prepare(question)[0]
    qwords = {w for w in words(corrected) if w not in stop and len(w) > 1}
    if not qwords:
        return 0.0
    text = hit.text + " " + (hit.citation.title or searcher.backend.lead(hit.citation.article_id))
    have, have_stems = _words(text), _terms(text)
    spellings = searcher.spelling_variants(question)  # "Araqchi" is found in a passage that writes "Araghchi"
    total = got = 0.0
    background_docs = searcher.config.background_docs
    for w in qwords:
        idf = blended_idf(math.log(1 + n / (1 + counts.get(w, 0))), background_idf(w), n, background_docs)
        total += idf
        stem = analyze(w)
        if w in have or (stem and stem[0] in have_stems) or any(v in have for v in spellings.get(w, ())):
            got += idf
    return got / total if total else 0.0


_AUX = {"did", "does", "do", "is", "are", "was", "were", "has", "have", "had", "will", "would", "can", "could"}
_NAME = re.compile(r"^[A-Z][\w’'-]+$")


def _focus(question: str) -> list[str] | None:
    """Return the noun phrase a "which/what X did ..." question asks about ("iranian security officials")."""
    tokens = question.split()
    if not tokens or tokens[0].lower() not in ("which", "what"):
        return None
    for i, tok in enumerate(tokens[1:6], 1):
        if tok.lower() in _AUX:
            return [fold(t).strip(",.?") for t in tokens[1:i]] if i > 1 else None
    return None


def _focus_named(question: str, focus: list[str], sentence: str) -> bool | None:
    """Does ``sentence`` put a name next to the focus phrase ("Foreign Minister Abbas Araghchi")?

    None when the sentence does not mention the focus at all.
    """
    tokens = sentence.split()
    folded = [fold(t).strip(",.;:\"“”()") for t in tokens]
    asked = set(words(question))
    n = len(focus)
    found = None
    for i in range(len(folded) - n + 1):
        if folded[i:i + n] != focus:
            continue
        found = False
        after = tokens[i + n] if i + n < len(tokens) else ""
        before = tokens[i - 1] if i > 0 else ""
        for cand in (after, before.rstrip(",")):
            word = cand.strip(",.;:\"“”()")
            if _NAME.match(word) and fold(word) not in asked:
                return True
        if fold(after) in ("such", "including", "named", "identified") or tokens[i + n - 1].endswith((",", ":")):
            return True
    return found


def answer_type_present(question: str, sentences: list[str]) -> bool:
    """Does some answering sentence supply what the question asks for (a time, a number, a name)?"""
    q = fold(question)
    if _WH_TIME.search(question):
        asked = {m.group(0).lower() for m in _TIME_EXPR.finditer(q)}
        return any(_times_and_names(fold(s))[0] - asked for s in sentences)
    if _WH_NUMBER.search(question):
        asked = _numbers(q)
        return any(_numbers(s) - asked or re.search(r"\b(one|two|three|four|five|six|seven|eight|nine|ten|dozens?|"
                                                     r"hundreds?|thousands?|millions?)\b", fold(s)) for s in sentences)
    focus = _focus(question)
    if focus:
        named = [_focus_named(question, focus, s) for s in sentences]
        # Sentences that restate the focus without naming it are on topic but do not answer.
        return any(named) or not any(v is False for v in named)
    return True
