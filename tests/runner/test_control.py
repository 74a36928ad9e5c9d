"""The control endpoint that ``ps``, ``scale`` and ``down`` talk to."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from meshgate.runner import ControlError, NotRunningError, StateDir, request
from meshgate.runner.control import ControlServer


async def test_requests_need_the_token_from_the_state_file(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []

    async def handler(req: dict[str, Any]) -> dict[str, Any]:
        seen.append(req)
        if req["op"] == "boom":
            raise RuntimeError("it broke")
        return {"ok": True, "echo": req.get("n")}

    server = ControlServer("the-token", handler)
    await server.start()
    state = StateDir(tmp_path / ".meshgate")
    state.acquire()
    try:
        state.write_state({"pid": 1, "control": {"port": server.port, "token": "the-token"}})
        answer = await asyncio.to_thread(request, state, "ps", n=3)
        assert answer == {"ok": True, "echo": 3}
        assert seen[0]["token"] == "the-token"
        with pytest.raises(ControlError, match="RuntimeError: it broke"):
            await asyncio.to_thread(request, state, "boom")
        state.write_state({"pid": 1, "control": {"port": server.port, "token": "wrong"}})
        with pytest.raises(ControlError, match="wrong token"):
            await asyncio.to_thread(request, state, "ps")
        # Not JSON at all.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"hello\n")
        answer = json.loads(await reader.readline())
        writer.close()
        assert answer == {"ok": False, "error": "send one JSON object on one line"}
        state.write_state({"pid": 1})
        with pytest.raises(ControlError, match="no control endpoint yet"):
            await asyncio.to_thread(request, state, "ps")
    finally:
        state.release()
        await server.close()
    assert len(seen) == 2


def test_nothing_running(tmp_path: Path) -> None:
    with pytest.raises(NotRunningError, match="nothing runs from"):
        request(StateDir(tmp_path / ".meshgate"), "ps")


def test_a_runner_that_does_not_answer(tmp_path: Path) -> None:
    state = StateDir(tmp_path / ".meshgate")
    state.acquire()
    try:
        state.write_state({"pid": 77, "control": {"port": 1, "token": "x"}})
        with pytest.raises(ControlError, match=r"did not answer .* its PID is 77"):
            request(state, "ps")
    finally:
        state.release()
