"""What the runner gives each process: the environment (dependencies, registry,
identity, telemetry, placeholders) and how instances are named and coloured."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from meshgate.runner import Runner, loads_system
from meshgate.runner.gateway import plan_gateway
from meshgate.runner.supervisor import env_prefix, free_port
from meshgate.runner.telemetry import EMBEDDED_OTLP_PATH, reserve_admin_port

SYSTEM = """\
env: {SHARED: "{system}", OVERRIDDEN: system}
services:
  users:
    app: shop.users:service
    database: embedded
    cache: redis://127.0.0.1:6379/0
    broker: embedded
    migrate: true
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
    # A migrate service's instance migrates a database it finds gone, when it restarts.
    assert env["MESHGATE_MIGRATE"] == "1"
    assert "MESHGATE_MIGRATE" not in runner._env(
        "web.front", runner.system.services["web.front"], "web.front-1", 1, 9000
    )


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


def test_where_ports_cannot_be_traced_up_says_so(
    runner: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert runner.platform_notes() == []  # Linux: checked
    monkeypatch.setattr("meshgate.runner.supervisor.OWNERSHIP_KNOWN", False)
    assert runner.platform_notes() == [
        (
            "up cannot tell here which process holds a port (it reads Linux's /proc): the tcp "
            "and http readiness of web.front takes any listener on the port; fixed ports are "
            "still checked free before each start"
        )
    ]


# ---------------------------------------------------------------------------- telemetry


def telemetry_runner(tmp_path: Path, section: str = "") -> Runner:
    sf = loads_system(
        "services:\n  users: {app: shop.users:service}\n"
        "  web: {app: shop.web:service, env: {OTEL_TRACES_SAMPLER_ARG: '0.5'}}\n" + section,
        tmp_path / "meshgate.yaml",
    )
    runner = Runner(sf, console=Console(file=sys.stdout), python="/bin/python-x")
    runner._secret = "s" * 40
    runner.plan = plan_gateway(sf, runner.state)
    return runner


def otel(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith("OTEL_")}


def test_every_process_exports_to_the_embedded_collector_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://the-shell-s:4318")
    runner = telemetry_runner(tmp_path)
    plan = runner.plan
    assert plan is not None
    assert plan.admin == "127.0.0.1:0"
    # The gateway posts its own spans to its admin listener: it must know its port first.
    reserve_admin_port(runner.system, plan)
    port = int(plan.admin.rpartition(":")[2])
    assert port > 0
    admin = f"http://127.0.0.1:{port}"
    gateway = runner._build_gateway(None)  # type: ignore[arg-type]
    name = runner.name
    assert otel(gateway.env) == {
        "OTEL_SERVICE_NAME": "meshgate-gateway",
        "OTEL_RESOURCE_ATTRIBUTES": f"service.namespace={name},service.instance.id=gateway",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"{admin}{EMBEDDED_OTLP_PATH}",
        "OTEL_EXPORTER_OTLP_HEADERS": f"Authorization=Bearer%20{plan.admin_token}",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "1",
    }
    # What the gateway reads only from its configuration is in the copy it runs.
    written = yaml.safe_load(plan.path.read_text())
    assert written["gateway"]["tracing"] == {
        "headers": {"Authorization": f"Bearer {plan.admin_token}"},
        "ratio": 1.0,
    }
    assert stat.S_IMODE(plan.path.stat().st_mode) == 0o600  # it holds a token
    plan.started(8080, port)
    users = runner._env("users", runner.system.services["users"], "users-2", 2, None)
    assert otel(users) == {
        "OTEL_SERVICE_NAME": "users",
        "OTEL_RESOURCE_ATTRIBUTES": f"service.namespace={name},service.instance.id=users-2",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"{admin}",
        "OTEL_EXPORTER_OTLP_HEADERS": f"Authorization=Bearer%20{plan.registry_token}",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "1",
    }
    web = runner._env("web", runner.system.services["web"], "web-1", 1, None)
    assert web["OTEL_TRACES_SAMPLER_ARG"] == "0.5"  # the service's env wins


def test_a_collector_of_the_system_file_with_its_headers_and_ratio(tmp_path: Path) -> None:
    runner = telemetry_runner(
        tmp_path,
        "observability:\n"
        "  otlp: {endpoint: 'https://otlp.example:4318', headers: {x-api-key: 'k=1,2'}}\n"
        "  sampling: {ratio: 0.05}\n",
    )
    plan = runner.plan
    assert plan is not None
    reserve_admin_port(runner.system, plan)
    assert plan.admin == "127.0.0.1:0"  # left to the gateway: nothing posts to it
    plan.started(8080, 9901)
    users = otel(runner._env("users", runner.system.services["users"], "users-1", 1, None))
    assert users["OTEL_EXPORTER_OTLP_ENDPOINT"] == "https://otlp.example:4318"
    assert users["OTEL_EXPORTER_OTLP_HEADERS"] == "x-api-key=k%3D1%2C2"  # percent-encoded
    assert users["OTEL_TRACES_SAMPLER_ARG"] == "0.05"
    launch = runner._build_gateway(None)  # type: ignore[arg-type]
    gateway = otel(launch.env)
    assert gateway["OTEL_EXPORTER_OTLP_ENDPOINT"] == "https://otlp.example:4318"
    written = yaml.safe_load(plan.path.read_text())
    assert written["gateway"]["tracing"] == {"headers": {"x-api-key": "k=1,2"}, "ratio": 0.05}


def test_the_gateway_configuration_s_own_tracing_stays(tmp_path: Path) -> None:
    (tmp_path / "gw.yaml").write_text(
        "gateway:\n  tracing: {ratio: 0.2}\n"
        "routes:\n  - {name: users, match: {path_prefix: /users}, service: users}\n"
    )
    runner = telemetry_runner(tmp_path, "gateway: {config: gw.yaml}\n")
    plan = runner.plan
    assert plan is not None
    plan.write(pinned=False)
    tracing = yaml.safe_load(plan.path.read_text())["gateway"]["tracing"]
    assert tracing == {"ratio": 0.2, "headers": {"Authorization": f"Bearer {plan.admin_token}"}}
    (tmp_path / "gw.yaml").write_text(
        "gateway:\n  tracing: {endpoint: 'http://own:4318'}\n"
        "routes:\n  - {name: users, match: {path_prefix: /users}, service: users}\n"
    )
    runner = telemetry_runner(tmp_path, "gateway: {config: gw.yaml}\n")
    assert runner.plan is not None
    runner.plan.write(pinned=False)
    tracing = yaml.safe_load(runner.plan.path.read_text())["gateway"]["tracing"]
    assert tracing == {"endpoint": "http://own:4318"}  # its own collector: left alone
