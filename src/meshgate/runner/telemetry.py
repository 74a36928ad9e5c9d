"""What ``meshgate up`` tells every process about telemetry: where traces go, with
which headers, how many are sampled, and who the process is.

The system file's ``observability`` section says it once (docs/up.md). Every
process gets the standard OpenTelemetry variables, which the service SDK reads
(:mod:`meshgate.service.telemetry`) and the gateway reads for its endpoint; what the
gateway reads only from its configuration (the export headers and the sampling
ratio) is written into the copy of its configuration that ``up`` runs, unless that
configuration sets it itself.

With no ``otlp.endpoint``, every process exports to the collector that the control
plane serves on the gateway's admin listener, at :data:`EMBEDDED_OTLP_PATH`, with
the registry token (the token processes already hold) as its bearer token. The
gateway posts its own spans there too, so it must know its admin port before it
starts: ``up`` picks a free one then (see :func:`reserve_admin_port`).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from meshgate.runner.gateway import GatewayPlan
    from meshgate.runner.model import System

__all__ = [
    "EMBEDDED_OTLP_PATH",
    "EMBEDDED_RATIO",
    "apply_gateway_tracing",
    "gateway_tracing",
    "process_env",
    "reserve_admin_port",
    "uses_embedded",
]

EMBEDDED_OTLP_PATH = ""
"""Where the embedded collector receives OTLP/HTTP on the admin listener, after the
admin URL: it serves ``/v1/traces``, ``/v1/logs`` and ``/v1/metrics`` at the root, so
``OTEL_EXPORTER_OTLP_ENDPOINT`` is the admin URL itself."""
EMBEDDED_RATIO = 1.0
"""The sampling ratio with the embedded collector when the file gives none: a system
on one machine, whose every request should be there to look at."""


def uses_embedded(system: System) -> bool:
    """Whether the processes export to the embedded collector."""
    return system.observability.otlp.endpoint is None


def _ratio(system: System) -> float | None:
    ratio = system.observability.sampling.ratio
    if ratio is None and uses_embedded(system):
        return EMBEDDED_RATIO
    return ratio


def _headers_value(headers: Mapping[str, str]) -> str:
    """``OTEL_EXPORTER_OTLP_HEADERS``: ``key=value`` pairs, values percent-encoded."""
    return ",".join(f"{key}={quote(value, safe='')}" for key, value in headers.items())


def _resource(attributes: Mapping[str, str]) -> str:
    return ",".join(f"{key}={quote(value, safe='')}" for key, value in attributes.items())


def reserve_admin_port(system: System, plan: GatewayPlan) -> None:
    """Pick the admin listener's port now when it is left free and the gateway exports
    to its own embedded collector: it must know the URL before it starts."""
    if not uses_embedded(system):
        return
    host, _, port = plan.admin.rpartition(":")
    if int(port):
        return
    bind = host.strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((bind, 0))
        chosen = int(sock.getsockname()[1])
    plan.admin = f"{host}:{chosen}"


def process_env(
    system: System,
    system_name: str,
    plan: GatewayPlan | None,
    *,
    service: str,
    instance: str,
    gateway: bool = False,
) -> dict[str, str]:
    """The OpenTelemetry variables of one process (a service's instance, or the
    gateway): empty when the embedded collector cannot take its spans (no registry
    token for a service to present, or the admin port not known yet)."""
    otlp = system.observability.otlp
    env: dict[str, str] = {
        "OTEL_SERVICE_NAME": service,
        "OTEL_RESOURCE_ATTRIBUTES": _resource(
            {"service.namespace": system_name, "service.instance.id": instance}
        ),
    }
    headers = dict(otlp.headers)
    if otlp.endpoint is not None:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp.endpoint
    else:
        if plan is None or (not plan.admin_port and not int(plan.admin.rpartition(":")[2])):
            return {}
        token = plan.admin_token if gateway else plan.registry_token
        if token is None:
            return {}
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = plan.admin_url + EMBEDDED_OTLP_PATH
        headers.setdefault("Authorization", f"Bearer {token}")
    if headers:
        env["OTEL_EXPORTER_OTLP_HEADERS"] = _headers_value(headers)
    ratio = _ratio(system)
    if ratio is not None:
        env["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
        env["OTEL_TRACES_SAMPLER_ARG"] = f"{ratio:g}"
    return env


def gateway_tracing(system: System, admin_token: str) -> dict[str, Any]:
    """What the gateway reads only from its configuration's ``gateway.tracing``: the
    export headers (with the embedded collector, the admin token) and the sampling
    ratio. The configuration as run gets each one its file does not set."""
    otlp = system.observability.otlp
    headers = dict(otlp.headers)
    if otlp.endpoint is None:
        headers.setdefault("Authorization", f"Bearer {admin_token}")
    defaults: dict[str, Any] = {}
    if headers:
        defaults["headers"] = headers
    ratio = _ratio(system)
    if ratio is not None:
        defaults["ratio"] = ratio
    return defaults


def apply_gateway_tracing(document: dict[str, Any], defaults: Mapping[str, Any]) -> None:
    """Put ``defaults`` (:func:`gateway_tracing`) into a gateway configuration's
    ``gateway.tracing``, leaving what it sets; a gateway with a collector of its own
    (``tracing.endpoint``) or with tracing off is left as it is."""
    gateway = document.setdefault("gateway", {})
    tracing = gateway.get("tracing") or {}
    if tracing.get("endpoint") is not None or tracing.get("enabled") is False:
        return
    for key, value in defaults.items():
        tracing.setdefault(key, value)
    if tracing:
        gateway["tracing"] = tracing
