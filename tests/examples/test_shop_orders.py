"""The shop's orders, inventory, payments and notifications services together, over
real loopback HTTP with an in-memory bus: orders complete, or are cancelled with the
reason (out of stock, payment declined) with everything undone; notifications send
one receipt per completed order. Their migrations make their tables."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from examples.shop.inventory import app as inventory_app
from examples.shop.notifications import app as notifications_app
from examples.shop.orders import app as orders_app
from examples.shop.payments import app as payments_app

from meshgate.data.migrations import upgrade
from meshgate.events import migrations as event_migrations
from meshgate.service import Service
from meshgate.service.testing import MemoryBus, serving, settle, use_endpoints, use_memory_bus


@dataclass
class Shop:
    orders: httpx.AsyncClient
    inventory: httpx.AsyncClient
    payments: httpx.AsyncClient
    notifications: httpx.AsyncClient
    services: dict[str, Service]
    bus: MemoryBus

    async def place(self, *lines: tuple[str, int], user_id: int = 1) -> dict[str, Any]:
        body = {"user_id": user_id, "items": [{"sku": s, "quantity": q} for s, q in lines]}
        answer = await self.orders.post("/orders", json=body)
        assert answer.status_code == 202, answer.text
        assert answer.headers["location"] == f"/orders/{answer.json()['id']}"
        order: dict[str, Any] = answer.json()
        return order

    async def final(self, order_id: int, timeout: float = 20) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                order: dict[str, Any] = (await self.orders.get(f"/orders/{order_id}")).json()
                if order["status"] != "pending":
                    return order
                await asyncio.sleep(0.02)

    async def stock(self) -> dict[str, tuple[int, int]]:
        rows = (await self.inventory.get("/stock")).json()
        return {r["sku"]: (r["on_hand"], r["reserved"]) for r in rows}


def migrated(module: Any, url: str, *, events: bool) -> str:
    upgrade(url, module.MIGRATIONS)
    if events:
        event_migrations.upgrade(url)
    return url


@pytest.fixture
def failure_share() -> float:
    return 0.0


@pytest.fixture
async def shop(tmp_path: Path, failure_share: float) -> AsyncIterator[Shop]:
    def db(name: str, module: Any, *, events: bool = False) -> str:
        return migrated(module, f"sqlite:///{tmp_path / name}.db", events=events)

    inventory = inventory_app.create_service(
        db("inventory", inventory_app), stock="apple=10@50,coffee=3@1200"
    )
    payments = payments_app.create_service(
        db("payments", payments_app), failure_share=failure_share
    )
    orders = orders_app.create_service(db("orders", orders_app, events=True), step_timeout=3)
    notifications = notifications_app.create_service(
        db("notifications", notifications_app, events=True)
    )
    bus = use_memory_bus(orders)
    use_memory_bus(notifications, bus)
    orders.events.sagas.poll_interval = 0.05
    async with AsyncExitStack() as stack:
        addresses = {}
        for service in (inventory, payments, orders, notifications):
            addresses[service.name] = await stack.enter_async_context(serving(service))
        use_endpoints(orders, "inventory", [addresses["inventory"]])
        use_endpoints(orders, "payments", [addresses["payments"]])
        clients = {
            name: await stack.enter_async_context(
                httpx.AsyncClient(base_url=f"http://{address}", timeout=10)
            )
            for name, address in addresses.items()
        }
        yield Shop(
            clients["orders"],
            clients["inventory"],
            clients["payments"],
            clients["notifications"],
            {"orders": orders, "notifications": notifications},
            bus,
        )


async def test_an_order_completes_charges_once_and_sends_one_receipt(shop: Shop) -> None:
    placed = await shop.place(("coffee", 2), ("apple", 1))
    assert placed["status"] == "pending"
    done = await shop.final(placed["id"])
    assert done["status"] == "completed", done
    assert done["total_cents"] == 2 * 1200 + 50
    assert await shop.stock() == {"apple": (9, 1), "coffee": (1, 2)}
    charges = (await shop.payments.get("/charges", params={"order_id": placed["id"]})).json()
    assert [(c["status"], c["amount_cents"]) for c in charges] == [("charged", 2450)]
    await settle(*shop.services.values())
    receipts = (await shop.notifications.get("/notifications")).json()
    assert [n["kind"] for n in receipts] == ["receipt"]
    assert "Order 1 is confirmed: 24.50 charged." in receipts[0]["text"]
    saga = (await shop.orders.get(f"/meshgate/sagas/{done['saga_id']}")).json()
    assert [(a["step"], a["status"]) for a in saga["attempts"]] == [
        ("reserve-stock", "ok"),
        ("charge-payment", "ok"),
        ("confirm-reservation", "ok"),
    ]


async def test_out_of_stock_cancels_with_the_reason_and_charges_nothing(shop: Shop) -> None:
    placed = await shop.place(("coffee", 5))
    done = await shop.final(placed["id"])
    assert done["status"] == "cancelled"
    assert "out of stock: coffee" in done["reason"]
    assert await shop.stock() == {"apple": (10, 0), "coffee": (3, 0)}
    assert (await shop.payments.get("/charges")).json() == []


@pytest.mark.parametrize("failure_share", [1.0])
async def test_a_declined_payment_gives_the_stock_back(shop: Shop) -> None:
    placed = await shop.place(("apple", 4))
    done = await shop.final(placed["id"])
    assert done["status"] == "cancelled"
    assert done["reason"] == "step 'charge-payment' failed: payment declined"
    assert await shop.stock() == {"apple": (10, 0), "coffee": (3, 0)}
    totals = (await shop.payments.get("/totals")).json()
    assert totals["charged_cents"] == 0
    assert totals["declined"] == 1
    await settle(*shop.services.values())
    assert (await shop.notifications.get("/notifications")).json() == []
    cancelled = shop.bus.published("orders.cancelled")
    assert len(cancelled) == 1


async def test_many_orders_at_once_keep_stock_and_money_consistent(shop: Shop) -> None:
    placed = await asyncio.gather(*(shop.place(("apple", 1)) for _ in range(14)))
    done = [await shop.final(p["id"]) for p in placed]
    completed = [o for o in done if o["status"] == "completed"]
    assert len(completed) == 10  # ten apples
    assert all("out of stock: apple" in o["reason"] for o in done if o["status"] == "cancelled")
    on_hand, reserved = (await shop.stock())["apple"]
    assert (on_hand, reserved) == (0, 10)
    totals = (await shop.payments.get("/totals")).json()
    assert totals["charged_cents"] == sum(o["total_cents"] for o in completed)


async def test_reservations_and_charges_are_idempotent_by_key(shop: Shop) -> None:
    body = {"key": "k1", "items": [{"sku": "apple", "quantity": 2}]}
    first = await shop.inventory.post("/reservations", json=body)
    again = await shop.inventory.post("/reservations", json=body)
    assert (first.status_code, again.status_code) == (201, 200)
    assert await shop.stock() == {"apple": (8, 2), "coffee": (3, 0)}
    for _ in range(2):
        assert (await shop.inventory.post("/reservations/k1/release")).json()[
            "status"
        ] == "released"
    assert await shop.stock() == {"apple": (10, 0), "coffee": (3, 0)}
    # A release that came before its reserve: the late reserve holds nothing.
    assert (await shop.inventory.post("/reservations/k2/release")).status_code == 200
    late = await shop.inventory.post("/reservations", json={**body, "key": "k2"})
    assert late.json()["status"] == "released"
    assert await shop.stock() == {"apple": (10, 0), "coffee": (3, 0)}
    charge = {"key": "c1", "order_id": 99, "amount_cents": 100}
    assert (await shop.payments.post("/charges", json=charge)).status_code == 201
    assert (await shop.payments.post("/charges", json=charge)).status_code == 200
    other_key = await shop.payments.post("/charges", json={**charge, "key": "c2"})
    assert other_key.status_code == 409  # one charge per order
    assert (await shop.payments.get("/totals")).json()["charged_cents"] == 100
