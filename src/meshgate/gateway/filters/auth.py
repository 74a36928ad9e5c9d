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

import asyncio
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import jwt
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from meshgate.config.model import AuthSettings, JwtKeySettings, JwtSettings
from meshgate.errors import ConfigError, ConfigIssue
from meshgate.gateway.contract import BuildContext, FilterExchange, Verdict, reply

__all__ = ["AuthFilter", "hash_api_key"]

log = logging.getLogger("meshgate.gateway.auth")

_CACHE_SIZE = 10_000
_REALM = b'Bearer realm="meshgate"'


def hash_api_key(key: str) -> str:
    """How an API key is stored in the configuration: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class _Refused(Exception):  # noqa: N818 - control flow inside this module
    def __init__(self, status: int, error: str, detail: str, challenge: bytes = b"") -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.challenge = status, error, detail, challenge


class _NoKey(_Refused):
    """No key at hand verifies the token's signature (a JWKS fetch may bring one)."""


class _Identity:
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


def _claim_values(value: Any) -> list[str]:
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [str(v) for v in value]
    return []


def _header_value(value: Any) -> bytes | None:
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


class _KeySet:
    """Verification keys: configured ones, plus those fetched from a JWKS URL.

    Raises:
        ConfigError: a configured key cannot be loaded or used (every such key is
            listed, each by its path under ``path``, the route's ``...auth.jwt``).
    """

    def __init__(self, settings: JwtSettings, path: str) -> None:
        self.settings = settings
        self.static: dict[str | None, list[Any]] = {}
        issues: list[ConfigIssue] = []
        for index, key in enumerate(settings.keys):
            try:
                material = _load_key(key, f"{path}.keys[{index}]", settings.algorithms)
            except ConfigError as exc:
                issues.extend(exc.issues)
                continue
            self.static.setdefault(key.kid, []).append(material)
        if issues:
            raise ConfigError(issues)
        self.fetched: dict[str, Any] = {}
        self._fetched_at = 0.0
        self._fetching: asyncio.Task[None] | None = None

    def candidates(self, kid: str | None, alg: str | None = None) -> list[Any]:
        """Keys that may have signed a token with ``kid`` and ``alg``: only keys of the
        algorithm's type (an EC key is never tried on an RS256 token)."""
        if kid is not None:
            found = self.static.get(kid) or ([self.fetched[kid]] if kid in self.fetched else [])
            # A configured key without a kid matches any kid.
            keys = found or self.static.get(None, [])
        else:
            keys = [k for group in self.static.values() for k in group]
            keys += self.fetched.values()
        if alg is None:
            return keys
        kind = _KEY_TYPES[alg]
        return [k for k in keys if isinstance(k, kind)]

    def knows(self, kid: str) -> bool:
        """Whether a configured or fetched key has this ``kid``."""
        return kid in self.static or kid in self.fetched

    def stale(self) -> bool:
        url = self.settings.jwks_url
        return url is not None and time.monotonic() - self._fetched_at > self.settings.jwks_refresh

    def may_fetch(self) -> bool:
        return (
            self.settings.jwks_url is not None
            and time.monotonic() - self._fetched_at >= self.settings.jwks_min_refresh
        )

    async def fetch(self) -> None:
        """Fetch the JWKS (one fetch at a time; others wait for it)."""
        if self._fetching is None or self._fetching.done():
            self._fetching = asyncio.ensure_future(self._fetch())
        await asyncio.shield(self._fetching)

    async def _fetch(self) -> None:
        import httpx  # noqa: PLC0415 - only routes with a JWKS URL need it

        url = self.settings.jwks_url or ""
        self._fetched_at = time.monotonic()
        try:
            async with httpx.AsyncClient(timeout=5.0) as client:
                response = await client.get(url)
                response.raise_for_status()
                document = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("cannot fetch the JWKS at %s: %s", url, exc)
            return
        keys: dict[str, Any] = {}
        for jwk in document.get("keys", []) if isinstance(document, dict) else []:
            try:
                kid = jwk["kid"]
                keys[kid] = _load_jwk(jwk)
            except (KeyError, ValueError, TypeError, jwt.InvalidKeyError) as exc:
                log.warning("skipping a JWKS key from %s: %s", url, exc)
        self.fetched = keys


def _key_types() -> dict[str, type | tuple[type, ...]]:
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa  # noqa: PLC0415

    return {
        "HS256": bytes,
        "RS256": rsa.RSAPublicKey,
        "ES256": ec.EllipticCurvePublicKey,
        "EdDSA": (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey),
    }


_KEY_TYPES = _key_types()


