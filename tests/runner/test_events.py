"""The ``events:`` section of a system file and what services that use the bus get."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from rich.console import Console

from meshgate.errors import ConfigError
from meshgate.runner import Runner, loads_system
from meshgate.runner.events import read_events_file


def runner_for(text: str, folder: Path) -> Runner:
    sf = loads_system(text, folder / "meshgate.yaml")
    return Runner(sf, console=Console(file=sys.stdout), python="/bin/python-x")


def test_services_with_broker_embedded_get_the_embedded_nats_server(tmp_path: Path) -> None:
    runner = runner_for(
        "services:\n"
        "  orders: {app: shop.orders:service, broker: embedded}\n"
        "  web: {app: shop.web:service}\n",
        tmp_path,
    )
    plan = runner.events
    assert plan.embedded
    assert plan.users == ["orders"]
    assert plan.port
    assert plan.monitor_port
    assert plan.port != plan.monitor_port
    env = runner._env("orders", runner.system.services["orders"], "orders-1", 1, None)
    assert env["MESHGATE_EVENTS_URL"] == f"nats://127.0.0.1:{plan.port}"
    assert env["ORDERS_BROKER_URL"] == env["MESHGATE_EVENTS_URL"]
    web = runner._env("web", runner.system.services["web"], "web-1", 1, None)
    assert "MESHGATE_EVENTS_URL" not in web
    assert plan.store == tmp_path / ".meshgate" / "nats"
    launch = plan.launch(None)  # type: ignore[arg-type]
    assert "--jetstream" in launch.argv
    assert str(plan.store) in launch.argv
    assert launch.port == plan.monitor_port


def test_no_service_uses_events_and_nothing_is_started(tmp_path: Path) -> None:
    runner = runner_for("services:\n  web: {app: shop.web:service}\n", tmp_path)
    assert not runner.events.embedded


def test_a_cluster_of_your_own_with_credentials_and_tls(tmp_path: Path) -> None:
    runner = runner_for(
        "events:\n"
        "  url: tls://nats-1:4222,tls://nats-2:4222\n"
        "  credentials: secrets/shop.creds\n"
        "  tls: {ca: secrets/ca.pem, cert: secrets/me.pem, key: secrets/me.key}\n"
        "  namespace: shop\n"
        "services:\n"
        "  orders: {app: shop.orders:service, broker: embedded}\n",
        tmp_path,
    )
    assert not runner.events.embedded
    env = runner._env("orders", runner.system.services["orders"], "orders-1", 1, None)
    assert env["MESHGATE_EVENTS_URL"] == "tls://nats-1:4222,tls://nats-2:4222"
    assert env["MESHGATE_EVENTS_CREDENTIALS"] == str(tmp_path / "secrets" / "shop.creds")
    assert env["MESHGATE_EVENTS_TLS_CA"] == str(tmp_path / "secrets" / "ca.pem")
    assert env["MESHGATE_EVENTS_TLS_KEY"] == str(tmp_path / "secrets" / "me.key")
    assert env["MESHGATE_EVENTS_NAMESPACE"] == "shop"
    runner.state.prepare()
    runner.events.write_file()
    written = read_events_file(runner.state.path)
    assert written is not None
    assert written["url"] == "tls://nats-1:4222,tls://nats-2:4222"
    assert written["meshgate_events_namespace"] == "shop"


def test_a_service_with_a_bus_url_of_its_own_gets_that_one(tmp_path: Path) -> None:
    runner = runner_for(
        "services:\n  orders: {app: shop.orders:service, broker: 'redis://127.0.0.1:6379/3'}\n",
        tmp_path,
    )
    assert not runner.events.embedded
    env = runner._env("orders", runner.system.services["orders"], "orders-1", 1, None)
    assert env["MESHGATE_EVENTS_URL"] == "redis://127.0.0.1:6379/3"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("events: {url: 'http://x'}", "not an event bus URL"),
        ("events: {namespace: 'a..b'}", "not a namespace"),
        ("events: {colour: red}", "colour"),
        ("services: {nats: {command: 'sleep 1'}}", "runner's name for the embedded nats-server"),
    ],
)
def test_bad_events_settings_name_the_field_and_the_fix(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        loads_system(text, tmp_path / "meshgate.yaml")
