"""The control endpoint of a running system: ``meshgate ps``, ``scale`` and
``down`` talk to the ``meshgate up`` that runs it.

It listens on 127.0.0.1 on a free port; the port and a random token are in the
state folder's ``state.json`` (mode 0600, so only the user who ran ``up`` can
read them). The protocol is one JSON object per line: a request
``{"token": ..., "op": "ps" | "scale" | "down", ...}``, then one answer
``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from meshgate.runner.errors import ControlError, NotRunningError
from meshgate.runner.state import StateDir

__all__ = ["ControlServer", "request"]

log = logging.getLogger("meshgate.runner")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
_MAX_REQUEST = 64 * 1024


class ControlServer:
    """Serves control requests with ``handler`` once :meth:`start` returns."""

    def __init__(self, token: str, handler: Handler) -> None:
        self.token = token
        self.handler = handler
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=_MAX_REQUEST)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            with contextlib.suppress(Exception):
                await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            answer = await self._answer(reader)
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> dict[str, Any]:
        try:
            async with asyncio.timeout(10):
                line = await reader.readline()
            request = json.loads(line)
        except (TimeoutError, ValueError, asyncio.LimitOverrunError):
            return {"ok": False, "error": "send one JSON object on one line"}
        if not isinstance(request, dict):
            return {"ok": False, "error": "send one JSON object on one line"}
        token = request.get("token")
        if not isinstance(token, str) or not hmac.compare_digest(token, self.token):
            return {"ok": False, "error": "wrong token; read it from state.json"}
        try:
            return await self.handler(request)
        except Exception as exc:
            log.exception("control request %r failed", request.get("op"))
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def request(state: StateDir, op: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
    """Send ``op`` to the system whose state folder is ``state``; its answer.

    Raises:
        NotRunningError: no ``meshgate up`` runs from that folder.
        ControlError: it refused the request or did not answer.
    """
    if not state.running():
        raise NotRunningError(f"nothing runs from {state.path} (no meshgate up holds it)")
    data = state.read_state()
    control = data.get("control") if data else None
    if not isinstance(control, dict):
        raise ControlError(
            f"{state.state_file} has no control endpoint yet; the system is starting, try again"
        )
    body = json.dumps({**params, "op": op, "token": control.get("token")}).encode() + b"\n"
    try:
        with socket.create_connection(("127.0.0.1", int(control["port"])), timeout=5) as sock:
            sock.settimeout(timeout)
            sock.sendall(body)
            chunks: list[bytes] = []
            while not chunks or not chunks[-1].endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
    except (OSError, KeyError, ValueError) as exc:
        raise ControlError(
            f"the runner of {state.path} did not answer ({exc}); is it stuck? "
            f"its PID is {data.get('pid') if data else '?'}"
        ) from None
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError:
        raise ControlError("the runner sent an answer that is not JSON") from None
    if not isinstance(answer, dict):
        raise ControlError("the runner sent an answer that is not a JSON object")
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error", "refused")))
    return answer