def _load_pem(pem: str) -> Any:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key  # noqa: PLC0415

    data = pem.encode()
    if b"CERTIFICATE" in data:
        from cryptography.x509 import load_pem_x509_certificate  # noqa: PLC0415

        return load_pem_x509_certificate(data).public_key()
    return load_pem_public_key(data)


def _fail(path: str, message: str) -> ConfigError:
    return ConfigError([ConfigIssue(path, message)])


def _load_key(key: JwtKeySettings, path: str, algorithms: tuple[str, ...]) -> Any:
    """The verification key ``key`` configures (at ``path``), checked against the
    route's ``algorithms``; a :class:`ConfigError` says what is wrong with it."""
    from cryptography.exceptions import UnsupportedAlgorithm  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415

    if key.secret is not None:
        return key.secret.get_secret_value().encode()
    if key.file is not None:
        path += ".file"
        what = f"the file {key.file!r}"
        try:
            pem = Path(key.file).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise _fail(
                path,
                f"no such file {key.file!r}; check the path (a relative one is read from "
                "the gateway's working directory), or give the key inline with pem",
            ) from None
        except UnicodeDecodeError:
            raise _fail(
                path,
                f"{what} is not PEM text (a DER key? convert it: openssl pkey -pubin "
                "-inform DER -in key.der -out key.pem)",
            ) from None
        except OSError as exc:
            raise _fail(
                path,
                f"cannot read {key.file!r} ({exc.strerror or exc}); check the path and that "
                "the gateway may read it",
            ) from None
    else:
        path += ".pem"
        what = "the value"
        pem = key.pem or ""
    # The key text is never quoted: a private key pasted by mistake stays out of logs.
    if "PRIVATE KEY" in pem:
        raise _fail(
            path,
            f"{what} holds a private key; give only its public key (openssl pkey -in "
            "key.pem -pubout) and keep the private key with the token issuer",
        )
    try:
        material = _load_pem(pem)
    except (ValueError, UnsupportedAlgorithm):
        raise _fail(
            path,
            f"{what} is not a PEM public key or certificate; give the issuer's public key "
            "(-----BEGIN PUBLIC KEY-----) or its certificate (-----BEGIN CERTIFICATE-----)",
        ) from None
    fits = [alg for alg, kind in _KEY_TYPES.items() if isinstance(material, kind)]
    if not fits:
        raise _fail(
            path,
            f"{what} holds a {type(material).__name__}, which no JWT algorithm here uses; "
            "give an RSA, EC (P-256) or Ed25519 public key",
        )
    if fits[0] not in algorithms:
        raise _fail(
            path,
            f"{what} holds a key for {fits[0]}, but the route accepts only "
            f"{', '.join(algorithms)}; add {fits[0]} to jwt.algorithms, or give a key "
            "for those",
        )
    if isinstance(material, ec.EllipticCurvePublicKey) and not isinstance(
        material.curve, ec.SECP256R1
    ):
        raise _fail(
            path,
            f"{what} holds an EC key on {material.curve.name}, but ES256 verifies only "
            "P-256 (secp256r1) keys; give the issuer's P-256 key",
        )
    return material


def _load_jwk(jwk: dict[str, Any]) -> Any:
    kty = jwk.get("kty")
    text = json.dumps(jwk)
    if kty == "RSA":
        return RSAAlgorithm.from_jwk(text)
    if kty == "EC":
        return ECAlgorithm.from_jwk(text)
    if kty == "OKP":
        return OKPAlgorithm.from_jwk(text)
    raise ValueError(f"unsupported key type {kty!r}")


