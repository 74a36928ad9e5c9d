"""The dashboard in a real browser (Debian's Chromium driven by Playwright) against a
running system: a gateway process with its registry and collector, two registered
instances, and telemetry exported by the OpenTelemetry SDK's OTLP exporters.

Screenshots are saved as test artifacts: in ``MESHGATE_ARTIFACTS`` when set (CI
keeps that folder), else in the test's tmp folder.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_services
from tests.e2e.conftest import TOKEN
from tests.observability.conftest import RunningSystem
from tests.observability.otel import System, shop_trace

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 20_000


def _unavailable(reason: str) -> None:
    if require_services():
        pytest.fail(f"{reason} (MESHGATE_REQUIRE_SERVICES=1)")
    pytest.skip(reason)


@pytest.fixture
def browser_page(tmp_path: Path) -> Iterator[Any]:
    """A page of a fresh Chromium profile."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:  # pragma: no cover - the dev extra installs it
        _unavailable("Playwright is not installed: pip install 'meshgate[dev]' (or playwright)")
    if not os.access(CHROMIUM, os.X_OK):
        _unavailable(f"{CHROMIUM} is not installed (apt-get install chromium)")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            args=ARGS,
            headless=True,
            viewport={"width": 1360, "height": 860},
        )
        context.set_default_timeout(TIMEOUT_MS)
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("MESHGATE_ARTIFACTS") or tmp_path) / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_log_in_see_the_map_and_follow_a_trace_to_its_waterfall(
    running_system: RunningSystem, system: System, browser_page: Any, artifacts: Path
) -> None:
    from playwright.sync_api import expect

    page = browser_page
    for n, (_, port, _) in enumerate(running_system.instances, start=1):
        system.instance_ids[("orders", str(n))] = f"orders-127.0.0.1-{port}"
    slow = shop_trace(system, orders_ms=300, fail_users=True, instance="1")
    for n in range(4):
        shop_trace(system, orders_ms=20 + 5 * n, instance=str(1 + n % 2))
    with system.tracer("orders").start_as_current_span("GET /orders") as current:
        system.log("orders", "error", "payment refused for order 7")
    system.log("users", "info", "user 3 read from cache")
    running_system.export(system)
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))

    # The login page: the token goes in a form, never in an address.
    page.goto(f"{running_system.admin_url}/ui/")
    assert page.url.endswith("/ui/login")
    page.fill("input[name=token]", "wrong")
    page.click("button[type=submit]")
    assert "wrong token" in page.inner_text("[role=alert]")
    page.fill("input[name=token]", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url("**/ui/#/map")
    cookie = next(c for c in page.context.cookies() if c["name"] == "meshgate_session")
    assert (cookie["httpOnly"], cookie["sameSite"]) == (True, "Strict")
    assert page.evaluate("document.cookie") == ""  # HttpOnly: no script can read it

    # The map: services from the spans, calls between them with their numbers.
    page.wait_for_selector('svg.map g[data-node="orders"]')
    for node in ("gateway", "orders", "users", "postgresql"):
        assert page.locator(f'svg.map g[data-node="{node}"]').count() == 1, node
    assert "2 instances" in (
        page.text_content('svg.map g[data-node="orders"]') or ""
    )  # the registry's
    edge = page.text_content('svg.map g[data-edge="gateway->orders"] text') or ""
    assert "/s" in edge
    assert "p99" in edge
    assert "20.0 %" in (page.text_content('svg.map g[data-edge="orders->users"] text') or "")
    assert page.get_attribute('svg.map g[data-edge="orders->users"]', "class") == "edge bad"
    page.screenshot(path=str(artifacts / "dashboard-map.png"), full_page=True)

    # From the trace list to the slow trace's waterfall.
    page.click('#nav a[data-page="traces"]')
    page.wait_for_selector("tr[data-trace-id]")
    assert page.locator("tr[data-trace-id]").count() == 6  # five shop traces, one more
    page.fill("input[name=slow]", "200ms")
    page.click("form.filters button")
    expect(page.locator("tr[data-trace-id]")).to_have_count(1)
    row = page.locator(f'tr[data-trace-id="{slow}"]')
    assert row.get_attribute("class") == "bad-row"
    row.locator("a.trace-link").click()
    page.wait_for_selector(f'.waterfall[data-trace-id="{slow}"]')
    assert page.url.endswith(f"#/trace/{slow}")
    assert page.locator(".wf-row").count() == 6
    labels = page.locator(".wf-label").all_inner_texts()
    assert labels[0].strip() == "gateway GET /api/orders"
    select = page.locator(".wf-row", has_text="SELECT orders")
    select.click()
    detail = page.inner_text(".span-detail")
    assert "db.system" in detail
    assert "postgresql" in detail
    page.screenshot(path=str(artifacts / "dashboard-trace.png"), full_page=True)

    # Logs, filtered by level; and the one with a trace links to it.
    page.goto(f"{running_system.admin_url}/ui/#/logs?level=error")
    page.wait_for_selector("table.logs tbody tr")
    rows = page.locator("table.logs tbody tr").all_inner_texts()
    assert len(rows) == 1
    assert "payment refused for order 7" in rows[0]
    trace_id = format(current.get_span_context().trace_id, "032x")
    assert page.get_attribute("table.logs tbody tr a", "href") == f"#/trace/{trace_id}"

    # Registry instances, and the gateway's routes and upstreams.
    page.click('#nav a[data-page="instances"]')
    page.wait_for_selector("tr[data-instance]")
    assert page.locator("tr[data-instance]").count() == 2
    page.click('#nav a[data-page="gateway"]')
    page.wait_for_selector('tr[data-route="orders"]')
    upstream = page.inner_text("section.upstream")
    assert "service orders" in upstream
    assert "breaker" in upstream
    assert page.locator("section.upstream tr[data-endpoint]").count() == 2

    # A service's RED charts and its instances' health.
    page.goto(f"{running_system.admin_url}/ui/#/service/orders")
    page.wait_for_selector('figure[data-chart="p99_ms"] polyline')
    instances = page.locator("tr[data-instance]").all_inner_texts()
    assert len(instances) == 2, instances  # spans and registry agree on instance ids
    assert all("up" in row and "/s" in row for row in instances), instances
    assert not [u for u in urls if TOKEN in u]
    assert all(u.startswith(running_system.admin_url) for u in urls), urls

    if os.environ.get("MESHGATE_UPDATE_DOCS_IMAGES") == "1":
        docs = Path(__file__).resolve().parents[2] / "docs" / "images"
        docs.mkdir(exist_ok=True)
        for name in ("dashboard-map.png", "dashboard-trace.png"):
            shutil.copy(artifacts / name, docs / name)


def test_the_live_map_follows_new_traffic(
    running_system: RunningSystem, system: System, browser_page: Any
) -> None:
    page = browser_page
    page.goto(f"{running_system.admin_url}/ui/login")
    page.fill("input[name=token]", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_selector("p.empty")  # nothing was exported yet
    shop_trace(system)
    running_system.export(system)
    # No reload: the page polls and redraws when the collector's version changes.
    page.wait_for_selector('svg.map g[data-edge="gateway->orders"]')
