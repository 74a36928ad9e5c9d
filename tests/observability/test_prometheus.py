"""Prometheus HTTP SD from the registry, and the rules and Grafana dashboard shipped
with the package, checked and unit-tested with the real promtool."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI

from meshgate.observability.prometheus import (
    GRAFANA_DASHBOARD,
    RULES,
    GatewayTarget,
    create_prometheus_router,
    http_sd_targets,
    scrape_configs,
)
from meshgate.registry import InstanceSpec, MemoryRegistry
from tests.observability.conftest import AUTH, authorize, require_binary
from tests.registry.conftest import Server

PROMTOOL = "/usr/bin/promtool"

GATEWAY_METRICS = {
    "meshgate_gateway_requests_total",
    "meshgate_gateway_request_duration_seconds_bucket",
    "meshgate_gateway_request_duration_seconds_count",
    "meshgate_gateway_upstream_duration_seconds_bucket",
    "meshgate_gateway_retries_total",
    "meshgate_gateway_retry_budget_exhausted_total",
    "meshgate_gateway_breaker_open",
}
SERVICE_METRICS = {
    "meshgate_service_requests_total",
    "meshgate_service_request_duration_seconds_bucket",
    "meshgate_client_breaker_open",
}
PLACEHOLDERS = {
    "meshgate_events_outbox_pending",
    "meshgate_events_outbox_oldest_age_seconds",
    "meshgate_events_consumer_lag",
    "meshgate_sagas",
}
"""Metrics the rules and dashboard use before anything exports them (documented)."""


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary(PROMTOOL, "prometheus"), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def recorded_names() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["record"] for g in groups for r in g["rules"] if "record" in r}


TARGET_LABELS = {"meshgate_kind", "meshgate_service", "meshgate_instance"}
"""Labels HTTP SD gives targets: not metrics."""


def metric_names(expr: str) -> set[str]:
    """Metric names in ``expr``, leaving out recorded series (``level:metric:op``)."""
    return set(re.findall(r"(?<![:\w])(meshgate_[a-z_]+)(?![\w:])", expr)) - TARGET_LABELS


def test_the_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 30 rules found" in result.stdout


def test_the_rules_reference_only_known_metrics() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    used = set().union(*(metric_names(r["expr"]) for g in groups for r in g["rules"]))
    assert used <= GATEWAY_METRICS | SERVICE_METRICS | PLACEHOLDERS, used - GATEWAY_METRICS
    for name in PLACEHOLDERS:
        assert name in RULES.read_text().split("groups:")[0], f"{name} not documented"


ANNOTATIONS = {
    "MeshgateGatewayErrorRatioHigh": {
        "summary": "Route api: 20% of requests fail (5xx)",
        "description": "More than 5 % of the requests of route api were answered with a 5xx "
        "for 5 minutes.",
    },
    "MeshgateErrorBudgetBurnFast": {
        "summary": "Route api burns its availability budget 14.4 times too fast"
    },
    "MeshgateLatencySLOBurnFast": {
        "summary": "Route api: too many requests slower than 0.5 s (latency budget burning "
        "14.4 times too fast)"
    },
    "MeshgateServiceErrorRatioHigh": {"summary": "Service users: 33.33% of requests fail (5xx)"},
    "MeshgateInstanceDown": {
        "summary": "users instance 127.0.0.1:9001 is registered but cannot be scraped",
        "description": "Prometheus found it through the registry (HTTP SD) and failed to scrape "
        "its metrics for a minute: it is hung, overloaded or gone without deregistering.",
    },
    "MeshgateCircuitBreakerOpen": {
        "summary": "The gateway's circuit breaker of upstream users is open"
    },
    "MeshgateOutboxLagging": {
        "summary": "The outbox of orders holds events older than a minute (5m 0s)"
    },
    "MeshgateConsumerLagging": {"summary": "Consumer orders of mail is 5000 events behind"},
    "MeshgateSagaStuck": {"summary": "2 sagas checkout are stuck"},
}
"""How each alert's annotations render in the tests below (their templates are tested too)."""


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    """An input series of a promtool test."""
    text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{text}}}", "values": values}


