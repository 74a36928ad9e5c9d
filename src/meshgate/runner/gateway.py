"""The gateway as the runner runs it: its configuration with the system's ports,
token files and registry file filled in, written to the state folder.

The system file owns the ports (``gateway.listen`` and ``gateway.admin``, a free
port when left out), so the same ``gateway.yaml`` serves ``meshgate gateway``
and ``meshgate up``. Token files and the registry's SQLite file default to the
state folder instead of ``~/.meshgate``, so that systems do not share them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from meshgate.config.loader import loads
from meshgate.config.model import Config
from meshgate.runner.loader import SystemFile, registers
from meshgate.runner.state import StateDir, write_private
from meshgate.runner.telemetry import apply_gateway_tracing, gateway_tracing

__all__ = [
    "GATEWAY_READY_RE",
    "GatewayPlan",
    "fill_registry_path",
    "generated_config",
    "plan_gateway",
]

GATEWAY_READY_RE = re.compile(
    r"gateway on (?P<scheme>https?)://(?P<host>\S+):(?P<port>\d+) \((?P<workers>\d+) workers?\); "
    r"admin on (?P<admin_scheme>https?)://(?P<admin_host>\S+):(?P<admin_port>\d+)"
)
"""The line ``meshgate gateway`` prints once it serves."""


def _client_host(host: str) -> str:
    """Where a client on this machine reaches a listener bound to ``host``."""
    if host in ("0.0.0.0", "", "*"):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@dataclass
class GatewayPlan:
    """How the gateway of a system is run."""

    base: dict[str, Any]
    """Its configuration as written (or generated), before the runner's changes."""
    config: Config
    """That configuration, validated."""
    path: Path
    """Where the configuration as run is written (the state folder)."""
    listen: str
    """``host:port`` to listen on; port 0 until the first start chose one."""
    admin: str
    """The admin listener; port 0 until the first start chose one."""
    workers: int | None
    """``--workers``, or None for the configuration's."""
    admin_token: str
    """The admin API's bearer token."""
    admin_token_file: Path | None
    """Where it is kept (None when the configuration sets it)."""
    registry_token: str | None
    """The registry's bearer token (None when the registry is disabled)."""
    registry_token_file: Path | None
    """Where it is kept (None when set in the configuration or disabled)."""
    tracing: dict[str, Any] = field(default_factory=dict)
    """What its ``gateway.tracing`` gets unless its file sets it (export headers,
    sampling ratio: see :func:`meshgate.runner.telemetry.gateway_tracing`)."""
    scheme: str = "http"
    admin_scheme: str = "http"
    port: int = 0
    """The port it listens on, once known."""
    admin_port: int = 0
    """The admin port, once known."""

    @property
    def url(self) -> str:
        host = _client_host(self.listen.rpartition(":")[0])
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def admin_url(self) -> str:
        """The admin listener's URL: with the port it chose, or before its first start
        the one configured (0 when it is left free)."""
        host, _, configured = self.admin.rpartition(":")
        return f"{self.admin_scheme}://{_client_host(host)}:{self.admin_port or int(configured)}"

    def replace(self, base: dict[str, Any], config: Config, state: StateDir) -> None:
        """Take a new version of the configuration (the file changed); ports and
        tokens stay as they are."""
        fill_registry_path(base, config, state)
        self.base, self.config = base, config

    def fixed_ports(self, *, pinned: bool) -> tuple[tuple[str, int, str], ...]:
        """The ports the gateway must find free before it starts, as (host, port,
        where it comes from): those configured, and once pinned those it had."""
        out = []
        for address, known, where in (
            (self.listen, self.port, "gateway.listen"),
            (self.admin, self.admin_port, "gateway.admin"),
        ):
            host, _, configured = address.rpartition(":")
            if int(configured):
                out.append((host, int(configured), where))
            elif pinned and known:
                out.append((host, known, f"{where}, the port it had before it restarted"))
        return tuple(out)

    def started(self, port: int, admin_port: int) -> None:
        """Record the ports the gateway chose, so that a restart keeps them (services
        know the registry by its URL)."""
        self.port, self.admin_port = port, admin_port

    def document(self, *, pinned: bool) -> dict[str, Any]:
        """The configuration as run: ``pinned`` puts in the ports chosen at the first
        start (for a restart), otherwise the ports as configured."""
        doc = _deep_copy(self.base)
        gw = doc.setdefault("gateway", {})
        listen, admin = self.listen, self.admin
        if pinned and self.port:
            listen = f"{listen.rpartition(':')[0]}:{self.port}"
            admin = f"{admin.rpartition(':')[0]}:{self.admin_port}"
        gw["listen"] = listen
        if self.workers is not None:
            gw["workers"] = self.workers
        admin_doc = gw.setdefault("admin", {})
        admin_doc["listen"] = admin
        if self.admin_token_file is not None:
            admin_doc["token_file"] = str(self.admin_token_file)
        registry = gw.setdefault("registry", {})
        if self.registry_token_file is not None:
            registry["token_file"] = str(self.registry_token_file)
        apply_gateway_tracing(doc, self.tracing)
        return doc

    def write(self, *, pinned: bool) -> None:
        """Write the configuration as run (validated again: it must stay valid)."""
        text = yaml.safe_dump(self.document(pinned=pinned), sort_keys=False)
        loads(text, str(self.path))
        # Private: the export headers in it may carry a token.
        write_private(
            self.path,
            "# Written by meshgate up from the system file; edits here are overwritten.\n" + text,
        )


