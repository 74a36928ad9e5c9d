"""Prometheus metrics of the service client, made once per registry.

The counters are counted as calls end; the breaker state and the retry budget are
read from the live clients when the registry is scraped, so that a breaker that
moved to half-open by time alone shows it, and so that they cost nothing per call.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterable
from typing import Protocol

from prometheus_client import REGISTRY, CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["ClientMetrics", "client_metrics"]


class _Client(Protocol):
    """What the collector reads of a client."""

    caller: str
    service: str

    def breaker_open(self, now: float) -> bool: ...

    def retry_tokens(self) -> float: ...


class _LiveClients(Collector):
    def __init__(self) -> None:
        self.clients: weakref.WeakSet[_Client] = weakref.WeakSet()

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        breaker, budget = self._families()
        now = time.monotonic()
        for client in sorted(self.clients, key=lambda c: (c.caller, c.service)):
            labels = [client.caller, client.service]
            breaker.add_metric(labels, 1.0 if client.breaker_open(now) else 0.0)
            budget.add_metric(labels, client.retry_tokens())
        return [breaker, budget]

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        labels = ["service", "target"]
        return [
            GaugeMetricFamily(
                "meshgate_client_breaker_open",
                "1 while the circuit breaker of calls to the target refuses them.",
                labels=labels,
            ),
            GaugeMetricFamily(
                "meshgate_client_retry_budget_tokens",
                "Retries the client may make now before its retry budget refuses more.",
                labels=labels,
            ),
        ]


class ClientMetrics:
    """The service client metrics of one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "meshgate_client_requests",
            "Calls to other services, by calling service, target and outcome: the "
            "status code of the answer, or unavailable (no instance could answer) or "
            "timeout (the deadline passed without an answer).",
            ["service", "target", "code"],
            registry=registry,
        )
        self.retries = Counter(
            "meshgate_client_retries",
            "Tries made after a call's first, on another instance.",
            ["service", "target"],
            registry=registry,
        )
        self.live = _LiveClients()
        registry.register(self.live)


_lock = threading.Lock()
_metrics: weakref.WeakKeyDictionary[CollectorRegistry, ClientMetrics] = weakref.WeakKeyDictionary()


def client_metrics(registry: CollectorRegistry | None) -> ClientMetrics:
    """The client metrics of ``registry`` (the global one for None), made on first use."""
    registry = REGISTRY if registry is None else registry
    with _lock:
        metrics = _metrics.get(registry)
        if metrics is None:
            metrics = _metrics[registry] = ClientMetrics(registry)
        return metrics