def _alert(name: str, at: str, labels: dict[str, str] | None) -> dict[str, Any]:
    """``name`` fires at ``at`` with ``labels`` (None: it does not fire)."""
    expected = (
        [{"exp_labels": labels, "exp_annotations": ANNOTATIONS[name]}] if labels is not None else []
    )
    return {"eval_time": at, "alertname": name, "exp_alerts": expected}


RULE_TESTS: dict[str, Any] = {
    "evaluation_interval": "1m",
    "tests": [
        {
            "name": "a failing route: error ratio, budget burn, recorded ratio",
            "interval": "1m",
            "input_series": [
                _series(
                    "meshgate_gateway_requests_total",
                    "0+60x90",
                    route="api",
                    upstream="up",
                    code="2xx",
                ),
                _series(
                    "meshgate_gateway_requests_total",
                    "0+15x90",
                    route="api",
                    upstream="up",
                    code="5xx",
                ),
                _series(
                    "meshgate_gateway_requests_total",
                    "0+60x90",
                    route="ok",
                    upstream="up",
                    code="2xx",
                ),
            ],
            "promql_expr_test": [
                {
                    "expr": "route:meshgate_gateway_errors:ratio_rate5m",
                    "eval_time": "10m",
                    "exp_samples": [
                        {
                            "labels": 'route:meshgate_gateway_errors:ratio_rate5m{route="api"}',
                            "value": 0.2,
                        },
                    ],
                }
            ],
            "alert_rule_test": [
                _alert("MeshgateGatewayErrorRatioHigh", "3m", None),
                _alert(
                    "MeshgateGatewayErrorRatioHigh", "12m", {"severity": "warning", "route": "api"}
                ),
                _alert("MeshgateErrorBudgetBurnFast", "70m", {"severity": "page", "route": "api"}),
            ],
        },
        {
            "name": "slow requests burn the latency budget",
            "interval": "1m",
            "input_series": [
                _series(
                    "meshgate_gateway_request_duration_seconds_bucket",
                    "0+50x90",
                    route="api",
                    upstream="up",
                    le="0.5",
                ),
                _series(
                    "meshgate_gateway_request_duration_seconds_count",
                    "0+100x90",
                    route="api",
                    upstream="up",
                ),
                _series(
                    "meshgate_gateway_request_duration_seconds_bucket",
                    "0+100x90",
                    route="fast",
                    upstream="up",
                    le="0.5",
                ),
                _series(
                    "meshgate_gateway_request_duration_seconds_count",
                    "0+100x90",
                    route="fast",
                    upstream="up",
                ),
            ],
            "alert_rule_test": [
                _alert("MeshgateLatencySLOBurnFast", "70m", {"severity": "page", "route": "api"}),
            ],
        },
        {
            "name": "services: errors by status; an instance that cannot be scraped",
            "interval": "1m",
            "input_series": [
                _series(
                    "meshgate_service_requests_total",
                    "0+60x30",
                    service="users",
                    method="GET",
                    route="/u",
                    code="200",
                ),
                _series(
                    "meshgate_service_requests_total",
                    "0+30x30",
                    service="users",
                    method="GET",
                    route="/u",
                    code="503",
                ),
                _series(
                    "up",
                    "1 1 0 0 0 0",
                    job="meshgate-services",
                    instance="127.0.0.1:9001",
                    meshgate_kind="service",
                    meshgate_service="users",
                ),
                _series(
                    "up",
                    "1 1 1 1 1 1",
                    job="meshgate-services",
                    instance="127.0.0.1:9002",
                    meshgate_kind="service",
                    meshgate_service="users",
                ),
            ],
            "alert_rule_test": [
                _alert(
                    "MeshgateServiceErrorRatioHigh",
                    "12m",
                    {"severity": "warning", "service": "users"},
                ),
                _alert("MeshgateInstanceDown", "2m", None),
                _alert(
                    "MeshgateInstanceDown",
                    "4m",
                    {
                        "severity": "warning",
                        "job": "meshgate-services",
                        "instance": "127.0.0.1:9001",
                        "meshgate_kind": "service",
                        "meshgate_service": "users",
                    },
                ),
            ],
        },
        {
            "name": "breakers, outbox, consumers and sagas (placeholder metrics)",
            "interval": "1m",
            "input_series": [
                _series(
                    "meshgate_gateway_breaker_open", "0 0 1 1 1 1", upstream="users", worker="1"
                ),
                _series("meshgate_events_outbox_oldest_age_seconds", "0+30x20", service="orders"),
                _series(
                    "meshgate_events_consumer_lag", "5000x20", service="mail", consumer="orders"
                ),
                _series("meshgate_sagas", "0 2x20", saga="checkout", status="stuck"),
                _series("meshgate_sagas", "7x20", saga="checkout", status="running"),
            ],
            "alert_rule_test": [
                _alert(
                    "MeshgateCircuitBreakerOpen", "4m", {"severity": "warning", "upstream": "users"}
                ),
                _alert(
                    "MeshgateOutboxLagging", "10m", {"severity": "warning", "service": "orders"}
                ),
                _alert(
                    "MeshgateConsumerLagging",
                    "12m",
                    {"severity": "warning", "service": "mail", "consumer": "orders"},
                ),
                _alert("MeshgateSagaStuck", "8m", {"severity": "warning", "saga": "checkout"}),
            ],
        },
    ],
}


