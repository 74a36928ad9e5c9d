"""Fixtures for the observability tests: a telemetry store and its routers served by a
real uvicorn server on a loopback ephemeral port, behind a bearer token."""

from __future__ import annotations

import hmac
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import pytest
from fastapi import FastAPI, HTTPException, Request

from meshgate.observability import TelemetryStore
from meshgate.observability.api import create_observability_router, create_otlp_router
from tests.conftest import require_services
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
