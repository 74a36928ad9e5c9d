"""Shared fixtures. Servers run on loopback with ephemeral ports; the event loop is
uvloop, as in production."""

from __future__ import annotations

import functools
import os
import socket
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import uvloop

from tests._timeless import module_constants, time_dependent

pytest_plugins = ["tests.venvs"]  # the core_venv fixture: a plain pip install meshgate


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Any]:
    return {"uvloop": uvloop.new_event_loop}


def require_services() -> bool:
    """True in CI (MESHGATE_REQUIRE_SERVICES=1): a missing service fails instead of skipping."""
    return os.environ.get("MESHGATE_REQUIRE_SERVICES") == "1"


REDIS_URL = "redis://127.0.0.1:6379/0"

SERVICES = {
    "postgresql": ("PostgreSQL", 5432, "postgresql://postgres@127.0.0.1:5432/test"),
    "mariadb": ("MariaDB", 3306, "mysql://root@127.0.0.1:3306/test"),
    "redis": ("Redis", 6379, REDIS_URL),
}
"""The real services this machine kind runs, by kind: (name, port, URL)."""


@pytest.fixture(scope="session", autouse=True)
def _own_state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The per-user list of systems that meshgate up keeps (XDG_STATE_HOME) is the
    suite's own, for the tests and the processes they start."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state-home")))
        yield


_CLOCK_STASH = pytest.StashKey[list[str]]()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests that were handed something computed from the clock at import or
    collection (a signed token, an expiry): it would expire on a slow run."""
    checked: dict[str, list[str]] = {}
    for item in items:
        module = getattr(item, "module", None)
        found: list[str] = []
        if module is not None:
            if module.__name__ not in checked:
                checked[module.__name__] = [
                    reason
                    for name, value in module_constants(module)
                    for reason in time_dependent(value, f"{module.__name__}.{name}")
                ]
            found.extend(checked[module.__name__])
        callspec = getattr(item, "callspec", None)
        if callspec is not None:
            for name, value in callspec.params.items():
                found.extend(time_dependent(value, f"parameter {name!r}"))
        if found:
            item.stash[_CLOCK_STASH] = found


def pytest_runtest_setup(item: pytest.Item) -> None:
    found = item.stash.get(_CLOCK_STASH, None)
    if found:
        pytest.fail(
            "computed from the clock at import or collection, so it may have expired by "
            f"now on a slow run: {'; '.join(found)}. Build it inside the test (or in a "
            "function-scoped fixture, or behind a lambda in the parametrize list).",
            pytrace=False,
        )


@functools.cache
def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def service_url(kind: str, *, module_level: bool = False) -> str:
    """The URL of a real service (``postgresql``, ``mariadb``, ``redis``); skips the
    test (or module) when it is unreachable, fails instead under
    MESHGATE_REQUIRE_SERVICES=1."""
    label, port, url = SERVICES[kind]
    if not _reachable(port):
        reason = f"{label} is not reachable at 127.0.0.1:{port}"
        if require_services():
            pytest.fail(f"{reason} (MESHGATE_REQUIRE_SERVICES=1)")
        pytest.skip(f"{reason}; start one to run this test", allow_module_level=module_level)
    return url


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A Redis key prefix unique to this test (Redis must be up); its keys, hash-tagged
    or not, are deleted at teardown."""
    service_url("redis")
    import redis

    prefix = f"meshgate-test-{uuid.uuid4().hex}"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = [*client.scan_iter(match=f"{{{prefix}:*"), *client.scan_iter(match=f"{prefix}:*")]
        if keys:
            client.delete(*keys)
    finally:
        client.close()