def test_the_rules_pass_their_promtool_unit_tests(tmp_path: Path) -> None:
    tests = {"rule_files": [str(RULES)], **RULE_TESTS}
    path = tmp_path / "rules_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_wrong_expectation_fails_the_promtool_unit_tests(tmp_path: Path) -> None:
    """The rule tests can fail: the same error-ratio alert is expected on a healthy route."""
    tests = {"rule_files": [str(RULES)], **RULE_TESTS}
    tests["tests"] = [dict(RULE_TESTS["tests"][0])]
    tests["tests"][0]["alert_rule_test"] = [
        _alert("MeshgateGatewayErrorRatioHigh", "12m", {"severity": "warning", "route": "ok"})
    ]
    tests["tests"][0].pop("promql_expr_test")
    path = tmp_path / "rules_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = promtool("test", "rules", str(path))
    assert result.returncode != 0


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(GRAFANA_DASHBOARD.read_text())
    exprs = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        exprs.extend(t["expr"] for t in panel["targets"])
    return exprs


def test_the_grafana_dashboard_loads_and_every_expression_parses(tmp_path: Path) -> None:
    dashboard = json.loads(GRAFANA_DASHBOARD.read_text())
    assert dashboard["uid"] == "meshgate-system"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "route", "service"}
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    # Grafana's variables as Prometheus would see them once substituted.
    substituted = [
        e.replace("$__rate_interval", "5m").replace("$route", ".*").replace("$service", ".*")
        for e in exprs
    ]
    assert not any("$" in e for e in substituted), substituted
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr{i}", "expr": e} for i, e in enumerate(substituted)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    known = GATEWAY_METRICS | SERVICE_METRICS | PLACEHOLDERS | recorded_names()
    for expr in exprs:
        unknown = {n for n in metric_names(expr) if n not in known}
        unknown -= {n.split(":")[-1] for n in known}
        assert not unknown, (expr, unknown)


def test_a_broken_expression_fails_the_dashboard_check(tmp_path: Path) -> None:
    path = tmp_path / "broken.yml"
    rules = {"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": "sum by (route ("}]}]}
    path.write_text(yaml.safe_dump(rules))
    assert promtool("check", "rules", str(path)).returncode != 0


def _snapshot_of(*specs: tuple[str, str, InstanceSpec]) -> Any:
    async def build() -> Any:
        async with MemoryRegistry() as registry:
            for service, instance_id, spec in specs:
                await registry.register(service, instance_id, spec)
            return await registry.snapshot()

    return build


