"""The admin API's helpers (its endpoints are tested end to end in tests/e2e)."""

from __future__ import annotations

import pytest

from meshgate.gateway.admin import redact


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@10.0.0.5:6379/0", "redis://:***@10.0.0.5:6379/0"),
        ("rediss://app:pa:ss@cache.internal/1", "rediss://app:***@cache.internal/1"),
        ("redis://10.0.0.5:6379/0", "redis://10.0.0.5:6379/0"),
        ("redis://user@host/0", "redis://user@host/0"),
        (
            "https://api.example.com/.well-known/jwks.json",
            "https://api.example.com/.well-known/jwks.json",
        ),
        ("not a url: a@b", "not a url: a@b"),
    ],
)
def test_url_passwords_are_masked(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_redact_walks_the_whole_document() -> None:
    doc = {
        "upstreams": {"up": {"health": {"shared": {"redis": "redis://:pw@h/0"}}}},
        "routes": [{"rate_limit": {"redis": "redis://u:pw@h/1"}, "priority": 3, "on": True}],
    }
    assert redact(doc) == {
        "upstreams": {"up": {"health": {"shared": {"redis": "redis://:***@h/0"}}}},
        "routes": [{"rate_limit": {"redis": "redis://u:***@h/1"}, "priority": 3, "on": True}],
    }
