"""Shared fixtures. Servers run on loopback with ephemeral ports; the event loop is
uvloop, as in production."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import pytest
import uvloop


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Any]:
    return {"uvloop": uvloop.new_event_loop}


def require_services() -> bool:
    """True in CI (MESHGATE_REQUIRE_SERVICES=1): a missing service fails instead of skipping."""
    return os.environ.get("MESHGATE_REQUIRE_SERVICES") == "1"
