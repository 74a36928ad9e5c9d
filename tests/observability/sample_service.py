"""A small service on the SDK for the observability end-to-end tests: ``orders``, with
its health, readiness and Prometheus metrics, registering with the gateway's registry.
Run as ``meshgate serve tests.observability.sample_service:service``."""

from __future__ import annotations

from meshgate.service import Service

service = Service("orders", version="1.0.0")


@service.app.get("/orders/{order_id}")
async def one_order(order_id: int) -> dict[str, int]:
    return {"id": order_id}
