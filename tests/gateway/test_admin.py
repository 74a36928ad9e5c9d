"""The admin API's helpers (its endpoints are tested end to end in tests/e2e)."""

from __future__ import annotations

import json
import re

import pytest

from meshgate.config import Config, loads
from meshgate.config.secrets import mask_url, public_dump, secret_paths
from meshgate.gateway.filters.auth import hash_api_key


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@10.0.0.5:6379/0", "redis://:***@10.0.0.5:6379/0"),
        ("rediss://app:pa:ss@cache.internal/1", "rediss://app:***@cache.internal/1"),
        ("redis://:p@ss@word@cache.internal:6380/2", "redis://:***@cache.internal:6380/2"),
        ("redis://user:%40t@host/0", "redis://user:***@host/0"),
        ("redis://10.0.0.5:6379/0", "redis://10.0.0.5:6379/0"),
        ("redis://user@host/0", "redis://user@host/0"),
        ("redis://host/0?password=hunter2&db=1", "redis://host/0?password=***&db=1"),
        (
            "https://api.example.com/.well-known/jwks.json",
            "https://api.example.com/.well-known/jwks.json",
        ),
        (
            "https://u:tok@idp.example/jwks?api_key=abc",
            "https://u:***@idp.example/jwks?api_key=***",
        ),
    ],
)
def test_url_passwords_are_masked(url: str, shown: str) -> None:
    assert mask_url(url) == shown


# Field names that suggest a secret; each such field must be typed as one.
_SECRET_NAME = re.compile(r"password|passwd|secret|token|credential|api_keys|redis|_url$|^url$")
# Fields whose name suggests a secret but whose value is not one: a file path, a
# header or parameter *name*, a public key.
_NOT_SECRET = {
    "gateway.admin.token_file",
    "gateway.registry.token_file",
    "routes.auth.api_key",
    "routes.auth.api_key.header",
    "routes.auth.api_key.query",
    "routes.auth.jwt.strip_authorization",
    "routes.rate_limit.redis_prefix",
    "routes.rate_limit.on_redis_error",
    "routes.cors.allow_credentials",
}


def test_every_secret_looking_field_of_the_model_is_typed_as_a_secret() -> None:
    fields = list(secret_paths(Config))
    assert len(fields) > 100  # the walk reached the whole tree
    unmarked = [
        path
        for path, kind in fields
        if kind == "plain"
        and _SECRET_NAME.search(path.rsplit(".", 1)[-1])
        and path not in _NOT_SECRET
    ]
    assert unmarked == [], f"type these as SecretStr, SecretURL or SecretValue: {unmarked}"
    marked = {path for path, kind in fields if kind != "plain"}
    assert "routes.headers.request.add" in marked
    assert "routes.headers.response.add" not in marked
    assert "consumers.api_keys" in marked


SENTINELS = ("S3NT1NEL", "p@ss@word")


def full_config() -> Config:
    """A configuration with every kind of secret filled in with a sentinel."""
    redis = "redis://app:S3NT1NEL-p@ss@word@cache.internal:6379/0"
    doc = {
        "gateway": {
            "listen": "127.0.0.1:0",
            "admin": {"token": "S3NT1NEL-admin-token-long-enough"},
            "registry": {"redis": redis, "token": "S3NT1NEL-registry-token-long"},
        },
        "upstreams": {
            "up": {
                "endpoints": ["127.0.0.1:9"],
                "health": {"shared": {"redis": redis}},
            }
        },
        "consumers": {"ops": {"api_keys": [hash_api_key("S3NT1NEL-api-key")]}},
        "routes": [
            {
                "name": "a",
                "upstream": "up",
                "auth": {
                    "jwt": {
                        "algorithms": ["HS256"],
                        "keys": [{"secret": "S3NT1NEL-hmac-secret-long-enough-for-it"}],
                        "jwks_url": "https://user:S3NT1NEL@idp.example/jwks",
                    }
                },
                "rate_limit": {"rate": "10/s", "redis": redis},
                "headers": {
                    "request": {"add": {"Authorization": "Bearer S3NT1NEL-upstream-key"}},
                    "response": {"add": {"X-Frame-Options": "DENY"}},
                },
            }
        ],
    }
    return loads(json.dumps(doc))


def test_public_dump_shows_no_secret() -> None:
    config = full_config()
    shown = json.dumps(public_dump(config))
    hashed = hash_api_key("S3NT1NEL-api-key").partition(":")[2]
    for sentinel in (*SENTINELS, hashed):
        assert sentinel not in shown, sentinel
    data = public_dump(config)
    route = data["routes"][0]
    assert route["headers"]["request"]["add"] == {"Authorization": "***"}
    assert route["headers"]["response"]["add"] == {"X-Frame-Options": "DENY"}
    assert route["rate_limit"]["redis"] == "redis://app:***@cache.internal:6379/0"
    assert data["gateway"]["admin"]["token"] == "***"
    # Everything else is shown as it is.
    assert (
        data["upstreams"]["up"]["endpoints"][0]["address"]
        == config.model_dump(mode="json")["upstreams"]["up"]["endpoints"][0]["address"]
    )
