"""JWT verification keys: loaded from the configuration when the filter is built (a
bad key is a configuration error naming its field), and fetched from a JWKS URL (cached,
refetched for an unknown ``kid`` no more often than ``jwks_min_refresh``)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import jwt
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from meshgate.config.model import JwtKeySettings, JwtSettings
from meshgate.errors import ConfigError, ConfigIssue

__all__ = ["KeySet"]

log = logging.getLogger("meshgate.gateway.auth")


class KeySet:
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
