"""The curated public API of meshgate.service."""

from __future__ import annotations

import meshgate.service
from meshgate.service import errors, logs, middleware, problems, readiness, telemetry, testing


def test_exported_members() -> None:
    for module in (
        meshgate.service,
        errors,
        logs,
        middleware,
        problems,
        readiness,
        telemetry,
        testing,
    ):
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{module.__name__}.{name}"
    assert {
        "Service",
        "ServiceClient",
        "Problem",
        "ProblemError",
        "problem_responses",
        "ServiceStartupError",
        "NoRegistryError",
        "configure_logging",
    } <= set(meshgate.service.__all__)