class _Jwt:
    def __init__(self, settings: JwtSettings, path: str) -> None:
        self.settings = settings
        self.keys = _KeySet(settings, path)
        self.algorithms = list(settings.algorithms)
        self.audience = list(settings.audience) or None
        self.require = ["exp", *settings.required_claims]
        self.forward = {claim: header.encode() for claim, header in settings.forward_claims.items()}
        self.cache: dict[bytes, _Identity] = {}

    def cached(self, token: bytes, now: float) -> _Identity | None:
        identity = self.cache.get(token)
        if identity is None:
            return None
        leeway = self.settings.leeway
        if now > identity.exp + leeway:
            raise _Refused(401, "invalid_token", "the token has expired", _challenge("expired"))
        if identity.nbf and now < identity.nbf - leeway:
            raise _Refused(401, "invalid_token", "the token is not valid yet", _challenge("nbf"))
        return identity

    def verify(self, token: bytes, keys: list[Any]) -> _Identity:
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
                raise _Refused(
                    401, "invalid_token", "the token has expired", _challenge("expired")
                ) from None
            except jwt.PyJWTError as exc:
                raise _Refused(
                    401, "invalid_token", f"the token is invalid: {exc}", _challenge("invalid")
                ) from None
            return self._identity(claims)
        detail = "no key verifies the token's signature" if last else "no key for the token"
        raise _NoKey(401, "invalid_token", detail, _challenge("signature"))

    def _identity(self, claims: dict[str, Any]) -> _Identity:
        lines = []
        for claim, header in self.forward.items():
            if claim in claims:
                value = _header_value(claims[claim])
                if value is not None:
                    lines.append(header + b": " + value + b"\r\n")
        scopes = frozenset(_claim_values(claims.get("scope")) + _claim_values(claims.get("scp")))
        sub = claims.get("sub")
        return _Identity(
            str(sub) if sub is not None else None,
            scopes,
            frozenset(_claim_values(claims.get("roles"))),
            b"".join(lines),
            float(claims.get("exp", 0)),
            float(claims.get("nbf", 0)),
        )

    def remember(self, token: bytes, identity: _Identity) -> None:
        cache = self.cache
        if len(cache) >= _CACHE_SIZE:
            # Evict the older half (dicts keep insertion order).
            for stale in list(cache)[: _CACHE_SIZE // 2]:
                del cache[stale]
        cache[token] = identity


def _challenge(kind: str) -> bytes:
    description = {
        "expired": "the token has expired",
        "nbf": "the token is not valid yet",
        "signature": "the signature does not verify",
        "invalid": "the token is invalid",
    }[kind]
    return _REALM + b', error="invalid_token", error_description="' + description.encode() + b'"'


class AuthFilter:
    """A route's authentication and authorization.

    Raises:
        ConfigError: a JWT key cannot be loaded or used by the route's algorithms.
    """

    name = "auth"

    def __init__(self, settings: AuthSettings, ctx: BuildContext) -> None:
        self.settings = settings
        path = ctx.at("auth")
        self._jwt = _Jwt(settings.jwt, f"{path}.jwt") if settings.jwt is not None else None
        api = settings.api_key
        self._api_header = api.header.lower().encode() if api and api.header else None
        self._api_query = api.query.encode() if api and api.query else None
        consumer_header = api.consumer_header if api else None
        self._consumer_header = consumer_header.encode() if consumer_header else None
        self._consumers: dict[str, _Identity] = {}
        for name, consumer in (ctx.consumers or {}).items():
            line = b""
            if self._consumer_header is not None:
                line = self._consumer_header + b": " + name.encode() + b"\r\n"
            identity = _Identity(name, frozenset(consumer.scopes), frozenset(consumer.roles), line)
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
        except _Refused as refused:
            return self._refuse(exchange, refused)
        if self.settings.anonymous:
            self._strip_owned(exchange, b"")
            return None
        return reply(
            exchange,
            401,
            "unauthorized",
            "this route needs credentials: " + self._wanted(),
            headers=b"WWW-Authenticate: " + _REALM + b"\r\n",
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
                _Refused(401, "invalid_token", f"malformed token: {exc}", _challenge("invalid")),
            )
        alg = header.get("alg")
        if alg not in jwt_auth.algorithms:
            return self._refuse(
                exchange,
                _Refused(
                    401,
                    "invalid_token",
                    f"tokens signed with {alg!r} are not accepted here",
                    _challenge("invalid"),
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
        except _NoKey as refused:
            # A kid that no key has may be one the issuer has just rotated in, even
            # when the configured keys without a kid were tried: fetch the JWKS again
            # (no more often than jwks_min_refresh).
            if kid is not None and not keyset.knows(kid) and keyset.may_fetch():
                return self._fetch_then_verify(exchange, token, kid, alg, refused)
            return self._refuse(exchange, refused)
        except _Refused as refused:
            return self._refuse(exchange, refused)
        jwt_auth.remember(token, identity)
        return self._admit(exchange, identity)

    async def _fetch_then_verify(
        self,
        exchange: FilterExchange,
        token: bytes,
        kid: str | None,
        alg: str,
        refused: _Refused | None = None,
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
        except _Refused as refused:
            return self._refuse(exchange, refused)
        jwt_auth.remember(token, identity)
        return self._admit(exchange, identity)

    def _api_identity(self, key: bytes) -> _Identity:
        identity = self._consumers.get(hashlib.sha256(key).hexdigest())
        if identity is None:
            raise _Refused(
                401,
                "invalid_api_key",
                "the API key is not valid",
                _REALM + b', error="invalid_token", error_description="unknown API key"',
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

    def _admit(self, exchange: FilterExchange, identity: _Identity) -> bytes | None:
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

    def _refuse(self, exchange: FilterExchange, refused: _Refused) -> bytes:
        headers = b"WWW-Authenticate: " + refused.challenge + b"\r\n" if refused.challenge else b""
        return reply(exchange, refused.status, refused.error, refused.detail, headers=headers)
