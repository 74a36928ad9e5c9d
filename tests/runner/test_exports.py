"""The curated public API of meshgate.runner."""

from __future__ import annotations

import meshgate.runner
from meshgate.errors import MeshgateError


def test_exported_members() -> None:
    assert set(meshgate.runner.__all__) == {
        "AlreadyRunningError",
        "AmbiguousSystemError",
        "ControlError",
        "GatewaySpec",
        "NotRunningError",
        "ReadySpec",
        "Runner",
        "RunnerError",
        "ServiceSpec",
        "StartupError",
        "StateDir",
        "System",
        "SystemFile",
        "load_system",
        "find_system",
        "known_systems",
        "loads_system",
        "request",
        "start_order",
    }
    for name in meshgate.runner.__all__:
        assert getattr(meshgate.runner, name).__module__.startswith("meshgate.runner")
    assert "docs/up.md" in (meshgate.runner.__doc__ or "")


def test_every_error_is_a_meshgate_error() -> None:
    for name in meshgate.runner.__all__:
        member = getattr(meshgate.runner, name)
        if name.endswith("Error"):
            assert issubclass(member, meshgate.runner.RunnerError)
            assert issubclass(member, MeshgateError)
            assert member.__doc__
