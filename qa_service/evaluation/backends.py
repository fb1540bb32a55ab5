"""Where an evaluation's questions go: an in-process ``Searcher`` or a running service's ``POST /api/ask``."""

from __future__ import annotations

import inspect
import json
import logging
import re
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path
from typing import Protocol, Sequence

from ..errors import QAError
from .errors import EvaluationError, ServiceError, UnknownMode

logger = logging.getLogger(__name__)


class Backend(Protocol):
    """Where questions go: a local ``Searcher`` or a running service."""

    name: str
    batched: bool

    def default_mode(self) -> str: ...

    def check_modes(self, modes: Sequence[str | None]) -> None: ...

    def search_many(self, questions: Sequence[str], k: int, mode: str | None) -> list[list[dict]]: ...

    def ask(self, question: str, k: int, mode: str | None) -> dict: ...


def _hit_dict(hit) -> dict:
    """The parts of a hit that evaluation reads (rank, score, text, citation), field by field.

    ``Hit.to_dict()`` would deep-copy answers and groups that scoring never reads; see
    docs/decisions/evaluation-method.md.
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
        from ..store import PASSAGES_DB

        build = (self.searcher.manifest.get("_build_dir")
                 if isinstance(getattr(self.searcher, "manifest", None), dict) else None)
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
            raise ServiceError(f"The service at {self.base} answered with an error: {message}",
                               status=exc.code) from None
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
