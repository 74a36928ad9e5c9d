"""The configuration model itself: frozen, defaults filled in, derived values, and the
implicit upstreams of service routes (field-level errors are in test_loader.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from meshgate.config import Config, loads
from meshgate.config.model import parse_duration, parse_size


def test_models_are_frozen() -> None:
    config = loads(
        "upstreams: {up: {endpoints: ['127.0.0.1:9']}}\nroutes: [{name: r, upstream: up}]"
    )
    with pytest.raises(ValidationError):
        config.routes[0].name = "other"  # type: ignore[misc]


def test_a_service_route_gets_an_upstream_of_its_name() -> None:
    config = loads("routes: [{name: users, service: users, match: {path_prefix: /api/users}}]")
    assert config.routes[0].upstream == "users"
    assert config.upstreams["users"].service == "users"
    assert config.upstreams["users"].endpoints == ()


def test_defaults_are_safe() -> None:
    config = Config.from_dict({})
    gw = config.gateway
    assert gw.listen.host == "127.0.0.1"  # loopback unless told otherwise
    assert gw.admin.listen.host == "127.0.0.1"
    assert gw.encoded_slashes == "reject"
    assert gw.limits.max_header_bytes == 32 * 1024
    assert gw.tracing.ratio == 0.01
    assert config.routes == ()


def test_a_route_upgrades_websocket_only_by_default() -> None:
    config = loads(
        "upstreams: {up: {endpoints: ['127.0.0.1:9']}}\nroutes: [{name: r, upstream: up}]"
    )
    assert config.routes[0].upgrades == ("websocket",)
    assert config.routes[0].match.methods == ()


@pytest.mark.parametrize(
    ("text", "seconds"), [("250ms", 0.25), ("2s", 2.0), ("1.5m", 90.0), ("1h", 3600.0), (3, 3.0)]
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "size"), [("1KiB", 1024), ("2MB", 2_000_000), ("64", 64)])
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size
