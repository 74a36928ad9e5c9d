"""The registry the gateway hosts, end to end: instances registered over HTTP become
a service upstream's endpoints in every worker, and leave it again."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.e2e.conftest import TOKEN, DemoUpstream, GatewayFactory

CONFIG = f"""\
gateway:
  listen: 127.0.0.1:0
  access_log: {{enabled: false}}
  admin: {{listen: '127.0.0.1:0', token: '{TOKEN}'}}
  registry: {{persist: false}}
routes:
  - {{name: api, match: {{path_prefix: /api}}, service: demo, strip_prefix: true}}
"""


def _until(check: object, timeout: float) -> float:
    started = time.monotonic()
    while not check():  # type: ignore[operator]
        if time.monotonic() - started > timeout:
            return -1.0
        time.sleep(0.01)
    return time.monotonic() - started


def test_registered_instances_take_traffic_and_leave(
    start_gateway: GatewayFactory, demo_upstream: DemoUpstream, tmp_path: Path
) -> None:
    gw = start_gateway(CONFIG, workers=2)
    assert f"/v1/registry; token in {tmp_path}/.meshgate/registry-" in gw.log()
    registry_token = next((tmp_path / ".meshgate").glob("registry-*.token")).read_text().strip()
    api = f"{gw.url}/api/echo"
    empty = httpx.get(api, timeout=5)
    assert empty.status_code == 503
    assert "no instance of service 'demo' is registered" in empty.text

    instance = f"{gw.admin_url}/v1/registry/services/demo/instances/demo-1"
    headers = {"Authorization": f"Bearer {registry_token}"}
    assert httpx.put(instance, json={"address": "not an address"}, headers=headers).status_code in (
        400,
        422,
    )
    assert httpx.put(instance, json={"address": demo_upstream.address}).status_code == 401
    res = httpx.put(instance, json={"address": demo_upstream.address, "ttl": 30}, headers=headers)
    assert res.status_code == 200, res.text

    def all_workers_route() -> bool:
        # Both workers must know it: several fresh connections in a row succeed.
        return all(
            httpx.get(api, timeout=5, headers={"Connection": "close"}).status_code == 200
            for _ in range(6)
        )

    joined = _until(all_workers_route, 1.0)
    assert joined >= 0, f"not routed within 1 s:\n{gw.log()}"

    status = gw.status()
    assert status["registry"]["services"] == {"demo": 1}
    upstreams = gw.admin("GET", "/upstreams").json()["upstreams"]
    assert upstreams["demo"]["service"] == "demo"
    assert list(upstreams["demo"]["endpoints"]) == [demo_upstream.address]
    assert upstreams["demo"]["retry_budget"] > 0
    # The admin listener's /metrics counts the registry's instances too.
    metrics = gw.admin("GET", "/metrics").text
    assert 'meshgate_registry_instances{service="demo"} 1.0' in metrics
    assert "meshgate_registry_evictions_total 0.0" in metrics

    assert httpx.delete(instance, headers=headers).status_code in (200, 204)
    left = _until(lambda: httpx.get(api, timeout=5).status_code == 503, 1.0)
    assert left >= 0, "still routed 1 s after deregistering"
    print(f"routed {joined * 1000:.0f} ms after registering, gone {left * 1000:.0f} ms after")


def test_the_admin_token_is_accepted_by_the_registry(
    start_gateway: GatewayFactory, demo_upstream: DemoUpstream
) -> None:
    gw = start_gateway(CONFIG, workers=1)
    res = gw.admin("GET", "/v1/registry/services")
    assert res.status_code == 200
    assert res.headers["x-meshgate-index"].isdigit()


def test_a_registry_change_waits_for_a_restart(
    start_gateway: GatewayFactory, demo_upstream: DemoUpstream
) -> None:
    gw = start_gateway(CONFIG, workers=1)
    changed = CONFIG.replace("registry: {persist: false}", "registry: {key_prefix: other}")
    res = gw.admin("POST", "/config", content=changed)
    assert res.status_code == 200, res.text
    assert res.json()["restart_required"] == ["gateway.registry"]
