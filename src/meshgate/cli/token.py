"""``meshgate token FILE --route NAME``: a JWT that a route of a gateway accepts,
for trying a system out (the shop's demo writes) and for tests."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import jwt
import typer

from meshgate.cli.main import ConfigFile, app, err, out
from meshgate.config.loader import load
from meshgate.config.model import JwtSettings
from meshgate.errors import ConfigError

__all__ = ["token"]


def _jwt_of(file: Path, route: str) -> JwtSettings:
    try:
        config = load(file)
    except ConfigError as exc:
        err.print(str(exc), highlight=False)
        raise typer.Exit(1) from None
    found = next((r for r in config.routes if r.name == route), None)
    if found is None:
        names = ", ".join(r.name for r in config.routes) or "none"
        raise typer.BadParameter(f"{file} has no route {route!r}; its routes: {names}")
    settings = found.auth.jwt if found.auth is not None else None
    if settings is None:
        raise typer.BadParameter(f"route {route!r} does not take JWTs (routes[].auth.jwt)")
    return settings


@app.command()
def token(
    file: ConfigFile,
    *,
    route: Annotated[str, typer.Option(help="The route whose JWT settings to follow.")],
    sub: Annotated[str, typer.Option(help="The subject (who the token is for).")] = "demo",
    ttl: Annotated[int, typer.Option(help="Seconds until it expires.", min=1)] = 3600,
    scope: Annotated[list[str] | None, typer.Option(help="A scope to grant (repeatable).")] = None,
    claim: Annotated[
        list[str] | None, typer.Option(help="An extra claim NAME=VALUE (repeatable).")
    ] = None,
    key: Annotated[
        Path | None,
        typer.Option(help="A PEM private key, for routes that take RS256, ES256 or EdDSA."),
    ] = None,
) -> None:
    """Print a JWT that ROUTE of the gateway in FILE accepts: signed with its HS256
    secret (or --key), with its issuer and first audience, valid for --ttl seconds."""
    settings = _jwt_of(file, route)
    now = int(time.time())
    claims: dict[str, object] = {"sub": sub, "iat": now, "nbf": now, "exp": now + ttl}
    if settings.issuer is not None:
        claims["iss"] = settings.issuer
    if settings.audience:
        claims["aud"] = settings.audience[0]
    if scope:
        claims["scope"] = " ".join(scope)
    for item in claim or ():
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise typer.BadParameter(f"--claim {item!r}: write NAME=VALUE")
        claims[name] = value
    algorithm: str | None
    if key is not None:
        algorithm = next((a for a in settings.algorithms if a != "HS256"), None)
        if algorithm is None:
            raise typer.BadParameter(f"route {route!r} takes only HS256; drop --key")
        try:
            signing = key.read_text(encoding="utf-8")
        except OSError as exc:
            raise typer.BadParameter(f"--key {key}: {exc.strerror}") from None
    else:
        secret = next((k.secret for k in settings.keys if k.secret is not None), None)
        if secret is None or "HS256" not in settings.algorithms:
            raise typer.BadParameter(
                f"route {route!r} has no HS256 secret; give the private key with --key"
            )
        algorithm, signing = "HS256", secret.get_secret_value()
    kid = next((k.kid for k in settings.keys if k.kid is not None), None)
    try:
        encoded = jwt.encode(
            claims, signing, algorithm=algorithm, headers={"kid": kid} if kid else None
        )
    except (ValueError, TypeError, jwt.PyJWTError) as exc:
        raise typer.BadParameter(f"cannot sign with {algorithm}: {exc}") from None
    out.print(encoded, highlight=False, soft_wrap=True)
