"""Opt-in performance tuning that reaches into other packages' internals, off unless named in ``QA_TUNING``.

Each tuning lives in its own module here, checks at start-up that the library hooks it needs are there (raising
``TuningUnavailable`` with a sentence otherwise, never falling back silently) and has a decision page:
``keepalive`` (docs/decisions/keepalive-worker.md), ``one_write`` (docs/decisions/one-write-responses.md),
``fast_path`` (docs/decisions/post-fast-path.md), ``encoder_cores``
(docs/decisions/encoder-threads-and-core-sharing.md); the setting as a whole: docs/decisions/opt-in-tuning.md. This
module imports nothing heavy, so ``config`` may use it.
"""

from __future__ import annotations

from ..errors import ConfigError

NAMES = ("keepalive", "one_write", "fast_path", "encoder_cores")
ALL = "all"


class TuningUnavailable(ConfigError):
    """A tuning was asked for, but the installed library no longer has the hook it needs."""

    code = "tuning_unavailable"
    status = 500


def parse_tuning(text: str) -> frozenset[str]:
    """``QA_TUNING``'s value (comma-separated names, or ``all``; empty: none) as a set of tuning names."""
    names = {part.strip().lower() for part in text.split(",") if part.strip()}
    if ALL in names:
        names = (names - {ALL}) | set(NAMES)
    unknown = sorted(names - set(NAMES))
    if unknown:
        raise ConfigError(f"QA_TUNING names an unknown tuning ({', '.join(unknown)}): use a comma-separated list "
                          f"of {', '.join(NAMES)}, or {ALL}, or leave it empty for none.")
    return frozenset(names)


def missing_hook(tuning: str, what: str) -> TuningUnavailable:
    """The error a tuning raises at start-up when the installed library lacks ``what``."""
    return TuningUnavailable(f"QA_TUNING asks for {tuning!r}, but {what}: this tuning does not fit the installed "
                             f"version. Remove {tuning!r} from QA_TUNING.")
