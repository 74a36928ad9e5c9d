"""What the auth filter's parts share: a refusal with its challenge, and a verified
caller."""

from __future__ import annotations

from typing import Any

__all__ = ["REALM", "Identity", "NoKey", "Refused", "challenge", "claim_values", "header_value"]

REALM = b'Bearer realm="meshgate"'


class Refused(Exception):  # noqa: N818 - control flow of the auth filter, never escapes
    """A request the auth filter refuses: its status, code, detail and challenge."""

    def __init__(self, status: int, error: str, detail: str, challenge: bytes = b"") -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.challenge = status, error, detail, challenge


class NoKey(Refused):
    """No key at hand verifies the token's signature (a JWKS fetch may bring one)."""


class Identity:
    """A verified caller: who, what it may do, and the header lines that say so."""

    __slots__ = ("exp", "lines", "nbf", "roles", "scopes", "subject")

    def __init__(  # noqa: PLR0917 - a record, built in two places
        self,
        subject: str | None,
        scopes: frozenset[str],
        roles: frozenset[str],
        lines: bytes,
        exp: float = 0.0,
        nbf: float = 0.0,
    ) -> None:
        self.subject = subject
        self.scopes = scopes
        self.roles = roles
        self.lines = lines
        self.exp = exp
        self.nbf = nbf


def claim_values(value: Any) -> list[str]:
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [str(v) for v in value]
    return []


def header_value(value: Any) -> bytes | None:
    """A claim as a header value; None when it cannot be one safely."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str | int | float):
        text = str(value)
    elif isinstance(value, list) and all(isinstance(v, str | int) for v in value):
        text = ",".join(str(v) for v in value)
    else:
        return None
    if any(c in text for c in "\r\n\0") or not text.isprintable():
        return None
    return text.encode("utf-8")


def challenge(kind: str) -> bytes:
    description = {
        "expired": "the token has expired",
        "nbf": "the token is not valid yet",
        "signature": "the signature does not verify",
        "invalid": "the token is invalid",
    }[kind]
    return REALM + b', error="invalid_token", error_description="' + description.encode() + b'"'