async def test_http_sd_lists_every_instance_and_the_gateway() -> None:
    snapshot = await _snapshot_of(
        ("users", "users-1", InstanceSpec(address="127.0.0.1:9001", version="1.2", zone="eu")),
        ("users", "users-2", InstanceSpec(address="127.0.0.1:9002")),
        (
            "web",
            "web-1",
            InstanceSpec(
                address="10.0.0.7:8443", metadata={"scheme": "https", "metrics_path": "/m"}
            ),
        ),
    )()
    groups = http_sd_targets(snapshot, GatewayTarget("127.0.0.1:9100"))
    assert groups == [
        {
            "targets": ["127.0.0.1:9001"],
            "labels": {
                "meshgate_kind": "service",
                "meshgate_service": "users",
                "meshgate_instance": "users-1",
                "__metrics_path__": "/metrics",
                "__scheme__": "http",
                "meshgate_version": "1.2",
                "meshgate_zone": "eu",
            },
        },
        {
            "targets": ["127.0.0.1:9002"],
            "labels": {
                "meshgate_kind": "service",
                "meshgate_service": "users",
                "meshgate_instance": "users-2",
                "__metrics_path__": "/metrics",
                "__scheme__": "http",
            },
        },
        {
            "targets": ["10.0.0.7:8443"],
            "labels": {
                "meshgate_kind": "service",
                "meshgate_service": "web",
                "meshgate_instance": "web-1",
                "__metrics_path__": "/m",
                "__scheme__": "https",
            },
        },
        {
            "targets": ["127.0.0.1:9100"],
            "labels": {
                "meshgate_kind": "gateway",
                "meshgate_service": "gateway",
                "__metrics_path__": "/metrics",
                "__scheme__": "http",
            },
        },
    ]
    assert [g["labels"]["meshgate_kind"] for g in http_sd_targets(snapshot, None, "service")] == [
        "service"
    ] * 3
    assert http_sd_targets(snapshot, GatewayTarget("h:1"), "gateway")[0]["targets"] == ["h:1"]
    assert http_sd_targets(snapshot, None, "gateway") == []


@pytest.fixture
async def sd_server() -> AsyncIterator[tuple[Server, MemoryRegistry]]:
    async with MemoryRegistry() as registry:
        app = FastAPI()
        app.include_router(
            create_prometheus_router(
                registry, authorize, gateway=lambda: GatewayTarget("127.0.0.1:1")
            )
        )
        server = await Server(app).start()
        try:
            yield server, registry
        finally:
            await server.stop()


async def test_the_sd_endpoint_follows_the_registry_behind_the_token(
    sd_server: tuple[Server, MemoryRegistry],
) -> None:
    server, registry = sd_server
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
        assert (await http.get("/v1/prometheus/targets")).status_code == 401
        res = await http.get("/v1/prometheus/targets", headers=AUTH)
        assert res.status_code == 200
        assert [g["labels"]["meshgate_kind"] for g in res.json()] == ["gateway"]
        await registry.register("users", "u1", InstanceSpec(address="127.0.0.1:9001"))
        res = await http.get("/v1/prometheus/targets", params={"kind": "service"}, headers=AUTH)
        assert [g["targets"] for g in res.json()] == [["127.0.0.1:9001"]]
        bad = await http.get("/v1/prometheus/targets", params={"kind": "all"}, headers=AUTH)
        assert bad.status_code == 400
        assert bad.headers["content-type"] == "application/problem+json"
        assert "kind='all': use service or gateway" in bad.json()["detail"]


def test_scrape_configs_keep_the_admin_token_away_from_services() -> None:
    jobs = scrape_configs(
        "http://127.0.0.1:9100/", sd_token_file="/s/registry.token", admin_token_file="/s/admin"
    )
    services, gateway = jobs
    assert services["job_name"] == "meshgate-services"
    assert "authorization" not in services  # scraping services sends no token
    assert services["http_sd_configs"] == [
        {
            "url": "http://127.0.0.1:9100/v1/prometheus/targets?kind=service",
            "refresh_interval": "10s",
            "authorization": {"type": "Bearer", "credentials_file": "/s/registry.token"},
        }
    ]
    assert gateway["authorization"] == {"type": "Bearer", "credentials_file": "/s/admin"}
    assert gateway["http_sd_configs"][0]["url"].endswith("?kind=gateway")
