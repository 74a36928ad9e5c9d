"""JWT bearer tokens: verified with the route's pinned algorithms and keys, and the
verified claims cached by the token's bytes (``exp``/``nbf`` still checked on every use),
so that a repeated token costs a lookup instead of a signature check."""

from __future__ import annotations

from typing import Any

import jwt

from meshgate.config.model import JwtSettings
from meshgate.gateway.filters._credentials import (
    Identity,
    NoKey,
    Refused,
    challenge,
    claim_values,
    header_value,
)
from meshgate.gateway.filters._jwks import KeySet

__all__ = ["Jwt"]

_CACHE_SIZE = 10_000


class Jwt:
    """A route's JWT settings, its keys, and the cache of verified tokens."""

    def __init__(self, settings: JwtSettings, path: str) -> None:
        self.settings = settings
        self.keys = KeySet(settings, path)
        self.algorithms = list(settings.algorithms)
        self.audience = list(settings.audience) or None
        self.require = ["exp", *settings.required_claims]
        self.forward = {claim: header.encode() for claim, header in settings.forward_claims.items()}
        self.cache: dict[bytes, Identity] = {}

    def cached(self, token: bytes, now: float) -> Identity | None:
        identity = self.cache.get(token)
        if identity is None:
            return None
        leeway = self.settings.leeway
        if now > identity.exp + leeway:
            raise Refused(401, "invalid_token", "the token has expired", challenge("expired"))
        if identity.nbf and now < identity.nbf - leeway:
            raise Refused(401, "invalid_token", "the token is not valid yet", challenge("nbf"))
        return identity

    def verify(self, token: bytes, keys: list[Any]) -> Identity:
        text = token.decode("ascii", "replace")
        settings = self.settings
        last: Exception | None = None
        for key in keys:
            try:
                claims = jwt.decode(
                    text,
                    key=key,
                    algorithms=self.algorithms,
                    audience=self.audience,
                    issuer=settings.issuer,
                    leeway=settings.leeway,
                    options={"require": self.require, "verify_aud": self.audience is not None},
                )
            except (jwt.InvalidSignatureError, jwt.InvalidKeyError, TypeError, ValueError) as exc:
                # Not this key (a library may reject a key of the wrong shape with
                # TypeError); the next one may verify it.
                last = exc
                continue
            except jwt.ExpiredSignatureError:
                raise Refused(
                    401, "invalid_token", "the token has expired", challenge("expired")
                ) from None
            except jwt.PyJWTError as exc:
                raise Refused(
                    401, "invalid_token", f"the token is invalid: {exc}", challenge("invalid")
                ) from None
            return self._identity(claims)
        detail = "no key verifies the token's signature" if last else "no key for the token"
        raise NoKey(401, "invalid_token", detail, challenge("signature"))

    def _identity(self, claims: dict[str, Any]) -> Identity:
        lines = []
        for claim, header in self.forward.items():
            if claim in claims:
                value = header_value(claims[claim])
                if value is not None:
                    lines.append(header + b": " + value + b"\r\n")
        scopes = frozenset(claim_values(claims.get("scope")) + claim_values(claims.get("scp")))
        sub = claims.get("sub")
        return Identity(
            str(sub) if sub is not None else None,
            scopes,
            frozenset(claim_values(claims.get("roles"))),
            b"".join(lines),
            float(claims.get("exp", 0)),
            float(claims.get("nbf", 0)),
        )

    def remember(self, token: bytes, identity: Identity) -> None:
        cache = self.cache
        if len(cache) >= _CACHE_SIZE:
            # Evict the older half (dicts keep insertion order).
            for stale in list(cache)[: _CACHE_SIZE // 2]:
                del cache[stale]
        cache[token] = identity
