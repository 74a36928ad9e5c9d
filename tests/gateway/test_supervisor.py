"""The gateway supervisor's own decisions (its processes are run end to end in
tests/e2e/test_gateway_process.py): what a reload may change, and what it refuses
before any worker hears of it."""

from __future__ import annotations

import pytest

from meshgate.config import loads
from meshgate.gateway.supervisor import Supervisor, _restart_only_changes

BASE = """
gateway: {listen: 127.0.0.1:0, workers: 1, admin: {listen: 127.0.0.1:0}}
upstreams: {up: {endpoints: ['127.0.0.1:9']}}
routes: [{name: r, upstream: up}]
"""


@pytest.mark.parametrize(
    ("change", "needs_restart"),
    [
        (("workers: 1", "workers: 2"), ["gateway.workers"]),
        (("admin: {listen: 127.0.0.1:0}", "admin: {listen: 127.0.0.1:9999}"), ["gateway.admin"]),
        (("workers: 1", "workers: 1, registry: {enabled: false}"), ["gateway.registry"]),
        (("name: r, upstream: up", "name: r2, upstream: up"), []),
        (("127.0.0.1:9']", "127.0.0.1:10']"), []),
    ],
)
def test_which_changes_wait_for_a_restart(
    change: tuple[str, str], needs_restart: list[str]
) -> None:
    old = loads(BASE)
    new = loads(BASE.replace(*change))
    assert _restart_only_changes(old, new) == needs_restart


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("gateway: {listen: 127.0.0.1:1}\n", "gateway.listen cannot change on reload"),
        ("routes: [{name: r, upstream: nowhere}]\n", "no upstream named 'nowhere'"),
        (":\n", "problem"),
    ],
)
async def test_a_bad_reload_changes_nothing_and_says_why(text: str, error: str) -> None:
    supervisor = Supervisor(BASE, "gateway.yaml")
    before = supervisor.config
    result = await supervisor.apply(text)
    assert result["ok"] is False
    assert error in result["error"]
    assert supervisor.config is before
    assert supervisor.last_reload_error == result["error"]
    assert supervisor.status()["last_reload_error"] == result["error"]


async def test_a_reload_of_an_unreadable_file_names_it(tmp_path: object) -> None:
    supervisor = Supervisor(BASE, "/nonexistent/gateway.yaml")
    result = await supervisor.reload_file()
    assert result["ok"] is False
    assert "cannot read /nonexistent/gateway.yaml" in result["error"]
