"""Dates named in questions ("in June 2024", "late January 2025", "in 2024") and how well an article's date fits."""

from __future__ import annotations

import calendar
import re
from datetime import MINYEAR, date
from typing import Sequence

import numpy as np

_MONTHS = {name.lower(): i for i, name in enumerate(calendar.month_name) if name}
_MONTHS.update({name.lower(): i for i, name in enumerate(calendar.month_abbr) if name})
_MONTHS["sept"] = 9
_MONTH_RE = "|".join(sorted(_MONTHS, key=len, reverse=True))
_MONTH_YEAR = re.compile(rf"\b(?:(early|mid|late)[- ])?({_MONTH_RE})\.?,?\s+(\d{{4}})\b", re.IGNORECASE)
_YEAR = re.compile(r"\b(?:in|during|of|from)\s+(19\d\d|20\d\d)\b", re.IGNORECASE)


def question_period(question: str) -> tuple[date, date] | None:
    """Return the period a question names, as inclusive ``(first_day, last_day)``, or None.

    A month of a year the calendar lacks ("January 0000") names no period.
    """
    m = next((m for m in _MONTH_YEAR.finditer(question) if int(m.group(3)) >= MINYEAR), None)
    if m:
        part, month, year = (m.group(1) or "").lower(), _MONTHS[m.group(2).lower()], int(m.group(3))
        last = calendar.monthrange(year, month)[1]
        lo, hi = {"early": (1, 10), "mid": (10, 20), "late": (20, last)}.get(part, (1, last))
        return date(year, month, lo), date(year, month, hi)
    m = _YEAR.search(question)
    if m:
        year = int(m.group(1))
        return date(year, 1, 1), date(year, 12, 31)
    return None


def date_preference(question: str, article_dates: Sequence[str | None]) -> np.ndarray | None:
    """Return per-candidate preference in [0, 1] for the period the question names (None if it names none).

    1 inside the period, falling linearly to 0 over 30 days outside it (news is often published a few days
    after the event); undated articles get 0.5, neither preferred nor pushed away (docs/decisions/date-preference.md).
    """
    period = question_period(question)
    if period is None:
        return None
    lo, hi = period
    out = np.full(len(article_dates), 0.5)
    for i, d in enumerate(article_dates):
        if not d:
            continue
        try:
            day = date.fromisoformat(d)
        except ValueError:
            continue
        if lo <= day <= hi:
            out[i] = 1.0
        else:
            gap = (lo - day).days if day < lo else (day - hi).days
            out[i] = max(0.0, 1.0 - gap / 30.0)
    return out


