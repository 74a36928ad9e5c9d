"""Fixtures for the gateway's real-socket tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.helpers import Client, RawUpstream


@pytest.fixture(autouse=True)
async def _close_upstreams() -> AsyncIterator[None]:
    """Close every RawUpstream a test started, also when the test failed before it
    could (an open server would hang the event loop's shutdown)."""
    RawUpstream.instances.clear()
    Client.instances.clear()
    yield
    for client in Client.instances:
        client.writer.transport.abort()
    for upstream in RawUpstream.instances:
        await upstream.close()
    RawUpstream.instances.clear()
    Client.instances.clear()
