"""The gateway as ``meshgate up`` runs it: the system's ports, token files and
registry file in its configuration, which stays valid."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml

from meshgate.config import loads
from meshgate.runner import StateDir, loads_system
from meshgate.runner.gateway import GATEWAY_READY_RE, plan_gateway

ROOT = Path(__file__).resolve().parents[2]


def test_the_system_file_owns_ports_and_tokens_live_in_the_state(tmp_path: Path) -> None:
    (tmp_path / "gw.yaml").write_text(
        "gateway:\n  listen: 127.0.0.1:8080\n  workers: 3\n  admin: {listen: 127.0.0.1:9901}\n"
        "routes:\n  - {name: users, match: {path_prefix: /users}, service: users}\n"
    )
    sf = loads_system(
        "gateway: {config: gw.yaml, listen: '127.0.0.1:8088', workers: 1}\n",
        tmp_path / "meshgate.yaml",
    )
    state = StateDir(sf.state)
    plan = plan_gateway(sf, state)
    assert (plan.listen, plan.admin, plan.workers) == ("127.0.0.1:8088", "127.0.0.1:0", 1)
    admin_file = sf.state / "admin.token"
    registry_file = sf.state / "registry.token"
    assert plan.admin_token == admin_file.read_text().strip()
    assert plan.registry_token == registry_file.read_text().strip()
    assert stat.S_IMODE(admin_file.stat().st_mode) == 0o600
    assert plan.admin_token != plan.registry_token
    plan.write(pinned=False)
    written = yaml.safe_load(plan.path.read_text())
    gw = written["gateway"]
    assert gw["listen"] == "127.0.0.1:8088"
    assert gw["workers"] == 1
    assert gw["admin"] == {"listen": "127.0.0.1:0", "token_file": str(admin_file)}
    assert gw["registry"] == {
        "token_file": str(registry_file),
        "path": str(sf.state / "registry.sqlite"),
    }
    assert written["routes"][0]["service"] == "users"
    # After the first start the chosen ports are kept for a restart.
    plan.started(8088, 41234)
    assert plan.url == "http://127.0.0.1:8088"
    assert plan.admin_url == "http://127.0.0.1:41234"
    plan.write(pinned=True)
    config = loads(plan.path.read_text())
    assert config.gateway.admin.listen.port == 41234
    # A second plan keeps the tokens (the files have content).
    again = plan_gateway(sf, state)
    assert (again.admin_token, again.registry_token) == (plan.admin_token, plan.registry_token)


def test_tokens_set_in_the_configuration_are_used(tmp_path: Path) -> None:
    (tmp_path / "gw.yaml").write_text(
        "gateway:\n"
        "  admin: {token: admin-token-0123456789}\n"
        "  registry: {token: registry-token-0123456789, persist: false}\n"
    )
    sf = loads_system("gateway: {config: gw.yaml}\n", tmp_path / "meshgate.yaml")
    plan = plan_gateway(sf, StateDir(sf.state))
    assert plan.admin_token == "admin-token-0123456789"
    assert plan.registry_token == "registry-token-0123456789"
    assert plan.admin_token_file is None
    assert not (sf.state / "admin.token").exists()
    assert "path" not in plan.document(pinned=False)["gateway"]["registry"]


def test_without_a_configuration_one_route_per_registered_service(tmp_path: Path) -> None:
    sf = loads_system(
        "services:\n"
        "  users: {app: x:y}\n"
        "  files: {command: 'srv {port}'}\n"
        "  worker: {command: work}\n",
        tmp_path / "meshgate.yaml",
    )
    plan = plan_gateway(sf, StateDir(sf.state))
    routes = {r.name: r for r in plan.config.routes}
    assert set(routes) == {"users", "files"}
    assert routes["users"].match.path_prefix == "/users"
    assert routes["users"].strip_prefix
    assert routes["users"].service == "users"
    assert plan.config.gateway.worker_count == 1
    assert not plan.config.gateway.registry.persist


@pytest.mark.parametrize("workers", ["2 workers", "1 worker"])
def test_the_ready_line_of_the_gateway_is_understood(workers: str) -> None:
    line = (
        f"meshgate 0.1.0: gateway on http://127.0.0.1:8080 ({workers}); "
        "admin on https://127.0.0.1:9901"
    )
    match = GATEWAY_READY_RE.search(line)
    assert match is not None
    assert (match["port"], match["admin_scheme"], match["admin_port"]) == ("8080", "https", "9901")


def test_the_shop_gateway_is_planned(tmp_path: Path) -> None:
    sf = loads_system(
        (ROOT / "examples" / "shop" / "meshgate.yaml")
        .read_text()
        .replace("root: ../..", f"root: {ROOT}")
        .replace("config: gateway.yaml", f"config: {ROOT / 'examples/shop/gateway.yaml'}"),
        tmp_path / "meshgate.yaml",
    )
    plan = plan_gateway(sf, StateDir(sf.state))
    assert plan.listen == "127.0.0.1:8080"
    assert plan.admin == "127.0.0.1:0"  # gateway.yaml's 9901 is replaced: no collision
    plan.write(pinned=False)
    assert len(loads(plan.path.read_text()).routes) == 7
