"""Prometheus for a meshgate system: service discovery from the registry, and the
rules and Grafana dashboard shipped with the package.

- :func:`create_prometheus_router` serves ``GET /v1/prometheus/targets`` in the
  HTTP SD format (a JSON list of target groups): every registered instance's
  ``/metrics`` (``meshgate_kind="service"``) and the gateway's admin ``/metrics``
  (``meshgate_kind="gateway"``); ``?kind=`` picks one. Instances may set the
  registry metadata ``metrics_path`` and ``scheme``.
- :func:`scrape_configs` writes the ``scrape_configs`` of a ``prometheus.yml`` that
  uses it: one job for the services, one for the gateway (whose ``/metrics`` takes
  the admin token, which the services never see).
- :data:`RULES` (recording and alerting rules) and :data:`GRAFANA_DASHBOARD`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from meshgate.observability.api import Authorize, problem
from meshgate.registry.model import Snapshot
from meshgate.registry.store import Registry

__all__ = [
    "GRAFANA_DASHBOARD",
    "KINDS",
    "RULES",
    "TARGETS_PATH",
    "GatewayTarget",
    "create_prometheus_router",
    "http_sd_targets",
    "scrape_configs",
]

TARGETS_PATH = "/v1/prometheus/targets"
"""Where the HTTP SD endpoint is served on the admin listener."""
KINDS = ("service", "gateway")
_HERE = Path(str(resources.files("meshgate.observability")))
RULES = _HERE / "rules" / "meshgate.rules.yml"
"""Recording and alerting rules for a meshgate system (``rule_files`` of prometheus.yml)."""
GRAFANA_DASHBOARD = _HERE / "grafana" / "meshgate.json"
"""A Grafana dashboard of a system (gateway, services, instances, events)."""


@dataclass(frozen=True)
class GatewayTarget:
    """Where Prometheus scrapes the gateway's own metrics (its admin listener)."""

    address: str
    """``host:port`` of the admin listener, as Prometheus reaches it."""
    scheme: str = "http"


def http_sd_targets(
    snapshot: Snapshot, gateway: GatewayTarget | None, kind: str | None = None
) -> list[dict[str, Any]]:
    """Target groups in the Prometheus HTTP SD format: one per registered instance
    (labels ``meshgate_service``, ``meshgate_instance``, ``meshgate_kind``, and
    ``meshgate_version``/``meshgate_zone`` when set), then the gateway's."""
    groups: list[dict[str, Any]] = []
    if kind in (None, "service"):
        for instance in snapshot.instances:
            labels = {
                "meshgate_kind": "service",
                "meshgate_service": instance.service,
                "meshgate_instance": instance.id,
                "__metrics_path__": instance.metadata.get("metrics_path", "/metrics"),
                "__scheme__": instance.metadata.get("scheme", "http"),
            }
            if instance.version:
                labels["meshgate_version"] = instance.version
            if instance.zone:
                labels["meshgate_zone"] = instance.zone
            groups.append({"targets": [instance.address], "labels": labels})
    if gateway is not None and kind in (None, "gateway"):
        groups.append(
            {
                "targets": [gateway.address],
                "labels": {
                    "meshgate_kind": "gateway",
                    "meshgate_service": "gateway",
                    "__metrics_path__": "/metrics",
                    "__scheme__": gateway.scheme,
                },
            }
        )
    return groups


def create_prometheus_router(
    registry: Registry,
    authorize: Authorize,
    *,
    gateway: Callable[[], GatewayTarget | None] = lambda: None,
) -> APIRouter:
    """``GET /v1/prometheus/targets[?kind=service|gateway]`` over ``registry``, behind
    ``authorize`` (Prometheus sends it with ``http_sd_configs[].authorization``)."""
    router = APIRouter(dependencies=[Depends(authorize)])

    @router.get(TARGETS_PATH)
    async def targets(kind: str | None = None) -> Response:
        if kind is not None and kind not in KINDS:
            return problem(
                400,
                "bad_query",
                "Invalid query parameter",
                f"kind={kind!r}: use service or gateway, or leave it out for both",
                parameter="kind",
            )
        snapshot = await registry.snapshot()
        return JSONResponse(http_sd_targets(snapshot, gateway(), kind))

    return router


def scrape_configs(
    admin_url: str,
    *,
    sd_token_file: str,
    admin_token_file: str,
    interval: str = "15s",
    refresh: str = "10s",
) -> list[dict[str, Any]]:
    """The ``scrape_configs`` of a prometheus.yml for the system whose admin listener is
    ``admin_url``: job ``meshgate-services`` (found with the token in
    ``sd_token_file``: the registry or admin token) and job ``meshgate-gateway``
    (found and scraped with the admin token in ``admin_token_file``)."""
    base = admin_url.rstrip("/") + TARGETS_PATH
    tls = {"insecure_skip_verify": False} if admin_url.startswith("https:") else None

    def sd(kind: str, token_file: str) -> dict[str, Any]:
        config: dict[str, Any] = {
            "url": f"{base}?kind={kind}",
            "refresh_interval": refresh,
            "authorization": {"type": "Bearer", "credentials_file": token_file},
        }
        if tls is not None:
            config["tls_config"] = tls
        return config

    return [
        {
            "job_name": "meshgate-services",
            "scrape_interval": interval,
            "http_sd_configs": [sd("service", sd_token_file)],
        },
        {
            "job_name": "meshgate-gateway",
            "scrape_interval": interval,
            "authorization": {"type": "Bearer", "credentials_file": admin_token_file},
            "http_sd_configs": [sd("gateway", admin_token_file)],
        },
    ]
