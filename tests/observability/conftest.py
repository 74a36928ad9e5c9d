"""Fixtures for the observability tests: a telemetry store and its routers served by a
real uvicorn server on a loopback ephemeral port, behind a bearer token."""

from __future__ import annotations

import hmac
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, HTTPException, Request
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk._logs.export import LogRecordExportResult
from opentelemetry.sdk.trace.export import SpanExportResult

from meshgate.observability import TelemetryStore
from meshgate.observability.api import create_observability_router, create_otlp_router
from tests.conftest import require_services
from tests.e2e.conftest import TOKEN as E2E_TOKEN
from tests.e2e.conftest import (
    Gateway,
    GatewayFactory,
    start_gateway,  # noqa: F401 - the fixture, for these tests too
    tail,
)
from tests.observability.otel import System
from tests.registry.conftest import Server

TOKEN = "observability-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def authorize(request: Request) -> None:
    given = request.headers.get("authorization", "").encode()
    if not hmac.compare_digest(given, f"Bearer {TOKEN}".encode()):
        raise HTTPException(401, detail="missing or wrong token")


@dataclass
class Collector:
    """A store behind a running server."""

    store: TelemetryStore
    server: Server

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    store = TelemetryStore()
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(create_otlp_router(store, authorize))
    app.include_router(create_observability_router(store, authorize))
    server = await Server(app).start()
    try:
        yield Collector(store, server)
    finally:
        await server.stop()


@pytest.fixture
async def api(collector: Collector) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=collector.url + "/v1/observability", headers=AUTH, timeout=10
    ) as client:
        yield client


@pytest.fixture
def system() -> Iterator[System]:
    made = System()
    yield made
    made.close()


def require_binary(path: str, package: str) -> str:
    """``path`` if it is an executable; skips the test otherwise, and fails instead
    under MESHGATE_REQUIRE_SERVICES=1 (CI installs it)."""
    if os.access(path, os.X_OK):
        return path
    reason = f"{path} is not installed (apt-get install {package})"
    if require_services():
        pytest.fail(f"{reason}; MESHGATE_REQUIRE_SERVICES=1")
    pytest.skip(reason)


# ---------------------------------------------------------------------- end to end

ROOT = Path(__file__).resolve().parents[2]
REGISTRY_TOKEN = "observability-registry-token-0123456789"
SERVICE_SECRET = "observability-e2e-service-secret-0123456789"
SYSTEM_CONFIG = f"""\
gateway:
  listen: 127.0.0.1:0
  access_log: {{enabled: false}}
  admin: {{listen: '127.0.0.1:0', token: '{E2E_TOKEN}'}}
  registry: {{persist: false, token: '{REGISTRY_TOKEN}'}}
routes:
  - {{name: orders, match: {{path_prefix: /api/orders}}, service: orders, strip_prefix: false}}
"""
_READY = re.compile(r"orders on http://127\.0\.0\.1:(?P<port>\d+)")


@dataclass
class RunningSystem:
    """A real gateway (with its registry and collector) and two ``orders`` instances."""

    gateway: Gateway
    instances: list[tuple[subprocess.Popen[bytes], int, Path]]
    tmp: Path

    @property
    def admin_url(self) -> str:
        return self.gateway.admin_url

    def registered(self) -> set[str]:
        res = self.gateway.admin("GET", "/v1/registry/services/orders")
        assert res.status_code == 200, res.text
        return {i["address"] for i in res.json()["instances"]}

    def export(self, system: System) -> None:
        """Send ``system``'s finished spans and logs to the collector, as a process
        pointed at it with OTEL_EXPORTER_OTLP_ENDPOINT does (the registry token)."""
        headers = {"Authorization": f"Bearer {REGISTRY_TOKEN}"}
        spans = OTLPSpanExporter(
            endpoint=f"{self.admin_url}/v1/traces", headers=headers, timeout=10
        )
        logs = OTLPLogExporter(endpoint=f"{self.admin_url}/v1/logs", headers=headers, timeout=10)
        try:
            assert spans.export(system.spans.get_finished_spans()) is SpanExportResult.SUCCESS
            assert logs.export(system.logs.get_finished_logs()) is LogRecordExportResult.SUCCESS
        finally:
            spans.shutdown()
            logs.shutdown()
        system.spans.clear()
        system.logs.clear()


@pytest.fixture
def running_system(
    start_gateway: GatewayFactory,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> Iterator[RunningSystem]:
    gateway = start_gateway(SYSTEM_CONFIG, workers=1)
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "PYTHONUNBUFFERED": "1",
        "MESHGATE_REGISTRY_URL": gateway.admin_url,
        "MESHGATE_REGISTRY_TOKEN": REGISTRY_TOKEN,
        "MESHGATE_SERVICE_SECRET": SERVICE_SECRET,
    }
    running = RunningSystem(gateway, [], tmp_path)
    try:
        for n in range(2):
            log = tmp_path / f"orders-{n}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "meshgate",
                        "serve",
                        "tests.observability.sample_service:service",
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    cwd=ROOT,
                )
            running.instances.append((proc, 0, log))
            deadline = time.monotonic() + 20
            while (match := _READY.search(log.read_text(errors="replace"))) is None:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"orders did not start:\n{tail(log)}")
                time.sleep(0.05)
            running.instances[-1] = (proc, int(match["port"]), log)
        wanted = {f"127.0.0.1:{port}" for _, port, _ in running.instances}
        deadline = time.monotonic() + 20
        while running.registered() != wanted:
            if time.monotonic() > deadline:
                pytest.fail(f"registered {running.registered()}, expected {wanted}")
            time.sleep(0.05)
        yield running
    finally:
        for proc, _, _ in running.instances:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _, _ in running.instances:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
