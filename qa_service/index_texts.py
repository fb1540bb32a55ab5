"""The texts an index is made of: what each passage and sentence vector is embedded from, and what BM25 reads.

A window from the middle of an article rarely names what the article is about, so its headline (else its lead
sentence) is put in front of it: docs/decisions/passage-context.md. Only the vectors and BM25 see that
context; the stored passage, its span and its citation are the article's text alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .types import Article, Passage

CONTEXT_CHARS = 300  # at most this much headline or lead (about 60 tokens), so the passage itself is not truncated


@dataclass
class Chunks:
    """Passages and the sentences they are made of (global sentence ids, inclusive ranges)."""

    passages: list[Passage]
    sentences: list[tuple[str, int, int]]  # (article_id, start, end)
    passage_sentences: list[tuple[int, int]]  # (first, last) sentence id of each passage


def _leads(chunks: Chunks) -> dict[str, tuple[int, int]]:
    lead: dict[str, tuple[int, int]] = {}
    for article_id, start, end in chunks.sentences:
        lead.setdefault(article_id, (start, end))
    return lead


def _context(article: Article, start: int, end: int, lead: tuple[int, int] | None) -> str:
    """The headline (else the lead sentence) to embed before ``article.text[start:end]``; "" when the span holds it."""
    title = (article.title or "").strip()
    if title and title not in article.text[start:end]:
        context = title
    elif not title and lead is not None and start > lead[0]:
        context = article.text[lead[0]:lead[1]].strip()
    else:
        context = ""
    if len(context) > CONTEXT_CHARS:
        context = context[:CONTEXT_CHARS].rsplit(" ", 1)[0]
    return context


def lexical_text(article: Article, start: int, end: int, lead: tuple[int, int] | None) -> str:
    """Return what BM25 reads for the passage ``article.text[start:end]``: its article's headline, else its lead.

    Unlike the vector's context (``_context``), every passage gets it, the one that already holds it included:
    there the words count twice, which ranks the window that states what the article is about first
    (docs/decisions/lexical-context.md).
    """
    context = article.title or (article.text[lead[0]:lead[1]].strip() if lead else "")
    return f"{context}\n{article.text[start:end]}"


def lexical_texts(chunks: Chunks, articles: Iterable[Article]) -> list[str]:
    """Return ``lexical_text`` of every passage of ``chunks``, in order."""
    by_id = {a.id: a for a in articles}
    lead = _leads(chunks)
    return [lexical_text(by_id[p.article_id], p.start, p.end, lead.get(p.article_id)) for p in chunks.passages]


def _with_context(chunks: Chunks, articles: Iterable[Article], spans: Iterable[tuple[str, int, int]]) -> list[str]:
    """Return each ``(article_id, start, end)`` span's text with its article's headline (else lead) in front.

    The headline is left off a span that already holds it, and the lead off a span that starts with it.
    """
    by_id = {a.id: a for a in articles}
    lead = _leads(chunks)
    out = []
    for article_id, start, end in spans:
        article = by_id[article_id]
        text = article.text[start:end]
        context = _context(article, start, end, lead.get(article_id))
        out.append(f"{context}\n{text}" if context else text)
    return out


def embedding_texts(chunks: Chunks, articles: Iterable[Article]) -> list[str]:
    """Return the text embedded for each passage: its article's headline (else its lead sentence), then the passage.

    The classic title-with-passage encoding of dense retrievers (DPR); a passage that already holds the headline
    or lead (the first window of an article) is embedded as it is.
    """
    return _with_context(chunks, articles, ((p.article_id, p.start, p.end) for p in chunks.passages))


def sentence_embedding_texts(chunks: Chunks, articles: Iterable[Article]) -> list[str]:
    """Return the text embedded for each sentence on its own: like a passage's, its headline (else lead) first.

    Used only for encoders that cannot pool (``store.embed_chunks``); normally a sentence's vector is pooled
    over these same words inside its passage (``sentence_groups``). Why sentences get the context too:
    docs/decisions/passage-context.md.
    """
    return _with_context(chunks, articles, chunks.sentences)


def sentence_groups(chunks: Chunks, articles: Iterable[Article]) -> list[list[tuple[tuple[int, int], ...]]]:
    """For each passage, the character ranges (in its ``embedding_texts`` text) each of its sentences is pooled from.

    A sentence's group is the sentence itself plus its article's headline, else its lead, as the passage's
    embedded text holds them: the sentence's ``sentence_embedding_texts`` text, read in the context of its
    whole passage ("late chunking") instead of alone.
    """
    by_id = {a.id: a for a in articles}
    lead = _leads(chunks)
    out = []
    for p, (first, last) in zip(chunks.passages, chunks.passage_sentences):
        article = by_id[p.article_id]
        context = _context(article, p.start, p.end, lead.get(p.article_id))
        base = len(context) + 1 if context else 0  # where the passage starts in its embedded text
        if context:
            inner = (0, len(context))
        else:  # the passage holds its article's headline, or starts with its lead (or has neither)
            title = (article.title or "").strip()
            at = p.text.find(title) if title else -1
            if at >= 0:
                inner = (at, at + len(title))
            elif not title and p.article_id in lead and p.start == lead[p.article_id][0]:
                inner = (0, lead[p.article_id][1] - p.start)
            else:
                inner = (0, 0)
        groups = []
        for k in range(first, last + 1):
            _, start, end = chunks.sentences[k]
            groups.append((inner, (base + start - p.start, base + end - p.start)))
        out.append(groups)
    return out
