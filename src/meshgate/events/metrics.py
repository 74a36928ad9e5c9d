"""Prometheus metrics of the outbox relay, the consumers and the sagas of one
service (in its registry: ``/metrics`` shows them)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["EventMetrics"]

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True, slots=True)
class EventMetrics:
    published: Counter
    outbox_pending: Gauge
    outbox_oldest: Gauge
    relay_errors: Counter
    handled: Counter
    redeliveries: Counter
    consumer_lag: Gauge
    handler_duration: Histogram
    delivery_latency: Histogram
    dead_letters: Counter
    sagas: Counter
    sagas_active: Gauge
    step_duration: Histogram

    @classmethod
    def make(cls, registry: CollectorRegistry) -> EventMetrics:
        return cls(
            published=Counter(
                "meshgate_events_published",
                "Events the relay moved from the outbox to the bus, by topic.",
                ["service", "topic"],
                registry=registry,
            ),
            outbox_pending=Gauge(
                "meshgate_events_outbox_pending",
                "Outbox rows committed and not yet on the bus.",
                ["service"],
                registry=registry,
            ),
            outbox_oldest=Gauge(
                "meshgate_events_outbox_oldest_seconds",
                "Age of the oldest outbox row not yet on the bus (the relay's lag).",
                ["service"],
                registry=registry,
            ),
            relay_errors=Counter(
                "meshgate_events_relay_errors",
                "Relay rounds that failed (bus or database unavailable).",
                ["service"],
                registry=registry,
            ),
            handled=Counter(
                "meshgate_events_handled",
                "Deliveries handled, by outcome: ok, duplicate (in the inbox already), "
                "failed (redelivered later) or dead (sent to the dead letters).",
                ["service", "topic", "group", "outcome"],
                registry=registry,
            ),
            redeliveries=Counter(
                "meshgate_events_redeliveries",
                "Deliveries that were not the first of their event.",
                ["service", "topic", "group"],
                registry=registry,
            ),
            consumer_lag=Gauge(
                "meshgate_events_consumer_lag",
                "Events of the topic the group has not acknowledged yet.",
                ["service", "topic", "group"],
                registry=registry,
            ),
            handler_duration=Histogram(
                "meshgate_events_handler_duration_seconds",
                "Time a handler took, its inbox write included.",
                ["service", "topic", "group"],
                buckets=_LATENCY,
                registry=registry,
            ),
            delivery_latency=Histogram(
                "meshgate_events_delivery_latency_seconds",
                "From the publishing transaction to the handler starting (first deliveries).",
                ["service", "topic", "group"],
                buckets=_LATENCY,
                registry=registry,
            ),
            dead_letters=Counter(
                "meshgate_events_dead_letters",
                "Events sent to the dead letters after their last try.",
                ["service", "topic", "group"],
                registry=registry,
            ),
            sagas=Counter(
                "meshgate_sagas",
                "Sagas by what happened: started, completed, compensated, stuck.",
                ["service", "saga", "outcome"],
                registry=registry,
            ),
            sagas_active=Gauge(
                "meshgate_sagas_active",
                "Sagas this instance is driving now.",
                ["service", "saga"],
                registry=registry,
            ),
            step_duration=Histogram(
                "meshgate_saga_step_duration_seconds",
                "Time of one attempt of a saga step, by phase and outcome.",
                ["service", "saga", "step", "phase", "outcome"],
                buckets=_LATENCY,
                registry=registry,
            ),
        )
