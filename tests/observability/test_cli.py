"""``meshgate traces`` and ``meshgate traces show`` against a real gateway's collector,
found by URL or through the state folder of a running system."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from meshgate.cli import app
from meshgate.runner.state import StateDir
from tests.e2e.conftest import TOKEN
from tests.observability.conftest import RunningSystem
from tests.observability.otel import System, shop_trace

pytestmark = pytest.mark.e2e


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("COLUMNS", "220")
    monkeypatch.delenv("MESHGATE_ADMIN_URL", raising=False)
    monkeypatch.delenv("MESHGATE_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("MESHGATE_FILE", raising=False)
    return CliRunner()


@pytest.fixture
def traced(running_system: RunningSystem, system: System) -> tuple[RunningSystem, str, str]:
    slow = shop_trace(system, orders_ms=300, fail_users=True)
    fast = shop_trace(system, orders_ms=5)
    with system.tracer("orders").start_as_current_span("noise"):
        pass
    running_system.export(system)
    return running_system, slow, fast


def test_traces_lists_filters_and_prints_json(
    runner: CliRunner, traced: tuple[RunningSystem, str, str]
) -> None:
    running, slow, fast = traced
    env = {"MESHGATE_ADMIN_TOKEN": TOKEN}
    base = ["traces", "--admin-url", running.admin_url]
    listed = runner.invoke(app, base, env=env)
    assert listed.exit_code == 0, listed.output
    assert slow in listed.output
    assert fast in listed.output
    assert "gateway: GET /api/orders" in listed.output
    assert "3 errors" in listed.output
    slow_only = runner.invoke(app, [*base, "--slow", "200ms", "--json"], env=env)
    assert slow_only.exit_code == 0, slow_only.output
    assert [t["trace_id"] for t in json.loads(slow_only.output)["traces"]] == [slow]
    errors = runner.invoke(app, [*base, "--errors", "--service", "users", "--json"], env=env)
    assert [t["trace_id"] for t in json.loads(errors.output)["traces"]] == [slow]
    nothing = runner.invoke(app, [*base, "--service", "nobody"], env=env)
    assert nothing.exit_code == 0
    assert "no trace matches" in nothing.output
    bad = runner.invoke(app, [*base, "--slow", "soon"], env=env)
    assert bad.exit_code == 1
    assert "slow='soon': write a duration such as 200ms" in bad.output


def test_show_prints_the_waterfall(
    runner: CliRunner, traced: tuple[RunningSystem, str, str]
) -> None:
    running, slow, _ = traced
    env = {"MESHGATE_ADMIN_TOKEN": TOKEN}
    shown = runner.invoke(app, ["traces", "show", slow, "--admin-url", running.admin_url], env=env)
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[0].startswith(f"trace {slow}  310 ms, 6 spans")
    assert lines[0].endswith("error")
    rows = {line.split()[0]: line for line in lines[2:8]}
    assert set(rows) == {"GET", "upstream", "SELECT"}  # span names' first words
    select = next(line for line in lines if "SELECT orders" in line)
    assert "    SELECT orders" in select  # indented under GET /orders
    assert "█" in select
    assert select.rstrip().endswith("150 ms")
    assert lines[-1].startswith("self time: orders")
    as_json = runner.invoke(
        app, ["traces", "--admin-url", running.admin_url, "show", slow, "--json"], env=env
    )
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output)["span_count"] == 6
    missing = runner.invoke(
        app, ["traces", "show", "ab" * 16, "--admin-url", running.admin_url], env=env
    )
    assert missing.exit_code == 1
    assert f"error: no trace {'ab' * 16} is kept" in missing.output


def test_the_running_system_is_found_through_its_state_folder(
    runner: CliRunner, traced: tuple[RunningSystem, str, str], tmp_path: Path
) -> None:
    running, slow, _ = traced
    system_file = tmp_path / "shop" / "meshgate.yaml"
    state = StateDir(system_file.parent / ".meshgate")
    state.prepare()
    token_file = state.path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    result = runner.invoke(app, ["traces", "--file", str(system_file)])
    assert result.exit_code == 1
    assert f"nothing runs from {state.path}" in result.output
    state.acquire()
    try:
        state.write_state(
            {"gateway": {"admin_url": running.admin_url, "admin_token_file": str(token_file)}}
        )
        result = runner.invoke(app, ["traces", "--file", str(system_file), "--json"])
        assert result.exit_code == 0, result.output
        assert slow in {t["trace_id"] for t in json.loads(result.output)["traces"]}
        shown = runner.invoke(
            app, ["traces", "show", slow, "--json"], env={"MESHGATE_FILE": str(system_file)}
        )
        assert shown.exit_code == 0, shown.output
        token_file.write_text("wrong-token\n")
        refused = runner.invoke(app, ["traces", "--file", str(system_file)])
        assert refused.exit_code == 1
        assert "refused the admin token (401)" in refused.output
    finally:
        state.release()


def test_a_url_without_a_token_or_a_dead_gateway_is_explained(runner: CliRunner) -> None:
    result = runner.invoke(app, ["traces", "--admin-url", "http://127.0.0.1:9"])
    assert result.exit_code == 1
    assert "needs the admin token: give --token-file or set MESHGATE_ADMIN_TOKEN" in result.output
    result = runner.invoke(
        app, ["traces", "--admin-url", "http://127.0.0.1:9"], env={"MESHGATE_ADMIN_TOKEN": "x"}
    )
    assert result.exit_code == 1
    assert "cannot reach the admin API at http://127.0.0.1:9" in result.output
