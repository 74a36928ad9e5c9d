"""Loading a system file: YAML -> a validated :class:`SystemFile`, or a
:class:`~meshgate.errors.ConfigError` listing every problem with the path of the
field, its line and the fix, worded like the gateway configuration's errors.

The gateway configuration that the system file names is validated too (its errors
name that file). Checks across fields: ``app`` or ``command``, dependencies that
exist and do not form a cycle, placeholders, ports that do not overlap.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from meshgate.config.loader import (
    _dedupe,
    _sorted,
    _suggest,
    locate,
    parse_document,
    translate,
)
from meshgate.config.loader import load as load_gateway_config
from meshgate.config.model import Config
from meshgate.errors import ConfigError, ConfigIssue
from meshgate.runner.model import GatewaySpec, ReadySpec, ServiceSpec, System

__all__ = [
    "EXAMPLE_PLACEHOLDERS",
    "SERVICE_PLACEHOLDERS",
    "SystemFile",
    "expand",
    "load_system",
    "loads_system",
    "placeholders",
    "start_order",
]

DEFAULT_FILE = "meshgate.yaml"
"""The system file ``meshgate up`` reads when none is given."""
STATE_FOLDER = ".meshgate"
"""The state folder's name, beside the system file."""

SERVICE_PLACEHOLDERS = frozenset(
    {"state", "root", "system", "name", "instance", "index", "python", "gateway", "admin"}
)
"""Placeholders in a service's ``env`` (and ``command``, which also has ``{port}``)."""
EXAMPLE_PLACEHOLDERS = frozenset(
    {"state", "root", "system", "python", "gateway", "admin", "admin_token_file"}
)
"""Placeholders in ``examples``."""
RESERVED_NAMES = frozenset({"gateway", "nats"})
"""Instance names the runner uses for itself."""

_FORMATTER = string.Formatter()


@dataclass(frozen=True)
class SystemFile:
    """A validated system file and the paths it resolves to."""

    path: Path
    """The system file (absolute)."""
    system: System
    """Its content."""
    root: Path
    """The folder processes run in (absolute)."""
    gateway_config_path: Path | None
    """The gateway configuration file (absolute), or None for a generated one."""
    gateway_config: Config | None
    """That file, validated."""
    warnings: tuple[str, ...] = field(default=())
    """Things that are allowed but probably not meant (printed by ``up``)."""

    @property
    def folder(self) -> Path:
        """The system file's folder."""
        return self.path.parent

    @property
    def state(self) -> Path:
        """The state folder: ``.meshgate`` beside the system file."""
        return self.folder / STATE_FOLDER

    @property
    def name(self) -> str:
        """The system's name: ``name``, or the folder's."""
        if self.system.name:
            return self.system.name
        cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", self.folder.name).strip("-._")
        return cleaned[:63] or "system"


# ---------------------------------------------------------------------------- loading


def load_system(path: str | Path) -> SystemFile:
    """Read and validate a system file (and the gateway configuration it names).

    Raises:
        ConfigError: the file is missing, not YAML, or not a valid system; or the
            gateway configuration it names is not valid (that error names that file).
    """
    path = Path(path).absolute()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        fix = (
            f"check the path, or write a {DEFAULT_FILE} (see docs/up.md)"
            if path.name == DEFAULT_FILE
            else "check the path"
        )
        raise ConfigError(
            [ConfigIssue("", f"no such file {str(path)!r}; {fix}")], str(path)
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue("", f"cannot read the file: {exc}")], str(path)) from None
    return loads_system(text, path)


def loads_system(text: str, path: str | Path) -> SystemFile:
    """Validate a system file given as YAML text; ``path`` is where it lives (relative
    paths in it are read from its folder) and names it in errors."""
    path = Path(path).absolute()
    source = str(path)
    data, node = parse_document(text, source, "gateway and services")
    try:
        system = System.model_validate(data)
    except ValidationError as exc:
        issues = [translate(err, node, System) for err in exc.errors(include_url=False)]
        raise ConfigError(_sorted(_dedupe(issues)), source) from None
    issues = list(check(system, path.parent))
    if issues:
        raise ConfigError(_sorted([locate(i, node) for i in issues]), source)
    root = (path.parent / system.root).resolve()
    config_path = None
    config = None
    if system.gateway.config is not None:
        config_path = (path.parent / system.gateway.config).resolve()
        config = load_gateway_config(config_path)
        issues = list(_check_gateway(system, config))
        if issues:
            raise ConfigError(_sorted([locate(i, node) for i in issues]), source)
    warnings = tuple(_warnings(system, config))
    return SystemFile(path, system, root, config_path, config, warnings)


# ---------------------------------------------------------------------------- checks


