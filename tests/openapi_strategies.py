"""Hypothesis strategies for the requests an OpenAPI document describes, and the
checks every answer of a meshgate service must pass.

Each value is drawn either from the parameter's schema (so that requests get past
validation and reach the handlers) or from anything at all of a JSON type (huge
integers, any text, wrong types, missing and extra fields), so that both the
handlers and the validation are exercised. Only what the SDK's services use of
JSON Schema is understood: types, bounds, lengths, patterns, enums, objects,
arrays, anyOf/oneOf/allOf and local $refs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from hypothesis import strategies as st

__all__ = ["Call", "Operation", "calls", "check_answer", "operations"]

PROBLEM_MEMBERS = ("type", "title", "status", "detail", "instance", "error", "request_id")
_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70).map(lambda i: i * 2**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
)
_anything = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
"""Any JSON value."""

_INT_EDGES = [
    -1,
    0,
    2**31 - 1,
    2**31,
    -(2**31) - 1,
    2**53 + 1,
    2**63 - 1,
    2**63,
    -(2**63) - 1,
    2**64,
    10**20,
    105828820558784692224,
]
"""Integers where storage and drivers change: 32 and 64 bits, doubles, and past them."""
_TEXT_EDGES = ["", " ", "\x00", "nul\x00byte", "\u202e", "😀" * 3, "a" * 300, "%00", "../.."]


@dataclass(frozen=True)
class Operation:
    """One operation of the document: its method, path template and description."""

    method: str
    path: str
    spec: dict[str, Any]

    @property
    def id(self) -> str:
        return f"{self.method.upper()} {self.path}"

    def documents(self, status: int) -> bool:
        responses = self.spec.get("responses", {})
        return str(status) in responses or "default" in responses


@dataclass(frozen=True)
class Call:
    """One request to make."""

    method: str
    url: str
    params: list[tuple[str, str]]
    content: bytes | None
    headers: dict[str, str]

    def send(self, client: httpx.Client) -> httpx.Response:
        return client.request(
            self.method, self.url, params=self.params, content=self.content, headers=self.headers
        )


def operations(document: dict[str, Any]) -> list[Operation]:
    """Every operation of ``document``, in document order."""
    return [
        Operation(method, path, spec)
        for path, item in document.get("paths", {}).items()
        for method, spec in item.items()
        if method in _METHODS
    ]


class _Schemas:
    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in schema:
            node: Any = self.document
            for part in schema["$ref"].removeprefix("#/").split("/"):
                node = node[part]
            schema = node
        return schema

    def valid(self, schema: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
        """Values that the schema admits (mostly: patterns are taken as Python's)."""
        schema = self.resolve(schema)
        if depth > 4:
            return st.none()
        if "enum" in schema:
            return st.sampled_from(schema["enum"])
        if "const" in schema:
            return st.just(schema["const"])
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return st.one_of([self.valid(s, depth + 1) for s in schema[key]])
        if "allOf" in schema:
            merged: dict[str, Any] = {}
            for part in schema["allOf"]:
                merged.update(self.resolve(part))
            return self.valid(merged, depth + 1)
        kind = schema.get("type")
        if kind == "integer":
            low, high = schema.get("minimum"), schema.get("maximum")
            bounded = st.integers(min_value=low, max_value=high)
            edges = [v for v in (low, high) if v is not None]
            return st.one_of(bounded, st.sampled_from(edges)) if edges else bounded
        if kind == "number":
            return st.floats(
                min_value=schema.get("minimum"),
                max_value=schema.get("maximum"),
                allow_nan=False,
                allow_infinity=False,
            )
        if kind == "boolean":
            return st.booleans()
        if kind == "null":
            return st.none()
        if kind == "string":
            low, high = schema.get("minLength", 0), schema.get("maxLength")
            if "pattern" in schema:
                found = st.from_regex(schema["pattern"], fullmatch=True)
                return found.filter(lambda s: len(s) >= low and (high is None or len(s) <= high))
            return st.text(min_size=low, max_size=min(high or 40, 40))
        if kind == "array":
            return st.lists(self.valid(schema.get("items", {}), depth + 1), max_size=3)
        if kind == "object" or "properties" in schema:
            properties = schema.get("properties", {})
            required = set(schema.get("required", ()))
            return st.fixed_dictionaries(
                {k: self.valid(v, depth + 1) for k, v in properties.items() if k in required},
                optional={
                    k: self.valid(v, depth + 1) for k, v in properties.items() if k not in required
                },
            )
        return _anything

    def wild(self, schema: dict[str, Any]) -> st.SearchStrategy[Any]:
        """Values of the schema's type just past its bounds, or at the limits of the
        machine's integers; anything at all for the other types."""
        schema = self.resolve(schema)
        kind = schema.get("type")
        if kind == "integer":
            edges = [*_INT_EDGES]
            edges += [schema[k] - 1 for k in ("minimum",) if k in schema]
            edges += [schema[k] + 1 for k in ("maximum",) if k in schema]
            return st.one_of(st.sampled_from(edges), st.integers())
        if kind == "string":
            high = schema.get("maxLength")
            longer = st.text(min_size=high + 1, max_size=high + 2) if high else st.text()
            return st.one_of(st.text(max_size=40), longer, st.sampled_from(_TEXT_EDGES))
        return _anything

    def value(self, schema: dict[str, Any]) -> st.SearchStrategy[Any]:
        """A valid value half of the time, a bad one of the right type or anything at
        all otherwise."""
        return st.one_of(self.valid(schema), self.valid(schema), self.wild(schema), _anything)

    def body(self, schema: dict[str, Any]) -> st.SearchStrategy[Any]:
        """A body: valid, anything, or a valid object with one field made bad, dropped,
        or one added."""
        schema = self.resolve(schema)
        properties = schema.get("properties", {})
        strategies = [self.valid(schema), self.valid(schema), _anything]
        if properties:
            names = sorted(properties)

            @st.composite
            def mutated(draw: st.DrawFn) -> Any:
                body = draw(self.valid(schema))
                name = draw(st.sampled_from(names))
                how = draw(st.sampled_from(("bad", "drop", "add")))
                if how == "bad":
                    body[name] = draw(self.wild(properties[name]))
                elif how == "drop":
                    body.pop(name, None)
                else:
                    body[draw(st.text(max_size=8))] = draw(_anything)
                return body

            strategies += [mutated(), mutated()]
        return st.one_of(strategies)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


@st.composite
def _call(draw: st.DrawFn, schemas: _Schemas, operation: Operation) -> Call:
    path = operation.path
    params: list[tuple[str, str]] = []
    headers: dict[str, str] = {}
    for given in operation.spec.get("parameters", ()):
        parameter = schemas.resolve(given)
        name, where = parameter["name"], parameter["in"]
        schema = parameter.get("schema", {})
        if where == "path":
            text = _text(draw(schemas.value(schema)))
            path = path.replace("{" + name + "}", quote(text, safe="") or "0")
        elif where == "query":
            if parameter.get("required") or draw(st.booleans()):
                params.append((name, _text(draw(schemas.value(schema)))))
        elif where == "header" and draw(st.booleans()):
            text = _text(draw(schemas.value(schema)))
            if text.isascii() and text.isprintable():
                headers[name] = text
    content: bytes | None = None
    body = operation.spec.get("requestBody", {}).get("content", {}).get("application/json")
    if body is not None:
        headers["content-type"] = "application/json"
        if draw(st.integers(0, 9)) == 0:
            content = draw(st.binary(max_size=20))  # not JSON, or not UTF-8
        else:
            content = json.dumps(draw(schemas.body(body.get("schema", {})))).encode()
    return Call(operation.method.upper(), path, params, content, headers)


def calls(document: dict[str, Any], operation: Operation) -> st.SearchStrategy[Call]:
    """Requests to ``operation`` of ``document``."""
    return _call(_Schemas(document), operation)


def check_answer(operation: Operation, call: Call, response: httpx.Response) -> None:
    """What every answer of a meshgate service must be: no server error, a status the
    operation documents, and every error an RFC 9457 problem with the request id."""
    status = response.status_code
    where = f"{call.method} {call.url} {call.params} {call.content!r} -> {status}"
    assert status < 500, f"{where}: {response.text[:500]}"
    assert operation.documents(status), f"{where}: status not in the OpenAPI document"
    if status < 400:
        return
    assert response.headers.get("content-type") == "application/problem+json", where
    body = response.json()
    missing = [m for m in PROBLEM_MEMBERS if m not in body]
    assert not missing, f"{where}: the problem lacks {missing}: {body}"
    assert body["status"] == status, where
    assert body["request_id"] == response.headers["x-request-id"], where