def _deep_copy(value: dict[str, Any]) -> dict[str, Any]:
    copied: dict[str, Any] = _copy(value)
    return copied


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def generated_config(sf: SystemFile) -> dict[str, Any]:
    """The gateway configuration of a system file without ``gateway.config``: one
    route ``/<service>`` (prefix stripped) per service in the registry."""
    routes = [
        {"name": name, "match": {"path_prefix": f"/{name}"}, "service": name, "strip_prefix": True}
        for name, spec in sf.system.services.items()
        if registers(spec)
    ]
    return {"gateway": {"workers": 1, "registry": {"persist": False}}, "routes": routes}


def plan_gateway(sf: SystemFile, state: StateDir) -> GatewayPlan:
    """How to run the system's gateway; makes the token files it needs."""
    if sf.gateway_config_path is not None:
        base = yaml.safe_load(sf.gateway_config_path.read_text(encoding="utf-8")) or {}
    else:
        base = generated_config(sf)
    config = sf.gateway_config or loads(yaml.safe_dump(base), "(generated)")
    spec = sf.system.gateway
    gw = config.gateway
    listen = str(spec.listen or gw.listen.model_copy(update={"port": 0}))
    admin = str(spec.admin or gw.admin.listen.model_copy(update={"port": 0}))
    if gw.admin.token is not None:
        admin_token, admin_file = gw.admin.token.get_secret_value(), None
    else:
        admin_file = _token_path(sf, gw.admin.token_file, state.path / "admin.token")
        admin_token = StateDir.token_at(admin_file)
    registry_token: str | None = None
    registry_file: Path | None = None
    registry = gw.registry
    if registry.enabled:
        if registry.token is not None:
            registry_token = registry.token.get_secret_value()
        else:
            registry_file = _token_path(sf, registry.token_file, state.path / "registry.token")
            registry_token = StateDir.token_at(registry_file)
    fill_registry_path(base, config, state)
    return GatewayPlan(
        base=base,
        config=config,
        path=state.gateway_config,
        listen=listen,
        admin=admin,
        workers=spec.workers,
        admin_token=admin_token,
        admin_token_file=admin_file,
        registry_token=registry_token,
        registry_token_file=registry_file,
        tracing=gateway_tracing(sf.system, admin_token),
        scheme="https" if gw.tls is not None else "http",
        admin_scheme="https" if gw.admin.tls is not None else "http",
    )


def fill_registry_path(base: dict[str, Any], config: Config, state: StateDir) -> None:
    """A persisted registry without a path is kept in the state folder (not in
    ``~/.meshgate``, where its name would depend on a port chosen at random)."""
    registry = config.gateway.registry
    if registry.enabled and registry.persist and registry.path is None and registry.redis is None:
        base.setdefault("gateway", {}).setdefault("registry", {})["path"] = str(
            state.path / "registry.sqlite"
        )


def _token_path(sf: SystemFile, configured: str | None, default: Path) -> Path:
    if configured is None:
        return default
    # The gateway runs in the system's root, where it reads a relative path.
    return (sf.root / Path(configured).expanduser()).resolve()
