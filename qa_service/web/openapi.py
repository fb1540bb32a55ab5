"""The OpenAPI 3.1 document, assembled from what the running code already uses so that it cannot drift.

Each view's ``@operation``, the pydantic models that validate requests (with the configured limits),
``schemas.QUERY_PARAMS`` and ``errors.ERROR_CODES``. Not spectree or flask-openapi3: each brings its own error body
and request hooks, around which the service's one error shape would need patching.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from flask import Flask
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .. import __version__
from .auth import OPEN_ENDPOINTS
from .errors import ERROR_CODES, error_body
from .schemas import QUERY_PARAMS, ErrorResponse

# Errors any request can meet; request bodies add their own.
COMMON_ERRORS = ("method_not_allowed", "internal_error", "overloaded")
# Answered by the HTTP server before the app sees the request (``server.write_error_body``): always JSON.
TRANSPORT_ERRORS = ("bad_request", "request_uri_too_large", "header_fields_too_large")
SECURITY_SCHEMES = {
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
               "description": "The service's QA_API_KEY. Writes always need it; reads only under "
                              "QA_REQUIRE_KEY_FOR_READ=1."},
    "bearer": {"type": "http", "scheme": "bearer", "description": "The same key as `Authorization: Bearer <key>`."},
}
BODY_ERRORS = ("unsupported_media_type", "body_too_large", "invalid_json", "body_not_object")


@dataclass(frozen=True)
class Operation:
    """What the OpenAPI document says about one view."""

    summary: str
    description: str = ""
    tag: str = "api"
    body: type[BaseModel] | Callable[[Flask], type[BaseModel]] | None = None
    query: bool = False  # takes the QUERY_PARAMS
    response: type[BaseModel] | None = None
    html: bool = False  # answers text/html instead of JSON
    errors: tuple[str, ...] = field(default_factory=tuple)
    security: bool = False  # needs the API key (writes); reads too under QA_REQUIRE_KEY_FOR_READ
    created: bool = False  # may answer 201 (with the response model) as well as 200


def operation(**kwargs) -> Callable:
    """Attach an ``Operation`` to a view function."""

    def attach(view):
        view.openapi = Operation(**kwargs)
        return view

    return attach


def _unwrap(schema: dict, defs: dict) -> dict:
    """Follow ``$ref`` and drop the ``null`` branch of an optional field."""
    schema = copy.deepcopy(schema)
    while True:
        if "$ref" in schema:
            extra = {k: v for k, v in schema.items() if k != "$ref"}
            schema = {**copy.deepcopy(defs[schema["$ref"].rsplit("/", 1)[-1]]), **extra}
            continue
        branches = [b for b in schema.get("anyOf", []) if b.get("type") != "null"]
        if "anyOf" in schema and len(branches) == 1:
            del schema["anyOf"]
            schema = {**branches[0], **schema}
            continue
        return schema


def _param_schema(model_schema: dict, path: tuple[str, ...], defs: dict) -> tuple[dict, bool]:
    """Return (schema, required) of the field at ``path`` of a model schema, as a query parameter."""
    schema = model_schema
    required = True
    for part in path:
        schema = _unwrap(schema, defs)
        required = required and part in schema.get("required", [])
        schema = schema["properties"][part]
    schema = _unwrap(schema, defs)
    schema.pop("title", None)
    if "default" in schema and schema["default"] is None:
        del schema["default"]
    return schema, required


def _error_responses(codes: tuple[str, ...], error_ref: dict, html: bool = False) -> dict:
    by_status: dict[int, list[str]] = {}
    for code in dict.fromkeys(codes):
        by_status.setdefault(ERROR_CODES[code][0], []).append(code)
    out = {}
    for status, group in sorted(by_status.items()):
        description = "Error codes: " + ", ".join(f"`{c}`" for c in group)
        content = {}
        if html:  # pages show the same code and message on an HTML error page
            content["text/html"] = {"schema": {"type": "string"}}
        if not html or any(c in TRANSPORT_ERRORS for c in group):
            content["application/json"] = {
                "schema": error_ref,
                "examples": {c: {"summary": ERROR_CODES[c][1], "value": error_body(c, ERROR_CODES[c][1])}
                             for c in group},
            }
        out[str(status)] = {"description": description, "content": content}
    return out


def build_openapi(app: Flask) -> dict[str, Any]:
    """Return the OpenAPI document for every route of ``app`` (static files excepted)."""
    ops = []
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint == "static" or rule.endpoint.endswith(".static"):
            continue
        view = app.view_functions[rule.endpoint]
        op: Operation | None = getattr(view, "openapi", None)
        if op is None:
            raise RuntimeError(f"route {rule.rule} has no @operation metadata")
        body = op.body(app) if op.body is not None and not isinstance(op.body, type) else op.body
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            ops.append((rule, method.lower(), op, body))

    inputs = {body for _, _, op, body in ops if body is not None}
    outputs = {op.response for _, _, op, _ in ops if op.response is not None} | {ErrorResponse}
    keyed = [(m, "validation") for m in sorted(inputs, key=lambda m: m.__name__)]
    keyed += [(m, "serialization") for m in sorted(outputs, key=lambda m: m.__name__)]
    refs, top = models_json_schema(keyed, ref_template="#/components/schemas/{model}")
    defs = top.get("$defs", {})
    error_ref = refs[(ErrorResponse, "serialization")]

    paths: dict[str, dict] = {}
    for rule, method, op, body in ops:
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        entry: dict[str, Any] = {"tags": [op.tag], "summary": op.summary,
                                 "operationId": f"{method}_{rule.endpoint.replace('.', '_')}"}
        if op.description:
            entry["description"] = op.description
        params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in sorted(rule.arguments)]
        codes = list(op.errors)
        settings = app.extensions["qa_service"].settings
        if op.security or (settings.require_key_for_read and rule.endpoint not in OPEN_ENDPOINTS):
            entry["security"] = [{"apiKey": []}, {"bearer": []}]
            codes += ["unauthorized"]
        if op.query:
            ask_model = body or app.extensions["qa_service"].ask_model
            model_schema = ask_model.model_json_schema(ref_template="#/components/schemas/{model}")
            local_defs = {**defs, **model_schema.get("$defs", {})}
            for name, field_path in QUERY_PARAMS.items():
                schema, required = _param_schema(model_schema, field_path, local_defs)
                param = {"name": name, "in": "query", "required": required and not op.html, "schema": schema,
                         "description": schema.pop("description", "")}
                if schema.get("type") == "array":
                    param.update(style="form", explode=True)
                params.append(param)
        if params:
            entry["parameters"] = params
        if body is not None:
            entry["requestBody"] = {"required": True,
                                    "content": {"application/json": {"schema": refs[(body, "validation")]}}}
            codes += BODY_ERRORS
        codes += COMMON_ERRORS + TRANSPORT_ERRORS
        if op.html:
            ok = {"description": "An HTML page.", "content": {"text/html": {"schema": {"type": "string"}}}}
        else:
            schema = refs[(op.response, "serialization")] if op.response is not None else {"type": "object"}
            ok = {"description": "Success.", "content": {"application/json": {"schema": schema}}}
        entry["responses"] = {"200": ok, **({"201": {**ok, "description": "Created."}} if op.created else {}),
                              **_error_responses(tuple(codes), error_ref, op.html)}
        paths.setdefault(path, {})[method] = entry

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "qa-service",
            "version": __version__,
            "description": (
                "Semantic question answering over news articles, with exact citations. Every error is "
                '`{"ok": false, "error": {"code": "<stable_snake_case>", "message": "<a sentence>"}}` '
                "with the matching HTTP status; unknown addresses answer 404 `not_found`."
            ),
        },
        "paths": paths,
        "components": {"schemas": defs, "securitySchemes": SECURITY_SCHEMES},
        "tags": [{"name": "api", "description": "JSON API"}, {"name": "pages", "description": "HTML pages"}],
        "x-error-codes": {code: {"status": status, "message": message}
                          for code, (status, message) in sorted(ERROR_CODES.items())},
    }
