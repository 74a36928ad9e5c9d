"""What the runner gives each process: the environment (dependencies, registry,
identity, placeholders) and how instances are named and coloured."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from rich.console import Console

from meshgate.runner import Runner, loads_system
from meshgate.runner.gateway import plan_gateway
from meshgate.runner.supervisor import env_prefix, free_port

SYSTEM = """\
env: {SHARED: "{system}", OVERRIDDEN: system}
services:
  users:
    app: shop.users:service
    database: embedded
    cache: redis://127.0.0.1:6379/0
    broker: embedded
    env: {OVERRIDDEN: service, HOME_OF_DATA: "{state}/data", WHO: "{instance}/{index}"}
  web.front:
    command: ["{python}", "-m", "http.server", "{port}"]
    env_prefix: FRONT
    database: "sqlite:///{root}/front.db"
"""


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Runner:
    monkeypatch.setenv("FROM_OUTSIDE", "kept")
    monkeypatch.setenv("OVERRIDDEN", "outside")
    sf = loads_system(SYSTEM, tmp_path / "meshgate.yaml")
    runner = Runner(sf, console=Console(file=sys.stdout), python="/bin/python-x")
    runner._secret = "s" * 40
    runner.plan = plan_gateway(sf, runner.state)
    runner.plan.started(8080, 9901)
    return runner


def test_the_environment_of_an_app(runner: Runner, tmp_path: Path) -> None:
    spec = runner.system.services["users"]
    env = runner._env("users", spec, "users-2", 2, None)
    state = tmp_path / ".meshgate"
    assert env["FROM_OUTSIDE"] == "kept"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["SHARED"] == tmp_path.name[:63]
    assert env["OVERRIDDEN"] == "service"  # the service's env wins
    assert env["USERS_DATABASE_URL"] == f"sqlite:///{state}/data/users.db"
    assert env["MESHGATE_DATABASE_URL"] == env["USERS_DATABASE_URL"]
    assert env["USERS_CACHE_URL"] == "redis://127.0.0.1:6379/0"
    assert env["USERS_BROKER_URL"] == f"nats://127.0.0.1:{runner.events.port}"
    assert env["MESHGATE_EVENTS_URL"] == env["USERS_BROKER_URL"]
    assert env["HOME_OF_DATA"] == f"{state}/data"
    assert env["WHO"] == "users-2/2"
    assert env["MESHGATE_REGISTRY_URL"] == "http://127.0.0.1:9901"
    assert env["MESHGATE_REGISTRY_TOKEN"] == (state / "registry.token").read_text().strip()
    assert env["MESHGATE_GATEWAY_URL"] == "http://127.0.0.1:8080"
    assert env["MESHGATE_SERVICE_SECRET"] == "s" * 40
    assert env["MESHGATE_INSTANCE"] == "users-2"
    assert "PORT" not in env


def test_launching_an_app_and_a_command(runner: Runner, tmp_path: Path) -> None:
    class Fake:
        service = "web.front"
        index = 3
        name = "web.front-3"

    launch = runner._build_command(Fake())  # type: ignore[arg-type]
    assert launch.port is not None
    assert launch.argv == ["/bin/python-x", "-m", "http.server", str(launch.port)]
    assert launch.env["PORT"] == str(launch.port)
    assert launch.env["FRONT_DATABASE_URL"] == f"sqlite:///{tmp_path}/front.db"
    assert launch.cwd == tmp_path
    Fake.service, Fake.name = "users", "users-1"
    app = runner._build_app(Fake())  # type: ignore[arg-type]
    assert app.argv == [
        "/bin/python-x",
        "-m",
        "meshgate",
        "serve",
        "shop.users:service",
        "--listen",
        "127.0.0.1:0",
        "--log-level",
        "info",
    ]
    assert app.port is None


def test_names_and_ports(tmp_path: Path) -> None:
    sf = loads_system("services:\n  a-b.c: {command: x}\n", tmp_path / "meshgate.yaml")
    assert env_prefix("a-b.c", sf.system.services["a-b.c"]) == "A_B_C"
    assert 0 < free_port() < 65536
