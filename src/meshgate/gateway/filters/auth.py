"""Authentication (JWT bearer tokens, API keys) and authorization (scopes, roles).

Answers 401 with ``WWW-Authenticate`` for missing or bad credentials and 403 for a
valid caller without permission. A JWT's signature is verified once: the verified
claims are cached by the token's exact bytes (bounded), and ``exp``/``nbf`` are
checked on every use, so that a repeated token costs a dictionary lookup instead of
an RSA verification. Algorithms are pinned per route: ``alg: none`` and a token
signed with a public key as an HMAC secret are refused. Tokens and keys are never
logged, and an API key never reaches the upstream (neither its header nor its query
parameter is forwarded).

Configured keys are loaded when the filter is built: a missing or unreadable key file,
text that is not a PEM public key, or a key that none of the route's algorithms can
use is a :class:`~meshgate.errors.ConfigError` naming the key's field.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any
from urllib.parse import unquote_to_bytes

import jwt

from meshgate.config.model import AuthSettings
from meshgate.gateway.contract import BuildContext, FilterExchange, Verdict, reply
from meshgate.gateway.filters._credentials import REALM, Identity, NoKey, Refused, challenge
from meshgate.gateway.filters._jwt import Jwt

__all__ = ["AuthFilter", "hash_api_key"]


def hash_api_key(key: str) -> str:
    """How an API key is stored in the configuration: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class AuthFilter:
    """A route's authentication and authorization.

    Raises:
        ConfigError: a JWT key cannot be loaded or used by the route's algorithms.
    """

    name = "auth"

    def __init__(self, settings: AuthSettings, ctx: BuildContext) -> None:
        self.settings = settings
        path = ctx.at("auth")
        self._jwt = Jwt(settings.jwt, f"{path}.jwt") if settings.jwt is not None else None
        api = settings.api_key
        self._api_header = api.header.lower().encode() if api and api.header else None
        self._api_query = api.query.encode() if api and api.query else None
        consumer_header = api.consumer_header if api else None
        self._consumer_header = consumer_header.encode() if consumer_header else None
        self._consumers: dict[str, Identity] = {}
        for name, consumer in (ctx.consumers or {}).items():
            line = b""
            if self._consumer_header is not None:
                line = self._consumer_header + b": " + name.encode() + b"\r\n"
            identity = Identity(name, frozenset(consumer.scopes), frozenset(consumer.roles), line)
            for key in consumer.api_keys:
                self._consumers[key.partition(":")[2]] = identity
        self._scopes = frozenset(settings.scopes)
        self._roles = frozenset(settings.roles)
        # Headers the gateway vouches for are never taken from the client.
        owned = [h.lower() for h in (settings.jwt.forward_claims.values() if settings.jwt else ())]
        if consumer_header:
            owned.append(consumer_header.lower())
        if api and api.header:
            # Like the query parameter, the key never reaches the upstream (nor its logs).
            owned.append(api.header.lower())
        if settings.jwt is not None and settings.jwt.strip_authorization:
            owned.append("authorization")
        self._owned = frozenset(o.encode() for o in owned)

    def request(self, exchange: FilterExchange) -> Verdict:
        token = api_key = None
        owned = self._owned
        spoofed = False
        for name, value in exchange.headers:
            low = name.lower()
            if low in owned:
                spoofed = True  # a header only the gateway may set (or strip)
            if low == b"authorization" and self._jwt is not None:
                scheme, _, rest = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    token = rest.strip()
            elif low == self._api_header:
                if api_key is not None:
                    # Which one the upstream would read is anyone's guess.
                    return reply(
                        exchange,
                        400,
                        "bad_api_key",
                        f"more than one {self.settings.api_key.header} header;"  # type: ignore[union-attr]
                        " send one key",
                    )
                api_key = value.strip()
        if self._api_query is not None:
            # Always taken out of the forwarded target, even when a header also
            # carries a key: the key never reaches the upstream.
            from_query = self._query_key(exchange)
            if api_key is None:
                api_key = from_query
        exchange.spoofed = spoofed
        try:
            if token is not None and self._jwt is not None:
                identity = self._jwt.cached(token, time.time())
                if identity is None:
                    return self._verify_jwt(exchange, token)
                return self._admit(exchange, identity)
            if api_key is not None:
                return self._admit(exchange, self._api_identity(api_key))
        except Refused as refused:
            return self._refuse(exchange, refused)
        if self.settings.anonymous:
            self._strip_owned(exchange, b"")
            return None
        return reply(
            exchange,
            401,
            "unauthorized",
            "this route needs credentials: " + self._wanted(),
            headers=b"WWW-Authenticate: " + REALM + b"\r\n",
        )

    def _wanted(self) -> str:
        wanted = []
        if self._jwt is not None:
            wanted.append("a bearer token (Authorization: Bearer <JWT>)")
        if self._api_header is not None:
            wanted.append(f"an API key in {self.settings.api_key.header}")  # type: ignore[union-attr]
        if self._api_query is not None:
            wanted.append(f"an API key in the {self._api_query.decode()} query parameter")
        return " or ".join(wanted)

    def _verify_jwt(self, exchange: FilterExchange, token: bytes) -> Verdict:
        jwt_auth = self._jwt
        assert jwt_auth is not None  # noqa: S101 - checked by the caller
        try:
            header = jwt.get_unverified_header(token.decode("ascii", "replace"))
        except jwt.PyJWTError as exc:
            return self._refuse(
                exchange,
                Refused(401, "invalid_token", f"malformed token: {exc}", challenge("invalid")),
            )
        alg = header.get("alg")
        if alg not in jwt_auth.algorithms:
            return self._refuse(
                exchange,
                Refused(
                    401,
                    "invalid_token",
                    f"tokens signed with {alg!r} are not accepted here",
                    challenge("invalid"),
                ),
            )
        kid = header.get("kid")
        kid = kid if isinstance(kid, str) else None
        keyset = jwt_auth.keys
        keys = keyset.candidates(kid, alg)
        if (not keys and keyset.may_fetch()) or keyset.stale():
            return self._fetch_then_verify(exchange, token, kid, alg)
        try:
            identity = jwt_auth.verify(token, keys)
        except NoKey as refused:
            # A kid that no key has may be one the issuer has just rotated in, even
            # when the configured keys without a kid were tried: fetch the JWKS again
            # (no more often than jwks_min_refresh).
            if kid is not None and not keyset.knows(kid) and keyset.may_fetch():
                return self._fetch_then_verify(exchange, token, kid, alg, refused)
            return self._refuse(exchange, refused)
        except Refused as refused:
            return self._refuse(exchange, refused)
        jwt_auth.remember(token, identity)
        return self._admit(exchange, identity)

    async def _fetch_then_verify(
        self,
        exchange: FilterExchange,
        token: bytes,
        kid: str | None,
        alg: str,
        refused: Refused | None = None,
    ) -> bytes | None:
        """Fetch the JWKS, then verify; ``refused`` is the answer when the keys at
        hand failed already and the fetch brought no key of ``kid``."""
        jwt_auth = self._jwt
        assert jwt_auth is not None  # noqa: S101
        await jwt_auth.keys.fetch()
        if refused is not None and kid not in jwt_auth.keys.fetched:
            return self._refuse(exchange, refused)
        return self._verified(exchange, token, jwt_auth.keys.candidates(kid, alg))

    def _verified(self, exchange: FilterExchange, token: bytes, keys: list[Any]) -> bytes | None:
        jwt_auth = self._jwt
        assert jwt_auth is not None  # noqa: S101
        try:
            identity = jwt_auth.verify(token, keys)
        except Refused as refused:
            return self._refuse(exchange, refused)
        jwt_auth.remember(token, identity)
        return self._admit(exchange, identity)

    def _api_identity(self, key: bytes) -> Identity:
        identity = self._consumers.get(hashlib.sha256(key).hexdigest())
        if identity is None:
            raise Refused(
                401,
                "invalid_api_key",
                "the API key is not valid",
                REALM + b', error="invalid_token", error_description="unknown API key"',
            )
        return identity

    def _query_key(self, exchange: FilterExchange) -> bytes | None:
        url = exchange.url
        q = url.find(b"?")
        if q < 0:
            return None
        prefix = self._api_query + b"="  # type: ignore[operator]
        found = None
        kept = []
        for param in url[q + 1 :].split(b"&"):
            if param.startswith(prefix):
                if found is None:
                    found = unquote_to_bytes(param[len(prefix) :])
            else:
                kept.append(param)
        if found is None:
            return None
        # The key never reaches the upstream (nor its logs): forward the target
        # without it.
        path = exchange.request_target().split(b"?", 1)[0]
        rest = b"&".join(kept)
        exchange.set_request_target(path + (b"?" + rest if rest else b""))
        return found

    def _admit(self, exchange: FilterExchange, identity: Identity) -> bytes | None:
        if self._scopes and not self._scopes <= identity.scopes:
            missing = ", ".join(sorted(self._scopes - identity.scopes))
            return reply(exchange, 403, "forbidden", f"the caller lacks the scope(s) {missing}")
        if self._roles and not self._roles & identity.roles:
            wanted = ", ".join(sorted(self._roles))
            return reply(exchange, 403, "forbidden", f"the caller needs one of the roles {wanted}")
        exchange.consumer = identity.subject
        self._strip_owned(exchange, identity.lines)
        return None

    def _strip_owned(self, exchange: FilterExchange, lines: bytes) -> None:
        owned = self._owned
        if not exchange.spoofed:
            # Nothing to remove (the usual case): just add the identity's lines.
            if lines:
                exchange.append_request_lines(lines)
            return

        def rewrite(block: bytes) -> bytes:
            if owned:
                kept = [
                    line
                    for line in block.split(b"\r\n")
                    if line and line.split(b":", 1)[0].strip().lower() not in owned
                ]
                block = b"\r\n".join(kept) + b"\r\n" if kept else b""
            return block + lines

        exchange.rewrite_request_headers(rewrite)

    def _refuse(self, exchange: FilterExchange, refused: Refused) -> bytes:
        headers = b"WWW-Authenticate: " + refused.challenge + b"\r\n" if refused.challenge else b""
        return reply(exchange, refused.status, refused.error, refused.detail, headers=headers)
