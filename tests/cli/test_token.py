"""``meshgate token``: a JWT that a route accepts."""

from __future__ import annotations

from pathlib import Path

import jwt
import pytest
from typer.testing import CliRunner

from meshgate.cli import app

SECRET = "token-test-secret-0123456789abcdef"

CONFIG = f"""\
gateway: {{listen: 127.0.0.1:0}}
upstreams:
  api: {{endpoints: ["127.0.0.1:9001"]}}
routes:
  - name: writes
    match: {{path_prefix: /w}}
    upstream: api
    auth:
      jwt:
        algorithms: [HS256]
        keys: [{{secret: "{SECRET}", kid: k1}}]
        issuer: shop
        audience: [api, other]
  - name: open
    match: {{path_prefix: /}}
    upstream: api
"""

runner = CliRunner()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(CONFIG)
    return path


def test_hs256_token_follows_the_route(config: Path) -> None:
    result = runner.invoke(
        app,
        [
            "token",
            str(config),
            "--route",
            "writes",
            "--sub",
            "alice",
            "--scope",
            "users:write",
            "--scope",
            "users:read",
            "--claim",
            "tenant=acme",
            "--ttl",
            "60",
        ],
    )
    assert result.exit_code == 0, result.output
    encoded = result.stdout.strip()
    assert jwt.get_unverified_header(encoded)["kid"] == "k1"
    claims = jwt.decode(encoded, SECRET, algorithms=["HS256"], audience="api", issuer="shop")
    assert claims["sub"] == "alice"
    assert claims["scope"] == "users:write users:read"
    assert claims["tenant"] == "acme"
    assert claims["exp"] - claims["iat"] == 60


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--route", "nope"], "has no route 'nope'; its routes: writes, open"),
        (["--route", "open"], "route 'open' does not take JWTs"),
        (["--route", "writes", "--claim", "novalue"], "write NAME=VALUE"),
        (["--route", "writes", "--key", "/nonexistent.pem"], "takes only HS256"),
    ],
)
def test_bad_input_is_named(config: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["token", str(config), *args])
    assert result.exit_code == 2
    assert message in " ".join(result.output.replace("│", " ").split())


def test_private_key_for_rs256(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key = tmp_path / "key.pem"
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    config = tmp_path / "rs.yaml"
    pem = public.decode().replace("\n", "\\n")
    config.write_text(
        CONFIG.replace("algorithms: [HS256]", "algorithms: [RS256]").replace(
            f'keys: [{{secret: "{SECRET}", kid: k1}}]', f'keys: [{{pem: "{pem}"}}]'
        )
    )
    result = runner.invoke(app, ["token", str(config), "--route", "writes", "--key", str(key)])
    assert result.exit_code == 0, result.output
    claims = jwt.decode(result.stdout.strip(), public, algorithms=["RS256"], audience="api")
    assert claims["iss"] == "shop"
    without = runner.invoke(app, ["token", str(config), "--route", "writes"])
    assert without.exit_code == 2
    assert "give the private key with --key" in " ".join(without.output.replace("│", " ").split())


def test_invalid_config_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("gateway: {listen: nowhere}\n")
    result = runner.invoke(app, ["token", str(path), "--route", "x"])
    assert result.exit_code == 1
    assert "gateway.listen" in result.output
