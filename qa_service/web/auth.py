"""API keys: writes always need ``QA_API_KEY``; reading needs it too with ``QA_REQUIRE_KEY_FOR_READ=1``.

Without a configured key, writing is disabled (403 ``writes_disabled``), never open. A client sends the
key as ``X-API-Key: <key>`` or ``Authorization: Bearer <key>``; it is compared in constant time
(``hmac.compare_digest``) so response timing does not reveal how much of a guess was right. Keys are
never accepted in the query string, where they would end up in access logs and browser history.
"""

from __future__ import annotations

import hmac

from flask import request

from ..config import Settings
from ..errors import ConfigError, Unauthorized, WritesDisabled

MIN_KEY_LENGTH = 16
# Reachable without a key even when reading needs one: liveness probes, the API description, styles.
OPEN_ENDPOINTS = frozenset({"api.healthz", "api.openapi", "static"})
API_KEY_HEADER = "X-API-Key"


def check_security_settings(settings: Settings) -> None:
    """Raise ``ConfigError`` for settings that would leave the service open or guessable."""
    if settings.api_key is not None and len(settings.api_key) < MIN_KEY_LENGTH:
        raise ConfigError(f"QA_API_KEY is too short: use at least {MIN_KEY_LENGTH} random characters "
                          "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))').")
    if settings.require_key_for_read and not settings.api_key:
        raise ConfigError("QA_REQUIRE_KEY_FOR_READ is set but QA_API_KEY is not: set a key, or reading "
                          "would be impossible for everyone.")


def presented_key() -> str | None:
    """Return the key the request carries, if any."""
    key = request.headers.get(API_KEY_HEADER)
    if key:
        return key.strip()
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def key_matches(presented: str | None, expected: str) -> bool:
    if presented is None:
        return False
    return hmac.compare_digest(presented.encode("utf-8", "replace"), expected.encode("utf-8", "replace"))


def require_key(settings: Settings, write: bool) -> None:
    """Raise unless the request carries the configured key (for writes: unless one is configured at all)."""
    if not settings.api_key:
        if write:
            raise WritesDisabled("Writing articles is disabled: the service has no QA_API_KEY configured.")
        return
    if not key_matches(presented_key(), settings.api_key):
        action = "change articles" if write else "use this service"
        raise Unauthorized(f"An API key is needed to {action}: send it in the {API_KEY_HEADER} header "
                           "(or Authorization: Bearer).")
