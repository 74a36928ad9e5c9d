"""Everything observability adds to the admin listener, as one router.

``create_admin_router`` is what the gateway's admin app includes: the OTLP
receiver (``/v1/traces``, ``/v1/logs``, ``/v1/metrics``), the query API
(``/v1/observability``), the dashboard (``/ui``) and, with a registry, Prometheus
HTTP SD (``/v1/prometheus/targets``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from fastapi import APIRouter

from meshgate.observability.api import Authorize, create_observability_router, create_otlp_router
from meshgate.observability.dashboard import DashboardPage, create_dashboard_router
from meshgate.observability.prometheus import GatewayTarget, create_prometheus_router

if TYPE_CHECKING:
    from meshgate.observability.auth import AdminAuth
    from meshgate.observability.store import TelemetryStore
    from meshgate.registry.store import Registry

__all__ = ["create_admin_router"]


def create_admin_router(
    store: TelemetryStore,
    auth: AdminAuth,
    *,
    exporters: Authorize,
    registry: Registry | None = None,
    gateway: Callable[[], GatewayTarget | None] = lambda: None,
    pages: Sequence[DashboardPage] = (),
) -> APIRouter:
    """The observability routes of the admin listener.

    ``auth`` guards the query API and the dashboard (admin token or dashboard
    session); ``exporters`` guards what processes call, the OTLP receiver and
    Prometheus HTTP SD (the registry token services hold, or the admin token).
    """
    router = APIRouter()
    router.include_router(create_otlp_router(store, exporters))
    router.include_router(create_observability_router(store, auth))
    router.include_router(create_dashboard_router(auth, pages=pages))
    if registry is not None:
        router.include_router(create_prometheus_router(registry, exporters, gateway=gateway))
    return router
