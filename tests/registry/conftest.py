"""Fixtures for the registry tests: registries, and the registry API served by a real
uvicorn server on a loopback ephemeral port."""

from __future__ import annotations

import asyncio
import hmac
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, HTTPException, Request

from meshgate.registry import MemoryRegistry, Registry, create_router

TOKEN = "registry-test-token-0123456789"


def make_app(registry: Registry, *, keepalive: float = 15.0) -> FastAPI:
    """The registry API alone, behind a bearer token check like the admin app's."""

    def authorize(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {TOKEN}".encode()):
            raise HTTPException(401, detail="missing or wrong registry token")

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(create_router(registry, authorize, keepalive=keepalive))
    return app


def free_port() -> int:
    """A port nothing listens on (just released by the kernel)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """``app`` served by uvicorn on 127.0.0.1 (``port`` 0: an ephemeral one)."""

    def __init__(self, app: FastAPI, port: int = 0) -> None:
        self.app = app
        self.port = port
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            lifespan="off",
            ws="none",
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        async with asyncio.timeout(5):
            while not self._server.started:
                if self._task.done():
                    self._task.result()
                await asyncio.sleep(0.005)
        return self

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._server = self._task = None


@pytest.fixture
async def registry() -> AsyncIterator[MemoryRegistry]:
    async with MemoryRegistry() as reg:
        yield reg


@pytest.fixture
async def persisted(tmp_path: Path) -> AsyncIterator[MemoryRegistry]:
    async with MemoryRegistry(tmp_path / "registry.sqlite") as reg:
        yield reg


@pytest.fixture
async def server(registry: MemoryRegistry) -> AsyncIterator[Server]:
    srv = await Server(make_app(registry, keepalive=0.3)).start()
    try:
        yield srv
    finally:
        await srv.stop()
