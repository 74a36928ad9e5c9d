"""Service identity: each service-to-service call carries a short-lived token, signed
with the system's shared secret, naming the calling service and the one it calls.

The callee verifies the signature, the audience (itself) and the expiry, so that a
service can tell which service calls it and refuse others. Tokens are HS256 JWTs
(``iss``: the caller, ``aud``: the callee, ``exp``: a minute); a caller reuses one
until shortly before it expires, so signing costs nothing per call.
"""

from __future__ import annotations

import time

import jwt

from meshgate.errors import MeshgateError
from meshgate.service.errors import IdentityError

__all__ = ["IDENTITY_HEADER", "IdentityError", "IdentitySigner", "verify_identity"]

IDENTITY_HEADER = "X-Meshgate-Identity"
"""The header that carries the token (``Authorization`` stays the end user's)."""

_TTL = 60.0
_RENEW_BEFORE = 15.0
_LEEWAY = 5.0


def _check_secret(secret: str) -> str:
    if len(secret) < 32:
        raise MeshgateError(
            "the service secret is too short; use at least 32 characters "
            "(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return secret


class IdentitySigner:
    """Signs identity tokens for one calling service, reusing each until near expiry."""

    def __init__(self, caller: str, secret: str) -> None:
        self.caller = caller
        self._secret = _check_secret(secret)
        self._tokens: dict[str, tuple[str, float]] = {}

    def token(self, callee: str) -> str:
        """A token naming this service as the caller of ``callee``."""
        now = time.time()
        cached = self._tokens.get(callee)
        if cached is not None and cached[1] - now > _RENEW_BEFORE:
            return cached[0]
        expires = now + _TTL
        claims = {"iss": self.caller, "sub": self.caller, "aud": callee, "iat": int(now)}
        claims["exp"] = int(expires)
        token = jwt.encode(claims, self._secret, algorithm="HS256")
        self._tokens[callee] = (token, expires)
        return token


def verify_identity(token: str, *, audience: str, secret: str) -> str:
    """The calling service's name, from a token addressed to ``audience``.

    Raises:
        IdentityError: the token is not valid for ``audience`` (the message says why).
    """
    try:
        claims = jwt.decode(
            token,
            _check_secret(secret),
            algorithms=["HS256"],
            audience=audience,
            leeway=_LEEWAY,
            options={"require": ["iss", "aud", "exp"]},
        )
    except jwt.ExpiredSignatureError:
        raise IdentityError("the identity token has expired") from None
    except jwt.InvalidAudienceError:
        raise IdentityError(f"the identity token is not addressed to {audience!r}") from None
    except jwt.InvalidTokenError as exc:
        raise IdentityError(f"the identity token is invalid: {exc}") from None
    caller = claims.get("iss")
    if not isinstance(caller, str) or not caller:
        raise IdentityError("the identity token names no calling service")
    return caller
