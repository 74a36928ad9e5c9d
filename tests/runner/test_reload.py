"""What an edit of the system file does to a running system: what is applied at
once (replicas), what the next start of an instance takes (env and the other
settings of a service), and what needs a new up."""

from __future__ import annotations

from pathlib import Path

from meshgate.runner import loads_system
from meshgate.runner.model import System
from meshgate.runner.reload import compare

BASE = """\
env: {LEVEL: info}
services:
  users:
    command: ["{python}", "-m", "http.server", "{port}"]
    replicas: 2
    env: {COLOR: red}
  web:
    command: ["{python}", "-m", "http.server", "{port}"]
    depends_on: [users]
"""


def system(text: str, tmp_path: Path) -> System:
    return loads_system(text, tmp_path / "meshgate.yaml").system


def test_nothing_changed(tmp_path: Path) -> None:
    change = compare(system(BASE, tmp_path), system(BASE, tmp_path))
    assert change.empty


def test_replicas_and_env_of_a_service(tmp_path: Path) -> None:
    new = BASE.replace("replicas: 2", "replicas: 3").replace("COLOR: red", "COLOR: blue")
    change = compare(system(BASE, tmp_path), system(new, tmp_path))
    assert change.replicas == {"users": 3}
    assert change.restart == {"users": ["env"]}
    assert change.new_up == []
    assert change.system.services["users"].env == {"COLOR": "blue"}
    assert change.system.services["users"].replicas == 3


def test_the_env_of_the_system_concerns_every_service(tmp_path: Path) -> None:
    change = compare(system(BASE, tmp_path), system(BASE.replace("info", "debug"), tmp_path))
    assert change.restart == {"users": ["env (of the system)"], "web": ["env (of the system)"]}
    assert change.system.env == {"LEVEL": "debug"}


def test_what_needs_a_new_up_is_not_applied(tmp_path: Path) -> None:
    new = (
        BASE.replace("    depends_on: [users]\n", "")
        + "  search:\n    command: [sleep, '60']\n"
        + "gateway: {listen: '127.0.0.1:8080'}\nname: renamed\n"
        + "observability: {sampling: {ratio: 0.5}}\n"
    )
    old = system(BASE, tmp_path)
    change = compare(old, system(new, tmp_path))
    assert change.new_up == [
        "name",
        "gateway",
        "observability",
        "services added (search)",
        "services.web.depends_on",
    ]
    assert change.system.name == old.name
    assert change.system.gateway == old.gateway
    assert change.system.observability == old.observability
    assert set(change.system.services) == {"users", "web"}
    assert change.system.services["web"].depends_on == ("users",)
    assert change.restart == {}


def test_a_removed_service_keeps_running(tmp_path: Path) -> None:
    new = BASE[: BASE.index("  web:")]
    change = compare(system(BASE, tmp_path), system(new, tmp_path))
    assert change.new_up == ["services removed (web)"]
    assert "web" in change.system.services
