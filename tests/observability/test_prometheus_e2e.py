"""A real Prometheus finds every instance of a running system through the gateway's
HTTP SD, with no target written by hand, and scrapes them and the gateway."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from meshgate.observability.prometheus import RULES, scrape_configs
from tests.e2e.conftest import TOKEN, tail
from tests.helpers import free_port
from tests.observability.conftest import REGISTRY_TOKEN, RunningSystem, require_binary

pytestmark = pytest.mark.e2e

PROMETHEUS = "/usr/bin/prometheus"
DEADLINE = 60.0
"""How long Prometheus may take to discover and scrape everything (it refreshes the
SD every second and scrapes every second here; a slow machine needs more)."""


class Prometheus:
    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.proc = proc
        self.log = log

    def api(self, path: str, **params: str) -> Any:
        res = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        assert res.status_code == 200, res.text
        body = res.json()
        assert body["status"] == "success", body
        return body["data"]

    def until(self, what: str, check: Any) -> Any:
        """Poll ``check()`` until it returns something true; fail after the deadline."""
        deadline = time.monotonic() + DEADLINE
        while True:
            with contextlib.suppress(httpx.HTTPError):
                found = check()
                if found:
                    return found
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Prometheus: {what} not within {DEADLINE:g}s:\n{tail(self.log)}")
            time.sleep(0.2)


@pytest.fixture
def prometheus(running_system: RunningSystem, tmp_path: Path) -> Iterator[Prometheus]:
    binary = require_binary(PROMETHEUS, "prometheus")
    sd_token = tmp_path / "registry.token"
    sd_token.write_text(REGISTRY_TOKEN + "\n")
    admin_token = tmp_path / "admin.token"
    admin_token.write_text(TOKEN + "\n")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": scrape_configs(
            running_system.admin_url,
            sd_token_file=str(sd_token),
            admin_token_file=str(admin_token),
            interval="1s",
            refresh="1s",
        ),
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:
        server.until("ready", lambda: httpx.get(f"{server.url}/-/ready", timeout=2).is_success)
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _healthy_targets(prometheus: Prometheus, count: int) -> list[dict[str, Any]] | None:
    active = prometheus.api("targets", state="active")["activeTargets"]
    if len(active) == count and all(t["health"] == "up" for t in active):
        return list(active)
    return None


def test_every_instance_and_the_gateway_are_scraped_through_http_sd(
    running_system: RunningSystem, prometheus: Prometheus
) -> None:
    targets = prometheus.until("three healthy targets", lambda: _healthy_targets(prometheus, 3))
    services = sorted(
        (t["labels"]["meshgate_instance"], t["labels"]["instance"], t["labels"]["job"])
        for t in targets
        if t["labels"]["meshgate_kind"] == "service"
    )
    ports = sorted(port for _, port, _ in running_system.instances)
    assert services == [
        (f"orders-127.0.0.1-{p}", f"127.0.0.1:{p}", "meshgate-services") for p in ports
    ]
    (gateway,) = [t for t in targets if t["labels"]["meshgate_kind"] == "gateway"]
    assert gateway["labels"]["job"] == "meshgate-gateway"
    assert gateway["scrapeUrl"] == f"{running_system.admin_url}/metrics"

    # What was scraped: each instance's own metrics, and the gateway's (with the token).
    def readiness() -> list[dict[str, Any]] | None:
        query = 'meshgate_service_ready{service="orders"}'
        result: list[dict[str, Any]] = prometheus.api("query", query=query)["result"]
        return result if len(result) == 2 else None

    ready = prometheus.until("readiness of both instances", readiness)
    assert {s["metric"]["meshgate_instance"] for s in ready} == {i for i, _, _ in services}
    restarts = prometheus.api("query", query="meshgate_gateway_worker_restarts_total")["result"]
    assert [s["metric"]["job"] for s in restarts] == ["meshgate-gateway"]
    groups = prometheus.api("rules")["groups"]
    assert {g["name"] for g in groups} == {
        "meshgate-gateway-recording",
        "meshgate-service-recording",
        "meshgate-alerts",
    }

    # An instance that leaves the registry leaves Prometheus's targets.
    proc, _, _ = running_system.instances[0]
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    prometheus.until("two healthy targets", lambda: _healthy_targets(prometheus, 2))
