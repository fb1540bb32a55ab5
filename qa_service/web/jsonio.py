"""Flask's JSON provider with the encoding done by orjson, through the provider's public ``dumps``.

The output is Flask's compact JSON, same keys, order and values, UTF-8 rather than escapes; what orjson cannot
encode goes to Flask's ``default``, and calls with other options (``indent``, ``sort_keys``) keep Flask's encoder
(docs/decisions/orjson-provider.md).
"""

from __future__ import annotations

from typing import Any

import orjson
from flask.json.provider import DefaultJSONProvider

# Dates and dataclasses go to Flask's ``default`` (HTTP dates, as Flask writes them) instead of orjson's ISO.
_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
_COMPACT = (",", ":")  # the separators Flask's ``response`` asks for when it is not indenting


class OrjsonProvider(DefaultJSONProvider):
    """``app.json`` for the service: compact, key order kept, non-ASCII written as UTF-8."""

    sort_keys = False
    ensure_ascii = False

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        if kwargs and kwargs != {"separators": _COMPACT}:
            return super().dumps(obj, **kwargs)
        return orjson.dumps(obj, default=self.default, option=_OPTIONS).decode("utf-8")

    def encode(self, obj: Any) -> bytes:
        """``obj`` as the body Flask's ``response`` sends for it (compact JSON and a newline)."""
        return orjson.dumps(obj, default=self.default, option=_OPTIONS | orjson.OPT_APPEND_NEWLINE)
