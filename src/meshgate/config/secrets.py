"""Secret-bearing configuration fields, marked by type, and the masked view of a model.

A field whose value is a secret is typed so: ``SecretStr`` (tokens, HMAC secrets),
:data:`SecretURL` (a URL that may carry a password, such as a Redis URL) or
:data:`SecretValue` (a value that may be a credential, such as a header a rule adds).
:func:`public_dump` shows a configuration with every such value masked, by walking the
model's types, not by matching text that looks like a password.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import BaseModel, SecretStr

__all__ = ["MASK", "Secret", "SecretURL", "SecretValue", "mask_url", "public_dump", "secret_paths"]

MASK = "***"


class Secret:
    """Marks a configuration field as secret (``Annotated[str, Secret("url")]``)."""

    __slots__ = ("kind",)

    def __init__(self, kind: Literal["value", "url"] = "value") -> None:
        self.kind = kind

    def __repr__(self) -> str:
        return f"Secret({self.kind!r})"


SecretValue = Annotated[str, Secret("value")]
"""A value that may be a credential: shown as ``***``."""
SecretURL = Annotated[str, Secret("url")]
"""A URL that may carry a password (in its user info or its query): shown with the
password masked and the rest as written."""

_SECRET_QUERY = ("pass", "secret", "token", "key", "auth", "credential")


def mask_url(url: str) -> str:
    """``url`` with its password (``user:password@``, even one containing ``@``) and any
    secret-looking query value replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{host}" if colon else f"{user}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(any(word in k.lower() for word in _SECRET_QUERY) for k, _ in pairs):
            masked = [
                (k, MASK if any(word in k.lower() for word in _SECRET_QUERY) else v)
                for k, v in pairs
            ]
            query = urlencode(masked, safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _marker(annotation: Any, metadata: Any = ()) -> Secret | None:
    """The Secret marker of a field's type, looking through Optional and unions."""
    for item in metadata:
        if isinstance(item, Secret):
            return item
    origin = get_origin(annotation)
    if origin is Annotated:
        for item in get_args(annotation)[1:]:
            if isinstance(item, Secret):
                return item
        return None
    if origin is Union or origin is types.UnionType:
        for arg in get_args(annotation):
            found = _marker(arg)
            if found is not None:
                return found
    return None


def _element(annotation: Any, index: int) -> Any:
    """The type argument ``index`` of a (possibly optional) container annotation."""
    origin = get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        for arg in get_args(annotation):
            if arg is not type(None):
                return _element(arg, index)
        return Any
    args = get_args(annotation)
    if origin is Annotated:
        return _element(args[0], index)
    if len(args) > index:
        return args[index]
    return Any


def _walk(value: Any, dumped: Any, annotation: Any, metadata: Any = ()) -> Any:
    marker = _marker(annotation, metadata)
    if marker is not None and isinstance(value, str):
        return mask_url(value) if marker.kind == "url" else MASK
    if isinstance(value, SecretStr):
        return MASK
    if isinstance(value, BaseModel) and isinstance(dumped, dict):
        out = dict(dumped)
        for name, field in type(value).model_fields.items():
            if name in out:
                out[name] = _walk(getattr(value, name), out[name], field.annotation, field.metadata)
        return out
    if isinstance(value, dict) and isinstance(dumped, dict):
        inner = _element(annotation, 1)
        return {
            key: _walk(item, dumped.get(str(key), dumped.get(key)), inner)
            for key, item in value.items()
        }
    if isinstance(value, (tuple, list)) and isinstance(dumped, list):
        inner = _element(annotation, 0)
        return [_walk(item, shown, inner) for item, shown in zip(value, dumped, strict=False)]
    return dumped


def public_dump(model: BaseModel) -> Any:
    """``model`` as JSON data with every secret-typed value masked (``GET /config``)."""
    return _walk(model, model.model_dump(mode="json"), type(model))


def secret_paths(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, str]]:
    """Every field of ``model``'s type tree, as ``(path, kind)``: kind is ``url``,
    ``value`` or ``secretstr`` for secret fields, ``plain`` for the others."""
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        annotation = field.annotation
        marker = _marker(annotation, field.metadata) or _marker_deep(annotation)
        if marker is not None:
            yield path, marker.kind
        elif _mentions(annotation, SecretStr):
            yield path, "secretstr"
        else:
            yield path, "plain"
        for nested in _models_in(annotation):
            yield from secret_paths(nested, f"{path}.")


def _marker_deep(annotation: Any) -> Secret | None:
    """A Secret marker anywhere in ``annotation`` (the values of a dict, a tuple's items)."""
    found = _marker(annotation)
    if found is not None:
        return found
    for arg in get_args(annotation):
        found = _marker_deep(arg)
        if found is not None:
            return found
    return None


def _mentions(annotation: Any, kind: type) -> bool:
    if annotation is kind:
        return True
    return any(_mentions(arg, kind) for arg in get_args(annotation))


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    for arg in get_args(annotation):
        yield from _models_in(arg)
