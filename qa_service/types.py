"""Records that cross module boundaries (articles, passages, filters, search hits), the search ``MODES``, and
``is_blank``, the one test of a question's text that the API, the form and the CLI share."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field

# The search modes every entry point offers (CLI, API, form): fused, vectors only, BM25 only.
MODES = ("hybrid", "dense", "lexical")


def is_blank(text: str) -> bool:
    """True when ``text`` shows nothing: only whitespace and invisible format characters (U+200B, U+FEFF, ...).

    ``str.strip`` keeps zero-width spaces and byte-order marks, so a question of only those would otherwise be
    searched as if it said something. Format characters inside real text (a ZWNJ in Persian) are left alone.
    """
    return all(ch.isspace() or unicodedata.category(ch) == "Cf" for ch in text)


@dataclass(frozen=True)
class Article:
    """One cleaned article; ``text`` is the exact text every citation slices into."""

    id: str
    source: str
    title: str | None
    date: str | None  # ISO "YYYY-MM-DD"
    text: str
    content_hash: str = ""  # sha256 of the raw file bytes (of the record, in a file of many), for staleness and upserts
    # Where the article came from, as the file or record said (each may be unknown); see ingest.
    source_url: str | None = None  # the original page, not the local copy
    outlet: str | None = None
    author: str | None = None
    story: str | None = None  # shared by syndicated copies of one story (ingest.syndication); None: its own
    # "headline" (read from the text), "metadata" (given by the file or record) or "lead": no headline, so the
    # title to show is the lead sentence shortened (ingest.lead_title) while ``title`` stays None.
    title_from: str | None = None


@dataclass(frozen=True)
class ArticleInfo:
    """What lists of articles show: an ``Article`` without its text (which may stay on disk until asked for)."""

    id: str
    source: str
    title: str | None
    date: str | None
    source_url: str | None = None
    outlet: str | None = None
    author: str | None = None
    story: str | None = None
    title_from: str | None = None
    # The title to show when there is no headline (``title`` None): ``ingest.lead_title`` of the text, stored
    # when the article is indexed so that lists need not read texts.
    lead_title: str | None = None

    @property
    def shown_title(self) -> str | None:
        """The headline, else the shortened lead: what a person sees as the article's title."""
        return self.title or self.lead_title


@dataclass(frozen=True)
class Passage:
    """A window of an article: ``article.text[start:end] == text``."""

    article_id: str
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class Filters:
    """Restrictions applied before ranking."""

    sources: tuple[str, ...] | None = None  # article ids or file names
    date_from: str | None = None
    date_to: str | None = None

    def is_empty(self) -> bool:
        return not self.sources and not self.date_from and not self.date_to


@dataclass
class Citation:
    article_id: str
    source: str
    title: str | None
    date: str | None
    start: int
    end: int
    source_url: str | None = None  # the original page; the service's own page with the passage is the hit's url
    outlet: str | None = None


@dataclass
class Hit:
    rank: int
    score: float
    text: str
    citation: Citation
    extra: dict = field(default_factory=dict)  # serialised with the hit (answer, also_reported_by, ...)
    signals: dict = field(default_factory=dict)  # internal evidence (answer-sentence cosine), not serialised

    def to_dict(self) -> dict:
        out = {"rank": self.rank, "score": round(float(self.score), 6), "text": self.text,
               "citation": dict(self.citation.__dict__)}  # flat fields: no need for asdict's deep copy
        out.update(self.extra)
        return out