def check(system: System, folder: Path) -> Iterable[ConfigIssue]:
    """Problems across fields: what to run, dependencies, placeholders, ports, paths."""
    root = folder / system.root
    if not root.is_dir():
        yield ConfigIssue(
            "root",
            f"no such folder {str(root.resolve())!r}; give the folder processes run in, "
            "relative to the system file",
        )
    if system.gateway.config is not None and not (folder / system.gateway.config).is_file():
        yield ConfigIssue(
            "gateway.config",
            f"no such file {str((folder / system.gateway.config).resolve())!r}; check the "
            "path (relative to the system file), or leave config out for a generated one",
        )
    names = sorted(system.services)
    for name, spec in system.services.items():
        yield from _check_service(name, spec, names)
    yield from _cycles(system)
    for key, value in system.env.items():
        yield from _check_text(f"env.{key}", value, SERVICE_PLACEHOLDERS)
    for i, line in enumerate(system.examples):
        yield from _check_text(f"examples[{i}]", line, EXAMPLE_PLACEHOLDERS)
    yield from _ports(system)


def _check_service(name: str, spec: ServiceSpec, names: Sequence[str]) -> Iterable[ConfigIssue]:
    where = f"services.{name}"
    if name in RESERVED_NAMES:
        yield ConfigIssue(
            where,
            f"{name!r} is the runner's name for the "
            f"{'gateway' if name == 'gateway' else 'embedded nats-server'}; give the service "
            "another",
        )
    if spec.app is None and spec.command is None:
        yield ConfigIssue(
            where,
            "nothing to run: give app (module:attribute of a meshgate Service) or "
            "command (a program, with {port} where it should listen)",
        )
    if spec.app is not None and spec.command is not None:
        yield ConfigIssue(
            f"{where}.command",
            "give app or command, not both: app runs a meshgate Service with meshgate serve",
        )
    if spec.migrate and spec.app is None:
        yield ConfigIssue(
            f"{where}.migrate",
            "migrate runs meshgate db upgrade of an app's module; it needs app: "
            "(run the migrations in the command instead)",
        )
    if spec.app is not None and spec.registry is not None:
        yield ConfigIssue(
            f"{where}.registry",
            "an app registers itself once ready; registry is for command services",
        )
    if spec.app is None and "log_level" in spec.model_fields_set:
        yield ConfigIssue(
            f"{where}.log_level",
            "log_level is passed to meshgate serve, so it needs app:; give a command "
            "its log level in its arguments or env",
        )
    yield from _check_ready(where, spec)
    for i, dep in enumerate(spec.depends_on):
        if dep == name:
            yield ConfigIssue(
                f"{where}.depends_on[{i}]", "a service cannot depend on itself; remove it"
            )
        elif dep not in names:
            yield ConfigIssue(
                f"{where}.depends_on[{i}]",
                f"no service named {dep!r}{_suggest(dep, names)}; known: {', '.join(names)}",
            )
    for key, value in spec.env.items():
        yield from _check_text(f"{where}.env.{key}", value, SERVICE_PLACEHOLDERS)
    for key in ("database", "cache", "broker"):
        value = getattr(spec, key)
        if value is not None:
            yield from _check_text(f"{where}.{key}", value, SERVICE_PLACEHOLDERS)
    for i, arg in enumerate(spec.command or ()):
        yield from _check_text(
            f"{where}.command[{i}]", arg, SERVICE_PLACEHOLDERS | {"port"}, "command"
        )


def _check_ready(where: str, spec: ServiceSpec) -> Iterable[ConfigIssue]:
    ready = spec.ready
    given = [
        k for k in ("http", "tcp", "log") if k in ready.model_fields_set and ready_on(ready, k)
    ]
    if len(given) > 1:
        yield ConfigIssue(
            f"{where}.ready",
            f"give one way to know readiness, not {' and '.join(given)}",
        )
    if spec.app is not None and (ready.tcp or ready.log is not None):
        yield ConfigIssue(
            f"{where}.ready",
            "an app is ready when its /health/ready passes and it is registered; give "
            "ready.http to probe another path, or only ready.timeout",
        )


def ready_on(ready: ReadySpec, kind: str) -> bool:
    """Whether ``ready`` uses ``kind`` (``http``, ``tcp`` or ``log``)."""
    if kind == "tcp":
        return ready.tcp
    return getattr(ready, kind) is not None


def _check_text(
    path: str, text: str, known: frozenset[str], what: str = "value"
) -> Iterable[ConfigIssue]:
    try:
        used = placeholders(text)
    except ValueError as exc:
        yield ConfigIssue(path, f"{exc}; write {{{{ and }}}} for a literal brace")
        return
    for name in used:
        if name not in known:
            extra = (
                " ({port} is only known for a command)"
                if name == "port" and what != "command"
                else ""
            )
            yield ConfigIssue(
                path,
                f"unknown placeholder {{{name}}}{_suggest(name, sorted(known))}{extra}; known: "
                f"{', '.join(sorted(known))}; write {{{{ and }}}} for a literal brace",
            )


def _cycles(system: System) -> Iterable[ConfigIssue]:
    """One issue per dependency cycle, naming its path (``a -> b -> a``)."""
    graph = {
        n: [d for d in s.depends_on if d in system.services] for n, s in system.services.items()
    }
    done: set[str] = set()
    reported: set[frozenset[str]] = set()

    def visit(node: str, trail: list[str]) -> Iterable[ConfigIssue]:
        if node in trail:
            cycle = [*trail[trail.index(node) :], node]
            key = frozenset(cycle)
            if key not in reported:
                reported.add(key)
                yield ConfigIssue(
                    f"services.{cycle[0]}.depends_on",
                    f"dependency cycle {' -> '.join(cycle)}: nothing in it could start "
                    "first; remove one of these dependencies",
                )
            return
        if node in done:
            return
        for dep in graph[node]:
            yield from visit(dep, [*trail, node])
        done.add(node)

    for name in graph:
        yield from visit(name, [])


def _ports(system: System) -> Iterable[ConfigIssue]:
    taken: dict[int, str] = {}
    gateway: GatewaySpec = system.gateway
    for label, address in (("gateway.listen", gateway.listen), ("gateway.admin", gateway.admin)):
        if address is not None and address.port:
            if address.port in taken:
                yield ConfigIssue(
                    label,
                    f"port {address.port} is also {taken[address.port]}; give each its own "
                    "port, or leave it out for a free one",
                )
            taken[address.port] = label
    for name, spec in system.services.items():
        if spec.port is None:
            continue
        last = spec.port + max(spec.replicas, 1) - 1
        if last > 65535:
            yield ConfigIssue(
                f"services.{name}.port",
                f"{spec.replicas} instances from port {spec.port} go past 65535; give a lower port",
            )
        for port in range(spec.port, min(last, 65535) + 1):
            if port in taken:
                yield ConfigIssue(
                    f"services.{name}.port",
                    f"port {port} (instance {port - spec.port + 1}) is also "
                    f"{taken[port]}; instance N listens on port + N - 1, so give "
                    "ranges that do not overlap, or leave port out for free ports",
                )
                break
            taken[port] = f"services.{name}.port"


def _needs_registry(system: System) -> list[str]:
    return [n for n, s in system.services.items() if registers(s)]


def registers(spec: ServiceSpec) -> bool:
    """Whether the instances of ``spec`` are in the registry (by themselves or by the
    runner)."""
    if spec.app is not None:
        return True
    if spec.registry is not None:
        return spec.registry
    ready = readiness(spec)
    return ready.http is not None or ready.tcp


def readiness(spec: ServiceSpec) -> ReadySpec:
    """How the readiness of ``spec``'s instances is known, defaults applied: a command
    that mentions ``{port}`` and says nothing else is ready once its port accepts
    connections; one that does not mention it, as soon as it runs."""
    ready = spec.ready
    explicit = {"http", "tcp", "log"} & ready.model_fields_set
    if spec.command is not None and not explicit and uses_port(spec):
        return ready.model_copy(update={"tcp": True})
    return ready


def uses_port(spec: ServiceSpec) -> bool:
    """Whether a command's arguments or environment mention ``{port}``."""
    texts = [*(spec.command or ()), *spec.env.values()]
    return any("port" in _safe_placeholders(t) for t in texts)


def _safe_placeholders(text: str) -> list[str]:
    try:
        return placeholders(text)
    except ValueError:
        return []


def _check_gateway(system: System, config: Config) -> Iterable[ConfigIssue]:
    registered = _needs_registry(system)
    if registered and not config.gateway.registry.enabled:
        yield ConfigIssue(
            "gateway.config",
            f"{', '.join(registered)} register in the gateway's registry, which "
            f"{system.gateway.config} disables (gateway.registry.enabled: false); enable it",
        )


def _warnings(system: System, config: Config | None) -> Iterable[str]:
    if config is None:
        return
    for i, route in enumerate(config.routes):
        if route.service is not None and route.service not in system.services:
            yield (
                f"{system.gateway.config}: routes[{i}] ({route.name}) sends to service "
                f"{route.service!r}, which this system does not run; it answers 503 until "
                "an instance registers"
            )


# ---------------------------------------------------------------------------- order


def start_order(system: System) -> list[str]:
    """The services in an order that starts each after its dependencies (ties in file
    order). The system must be valid (no cycle)."""
    order: list[str] = []
    placed: set[str] = set()
    pending = list(system.services)
    while pending:
        for name in pending:
            if all(d in placed for d in system.services[name].depends_on):
                order.append(name)
                placed.add(name)
                pending.remove(name)
                break
        else:  # pragma: no cover - the loader refuses cycles
            raise ValueError(f"dependency cycle among {', '.join(pending)}")
    return order


# ---------------------------------------------------------------------------- placeholders


def placeholders(text: str) -> list[str]:
    """The placeholder names in ``text`` (``{port}`` -> ``port``).

    Raises:
        ValueError: a brace is unmatched, or a placeholder is more than a name.
    """
    names = []
    try:
        parsed = list(_FORMATTER.parse(text))
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if spec or conversion or not name.isidentifier():
            shown = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ValueError(f"{{{shown}}} is not a placeholder name")
        names.append(name)
    return names


def expand(text: str, values: Mapping[str, object]) -> str:
    """``text`` with its placeholders replaced (validated beforehand by the loader)."""
    return text.format_map(values)


# ---------------------------------------------------------------------------- errors
