"""``meshgate up``: run a whole system as supervised processes.

:class:`Runner` starts the gateway (which hosts the registry), then each service
once the services it depends on are ready (running its migrations first when
asked), waiting for readiness rather than sleeping. It merges every process's
output into one stream, restarts what crashes with backoff, serves ``ps``,
``scale`` and ``down`` on its control endpoint, and on Ctrl-C, SIGTERM or
``down`` stops the services in reverse dependency order (each drains), then the
gateway, and checks by PID that no process it started is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from rich.console import Console
from rich.text import Text

from meshgate._files import file_signature
from meshgate.config.loader import load as load_gateway_config
from meshgate.config.model import Config
from meshgate.errors import ConfigError
from meshgate.runner.control import ControlServer
from meshgate.runner.errors import StartupError
from meshgate.runner.events import EventsPlan
from meshgate.runner.gateway import GatewayPlan, plan_gateway
from meshgate.runner.instance import (
    Context,
    Instance,
    Kind,
    Launch,
    Spawned,
    describe_exit,
)
from meshgate.runner.loader import (
    SystemFile,
    expand,
    load_system,
    readiness,
    registers,
    start_order,
)
from meshgate.runner.logs import LogPrinter
from meshgate.runner.model import EMBEDDED, ReadySpec, ServiceSpec
from meshgate.runner.procs import (
    OWNERSHIP_KNOWN,
    Pid,
    Watchdog,
    descendants,
    group_members,
    kill_leftovers,
)
from meshgate.runner.procs import signal_group as _signal_group
from meshgate.runner.reload import Change, compare
from meshgate.runner.render import instances_table, plural
from meshgate.runner.state import StateDir
from meshgate.runner.systems import record_system
from meshgate.runner.telemetry import process_env, reserve_admin_port

__all__ = ["Runner"]

UP = "up"
"""The prefix of the runner's own lines in the merged stream."""
HEALTH_INTERVAL = 2.0
"""How often ready instances are checked for ``ps``."""
_MAX_REPLICAS = 64


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now (a process given it may race another for it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def env_prefix(name: str, spec: ServiceSpec) -> str:
    """``USERS`` for ``users``: the prefix of its dependency variables."""
    return spec.env_prefix or re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def _shown(path: Path) -> str:
    """``path`` relative to the current folder when it is below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _fixed(instance: Instance, spec: ServiceSpec, port: int) -> tuple[tuple[str, int, str], ...]:
    """The port of an instance when the system file fixes it (``port``)."""
    if spec.port is None:
        return ()
    where = f"services.{instance.service}.port"
    if instance.index > 1:
        where += f" + {instance.index - 1} for {instance.name}"
    return (("127.0.0.1", port, where),)


def _read_gateway_config(path: Path) -> tuple[Config, dict[str, Any]]:
    """The gateway configuration file, validated, and as a document."""
    config = load_gateway_config(path)
    base = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return config, base


class _StreamHandler(logging.Handler):
    """The runner's own log records (the registry client's heartbeats for command
    services, say), shown in the merged stream under ``up``."""

    def __init__(self, printer: LogPrinter) -> None:
        super().__init__(logging.INFO)
        self.printer = printer

    def emit(self, record: logging.LogRecord) -> None:
        style = "red" if record.levelno >= logging.ERROR else ""
        if logging.WARNING <= record.levelno < logging.ERROR:
            style = "yellow"
        self.printer.note(UP, record.getMessage(), style=style)


class Runner:
    """Runs the system of ``sf`` until stopped; see the module docstring."""

    def __init__(
        self,
        sf: SystemFile,
        *,
        console: Console | None = None,
        errors: Console | None = None,
        python: str = sys.executable,
        detached: bool = False,
    ) -> None:
        self.sf = sf
        self.detached = detached
        """Run by ``up -d``: nobody reads the console (the hints say so)."""
        self.system = sf.system
        self.name = sf.name
        self.state = StateDir(sf.state)
        self.console = console or Console(soft_wrap=True, highlight=False)
        self.errors = errors or Console(stderr=True, soft_wrap=True, highlight=False)
        self.printer = LogPrinter(self.console)
        self.python = python
        self.order = start_order(self.system)
        self.watchdog = Watchdog()
        self.instances: dict[str, Instance] = {}
        self.gateway: Instance | None = None
        self.plan: GatewayPlan | None = None
        self.status = "starting"
        self.started = time.time()
        self.ready_after: float | None = None
        self._secret = ""
        self._tasks: set[Spawned] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._gateway_pinned = False
        self._ctx: Context | None = None
        self._stop_requested: asyncio.Event | None = None
        self._scale_lock: asyncio.Lock | None = None
        self._control: ControlServer | None = None
        self.events = EventsPlan(sf, sf.system.events)
        """The system's event bus (and its embedded nats-server): runner/events.py."""

    @property
    def ctx(self) -> Context:
        if self._ctx is None:  # pragma: no cover - only before run()
            raise RuntimeError("the runner is not running")
        return self._ctx

    # ------------------------------------------------------------------ the whole run

    async def run(self) -> int:
        """Start everything, serve until asked to stop, stop everything. Returns the
        exit code: 0 after a clean stop, 1 if the system could not start or a
        process had to be killed after the end.

        Raises:
            AlreadyRunningError: this system already runs from its state folder.
        """
        self.state.acquire()
        try:
            return await self._run_locked()
        finally:
            self.state.release()

    async def _run_locked(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        self._scale_lock = asyncio.Lock()
        self._clean_previous_run()
        self.state.prepare()
        record_system(self.name, self.sf.path, self.sf.root, self.state.path)
        self._secret = self.state.secret("service-secret")
        self.watchdog.start()
        http = httpx.AsyncClient(verify=False)  # noqa: S501 - probes of our own loopback processes
        self._ctx = Context(
            printer=self.printer,
            watchdog=self.watchdog,
            http=http,
            logs=self.state.logs,
            force=asyncio.Event(),
            changed=self._record_pids,
        )
        self._control = ControlServer(secrets.token_urlsafe(32), self._handle)
        await self._control.start()
        self._assign_colours()
        self._save_state()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, self._on_signal, sig)
        logger = logging.getLogger("meshgate")
        handler = _StreamHandler(self.printer)
        saved = (logger.level, logger.propagate)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        code = 0
        try:
            code = await self._serve()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            # A third Ctrl-C while stopping is the terminal's usual "really": the
            # second one already skips the drains, so this one is ignored.
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.add_signal_handler(sig, self._on_signal, sig)
            try:
                if not await self._stop_all():
                    code = 1
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
                for task in self._background:
                    task.cancel()
                await self._control.close()
                if self.ctx.registry is not None:
                    await self.ctx.registry.close()
                await http.aclose()
                self.watchdog.close()
                logger.removeHandler(handler)
                logger.setLevel(saved[0])
                logger.propagate = saved[1]
        return code

    async def _serve(self) -> int:
        assert self._stop_requested is not None  # noqa: S101
        total = 1 + sum(s.replicas for s in self.system.services.values())
        total += 1 if self.events.embedded else 0
        self.printer.note(
            UP,
            f"{self.name}: starting {plural(total, 'process', 'processes')} from "
            f"{_shown(self.sf.path)} "
            f"(state in {_shown(self.state.path)})",
            style="bold",
        )
        for warning in [*self.sf.warnings, *self.platform_notes()]:
            self.printer.note(UP, warning, style="yellow")
        starting = asyncio.ensure_future(self._start_all())
        stop = asyncio.ensure_future(self._stop_requested.wait())
        await asyncio.wait({starting, stop}, return_when="FIRST_COMPLETED")
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, StartupError):
                await starting
            self.status = "stopping"
            return 0
        stop.cancel()
        error = starting.exception()
        if error is not None:
            self.status = "stopping"
            message = str(error) if isinstance(error, StartupError) else repr(error)
            self.errors.print(
                Text(f"{self.name} could not start: {message}", style="bold red"),
                soft_wrap=True,
            )
            self.errors.print(Text("stopping what was started", style="bold red"))
            return 1
        self.status = "ready"
        self.ready_after = time.time() - self.started
        self._save_state()
        self._print_ready()
        self._spawn_background(self._health_loop())
        self._spawn_background(self._watch_system_file(self.sf.path))
        if self.sf.gateway_config_path is not None:
            self._spawn_background(self._watch_gateway_config(self.sf.gateway_config_path))
        await self._stop_requested.wait()
        self.status = "stopping"
        return 0

    def platform_notes(self) -> list[str]:
        """What this operating system does not let ``up`` check, when it matters."""
        probed = [
            name
            for name, spec in self.system.services.items()
            if spec.command is not None and (readiness(spec).tcp or readiness(spec).http)
        ]
        if OWNERSHIP_KNOWN or not probed:
            return []
        note = (
            "up cannot tell here which process holds a port (it reads Linux's /proc): the "
            f"tcp and http readiness of {', '.join(probed)} takes any listener on the port; "
            "fixed ports are still checked free before each start"
        )
        return [note]

    def request_stop(self) -> None:
        """Stop the system (as SIGTERM does)."""
        if self._stop_requested is not None:
            self._stop_requested.set()

    def _on_signal(self, sig: int) -> None:
        assert self._stop_requested is not None  # noqa: S101
        name = signal.Signals(sig).name
        if not self._stop_requested.is_set():
            self._stop_requested.set()
            self.printer.note(
                UP, f"{name}: stopping {self.name} (Ctrl-C again to stop at once)", style="bold"
            )
        elif not self.ctx.force.is_set():
            self.ctx.force.set()
            self.printer.note(UP, f"{name}: stopping at once, without drains", style="bold red")

    def _spawn_background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ starting

    async def _start_all(self) -> None:
        self.plan = plan_gateway(self.sf, self.state)
        reserve_admin_port(self.system, self.plan)
        self.ctx.admin_token = self.plan.admin_token
        gateway_ready = asyncio.Event()
        ready = {name: asyncio.Event() for name in self.order}
        bus_ready = asyncio.Event()

        async def gateway() -> None:
            await self._start_gateway()
            gateway_ready.set()

        async def bus() -> None:  # the embedded nats-server, when services use it
            if self.events.embedded:
                await self._start_events()
            bus_ready.set()

        async def start(name: str) -> None:
            spec = self.system.services[name]
            # Migrations need only the database: they run while the gateway starts.
            if spec.migrate:
                await self._migrate(name, spec)
            await gateway_ready.wait()
            if spec.broker is not None:
                await bus_ready.wait()
            for dep in spec.depends_on:
                await ready[dep].wait()
            await self._start_service(name)
            ready[name].set()

        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(gateway())
                group.create_task(bus())
                for name in self.order:
                    group.create_task(start(name))
        except BaseExceptionGroup as exc:
            startup = exc.subgroup(StartupError)
            if startup is not None:
                first: BaseException = startup
                while isinstance(first, BaseExceptionGroup):
                    first = first.exceptions[0]
                raise first from None
            raise

    async def _start_gateway(self) -> None:
        spec = self.system.gateway
        self.gateway = Instance(
            self.ctx,
            name="gateway",
            service="gateway",
            index=1,
            kind=Kind.GATEWAY,
            build=self._build_gateway,
            ready=ReadySpec(timeout=spec.ready_timeout),
            stop_timeout=spec.stop_timeout,
            on_ready=self._gateway_ready,
            also=self._registry_answers,
        )
        self.gateway.start()
        await asyncio.shield(self.gateway.first)

    async def _registry_answers(self, instance: Instance) -> str | None:
        """Services cannot register with a registry that does not work (its Redis is
        unreachable, say): the gateway is ready once its registry answers too."""
        plan = self.plan
        admin = instance.admin_url
        if plan is None or plan.registry_token is None or admin is None:
            return None
        from meshgate.registry import RegistryClient, RegistryError  # noqa: PLC0415

        if self.ctx.registry is None:
            self.ctx.registry = RegistryClient(admin, plan.registry_token)
        try:
            await self.ctx.registry.snapshot()
        except RegistryError as exc:
            return f"its registry does not work: {exc}"
        return None

    async def _start_events(self) -> None:
        instance = self.events.make_instance(self.ctx)
        self.instances[instance.name] = instance
        self.printer.colour(instance.name)
        self.events.write_file()
        instance.start()
        self._save_state()
        await asyncio.shield(instance.first)

    async def _gateway_ready(self, instance: Instance) -> None:
        plan = self.plan
        match = instance.match
        if plan is None or match is None:  # pragma: no cover - set before it is ready
            return
        plan.started(int(match["port"]), int(match["admin_port"]))
        if self.ctx.registry is None and plan.registry_token is not None:
            from meshgate.registry import RegistryClient  # noqa: PLC0415

            self.ctx.registry = RegistryClient(plan.admin_url, plan.registry_token)
        self._save_state()

    async def _start_service(self, name: str) -> None:
        spec = self.system.services[name]
        created = [self._add_instance(name, index) for index in range(1, spec.replicas + 1)]
        await asyncio.gather(*(asyncio.shield(i.first) for i in created))

    def _add_instance(self, service: str, index: int) -> Instance:
        spec = self.system.services[service]
        kind = Kind.APP if spec.app is not None else Kind.COMMAND
        instance = Instance(
            self.ctx,
            name=f"{service}-{index}",
            service=service,
            index=index,
            kind=kind,
            build=self._build_app if kind is Kind.APP else self._build_command,
            ready=readiness(spec),
            stop_timeout=spec.stop_timeout,
            restart=spec.restart,
            registers=kind is Kind.COMMAND and registers(spec),
        )
        self.instances[instance.name] = instance
        self.printer.colour(instance.name)
        instance.start()
        self._save_state()
        return instance

    async def _migrate(self, service: str, spec: ServiceSpec) -> None:
        assert spec.app is not None  # noqa: S101 - the loader requires it
        module = spec.app.partition(":")[0]
        name = f"{service}-migrate"
        env = self._env(service, spec, name, 0, None)
        launch = Launch([self.python, "-m", "meshgate", "db", "upgrade", module], env, self.sf.root)
        lines: list[str] = []

        def on_line(line: str) -> None:
            lines.append(line)
            self.printer.line(name, line)

        self.printer.note(name, f"meshgate db upgrade {module}", style="dim")
        spawned = await Spawned.start(self.ctx, name, launch, on_line)
        # Until it ended, the stop (after a failure elsewhere, or Ctrl-C) ends it.
        self._tasks.add(spawned)
        try:
            async with asyncio.timeout(spec.ready.timeout):
                code = await spawned.wait()
        except TimeoutError:
            await spawned.terminate(5.0)
            reason = f"did not finish within {spec.ready.timeout:g} s"
        else:
            await spawned.finish()
            reason = describe_exit(code)
        self._tasks.discard(spawned)
        if spawned.returncode == 0:
            return
        shown = "\n".join(f"  {name} | {line}" for line in lines[-20:]) or "  (no output)"
        raise StartupError(
            f"the migrations of {service} (meshgate db upgrade {module}) {reason}; "
            f"its last lines:\n{shown}"
        )

    # ------------------------------------------------------------------ launching

    def _build_gateway(self, instance: Instance) -> Launch:
        plan = self.plan
        assert plan is not None  # noqa: S101
        self._gateway_pinned = plan.port != 0
        plan.write(pinned=self._gateway_pinned)
        argv = [self.python, "-m", "meshgate", "gateway", str(plan.path), "--log-level", "info"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.update(
            process_env(
                self.system,
                self.name,
                plan,
                service=plan.config.gateway.tracing.service_name,
                instance="gateway",
                gateway=True,
            )
        )
        return Launch(argv, env, self.sf.root, fixed=plan.fixed_ports(pinned=self._gateway_pinned))

    def _build_app(self, instance: Instance) -> Launch:
        spec = self.system.services[instance.service]
        assert spec.app is not None  # noqa: S101
        port = spec.port + instance.index - 1 if spec.port is not None else 0
        argv = [self.python, "-m", "meshgate", "serve", spec.app]
        argv += ["--listen", f"127.0.0.1:{port}", "--log-level", spec.log_level]
        env = self._env(instance.service, spec, instance.name, instance.index, None)
        return Launch(argv, env, self.sf.root, port or None, _fixed(instance, spec, port))

    def _build_command(self, instance: Instance) -> Launch:
        spec = self.system.services[instance.service]
        assert spec.command is not None  # noqa: S101
        port = spec.port + instance.index - 1 if spec.port is not None else free_port()
        values = self._values(instance.service, instance.name, instance.index, port)
        argv = [expand(arg, values) for arg in spec.command]
        env = self._env(instance.service, spec, instance.name, instance.index, port)
        return Launch(argv, env, self.sf.root, port, _fixed(instance, spec, port))

    def _values(self, service: str, instance: str, index: int, port: int | None) -> dict[str, str]:
        plan = self.plan
        values = {
            "state": str(self.state.path),
            "root": str(self.sf.root),
            "system": self.name,
            "name": service,
            "instance": instance,
            "index": str(index),
            "python": self.python,
            "gateway": plan.url if plan is not None and plan.port else "",
            "admin": plan.admin_url if plan is not None and plan.port else "",
        }
        if port is not None:
            values["port"] = str(port)
        return values

    def _env(
        self, service: str, spec: ServiceSpec, instance: str, index: int, port: int | None
    ) -> dict[str, str]:
        """The environment of a process of ``service``: the runner's own, the
        system's ``env``, the dependency URLs, the registry, identity and telemetry
        settings, then the service's ``env`` (which wins)."""
        plan = self.plan
        values = self._values(service, instance, index, port)
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.update({k: expand(v, values) for k, v in self.system.env.items()})
        prefix = env_prefix(service, spec)
        embedded = {
            "database": f"sqlite:///{self.state.data / service}.db",
            "cache": "memory://",
            "broker": self.events.url,
        }
        for key, default in embedded.items():
            value = getattr(spec, key)
            if value is None:
                continue
            url = default if value == EMBEDDED else expand(value, values)
            env[f"{prefix}_{key.upper()}_URL"] = url
            env[f"MESHGATE_{key.upper()}_URL"] = url
        if spec.broker is not None:
            env.update(self.events.env())
            if spec.broker != EMBEDDED:
                env["MESHGATE_EVENTS_URL"] = env["MESHGATE_BROKER_URL"]
        if plan is not None and plan.port:
            env["MESHGATE_REGISTRY_URL"] = plan.admin_url
            env["MESHGATE_GATEWAY_URL"] = plan.url
            if plan.registry_token is not None:
                env["MESHGATE_REGISTRY_TOKEN"] = plan.registry_token
        env["MESHGATE_SERVICE_SECRET"] = self._secret
        env["MESHGATE_SYSTEM"] = self.name
        env["MESHGATE_INSTANCE"] = instance
        env.update(process_env(self.system, self.name, plan, service=service, instance=instance))
        if port is not None:
            env["PORT"] = str(port)
        if spec.migrate:
            # An instance that finds its database gone or behind (say, .meshgate/data
            # deleted) migrates it again when it restarts, instead of refusing to.
            env["MESHGATE_MIGRATE"] = "1"
        env.update({k: expand(v, values) for k, v in spec.env.items()})
        return env

    # ------------------------------------------------------------------ scaling

    async def scale(self, replicas: dict[str, int]) -> list[dict[str, Any]]:
        """Change the number of instances of services while running: new instances
        start (and register), the newest ones go first when scaling down (each
        drained). Returns what changed.

        Raises:
            ValueError: an unknown service or a bad count (nothing changed).
            StartupError: a new instance did not become ready (those that failed are
                stopped; the others stay).
        """
        assert self._scale_lock is not None  # noqa: S101
        for service, count in replicas.items():
            if service not in self.system.services:
                known = ", ".join(self.system.services) or "(none)"
                raise ValueError(f"no service named {service!r}; known: {known}")
            if not 0 <= count <= _MAX_REPLICAS:
                raise ValueError(f"{service}={count}: give 0 to {_MAX_REPLICAS} instances")
        if self.status != "ready":
            raise ValueError(f"{self.name} is {self.status}; scale it once it is ready")
        changes = []
        async with self._scale_lock:
            for service, count in replicas.items():
                current = sorted(self._of(service), key=lambda i: i.index)
                before = len(current)
                if count > before:
                    await self._scale_up(service, current, count - before)
                elif count < before:
                    victims = current[count:]
                    for victim in victims:
                        self.printer.note(victim.name, "scaling down: draining", style="bold")
                    await asyncio.gather(*(v.stop() for v in victims))
                    for victim in victims:
                        self.instances.pop(victim.name, None)
                    self._save_state()
                changes.append({"service": service, "from": before, "to": count})
        return changes

    async def _scale_up(self, service: str, current: list[Instance], more: int) -> None:
        used = {i.index for i in current}
        indices = [n for n in range(1, len(current) + more + 1) if n not in used][:more]
        created = [self._add_instance(service, index) for index in indices]
        results = await asyncio.gather(
            *(asyncio.shield(i.first) for i in created), return_exceptions=True
        )
        failed = [
            (instance, result)
            for instance, result in zip(created, results, strict=True)
            if isinstance(result, BaseException)
        ]
        if failed:
            for instance, _ in failed:
                await instance.stop()
                self.instances.pop(instance.name, None)
            self._save_state()
            raise StartupError("\n".join(str(r) for _, r in failed))

    async def restart(self, targets: list[str]) -> list[dict[str, Any]]:
        """Restart services (each instance in turn: drained, stopped, started with the
        system file's current settings, ready before the next one goes), single
        instances (``users-2``) or the gateway (on the same ports). Returns what was
        restarted.

        Raises:
            ValueError: an unknown name (nothing restarted) or a system not ready.
            StartupError: a restarted instance did not become ready (the others of its
                service keep running; the rest of ``targets`` is not restarted).
        """
        assert self._scale_lock is not None  # noqa: S101
        picked: list[tuple[str, list[Instance]]] = []
        for target in targets:
            if target == "gateway":
                picked.append((target, []))
            elif target in self.system.services:
                picked.append((target, sorted(self._of(target), key=lambda i: i.index)))
            elif target in self.instances:
                picked.append((target, [self.instances[target]]))
            else:
                known = ", ".join(["gateway", *self.system.services, *self.instances])
                raise ValueError(f"nothing named {target!r} runs; known: {known}")
        if self.status != "ready":
            raise ValueError(f"{self.name} is {self.status}; restart once it is ready")
        done = []
        async with self._scale_lock:
            for target, instances in picked:
                began = time.monotonic()
                if target == "gateway":
                    await self._restart_gateway()
                for old in instances:
                    self.printer.note(old.name, "restarting: draining", style="bold")
                    await old.stop()
                    self.instances.pop(old.name, None)
                    new = self._add_instance(old.service, old.index)
                    await asyncio.shield(new.first)
                done.append(
                    {
                        "target": target,
                        "instances": [i.name for i in instances] or ["gateway"],
                        "seconds": round(time.monotonic() - began, 2),
                    }
                )
        return done

    async def _restart_gateway(self) -> None:
        old = self.gateway
        if old is not None:
            self.printer.note(old.name, "restarting: draining", style="bold")
            await old.stop()
        await self._start_gateway()

    def _of(self, service: str) -> list[Instance]:
        return [i for i in self.instances.values() if i.service == service]

    # ------------------------------------------------------------------ stopping

    async def _stop_all(self) -> bool:
        """Stop every process in reverse dependency order, then the gateway; check by
        PID that nothing is left. False if something had to be killed afterwards."""
        self.status = "stopping"
        began = time.monotonic()
        for task in list(self._tasks):
            await task.terminate(5.0)
        dependents = {
            name: [other for other, s in self.system.services.items() if name in s.depends_on]
            for name in self.system.services
        }
        stopped = {name: asyncio.Event() for name in self.system.services}

        async def stop(name: str) -> None:
            try:
                for other in dependents[name]:
                    await stopped[other].wait()
                await asyncio.gather(*(i.stop() for i in self._of(name)))
            finally:
                stopped[name].set()

        await asyncio.gather(*(stop(name) for name in self.system.services))
        if self.events.instance is not None:  # after the services, which drain into it
            await self.events.instance.stop()
        if self.gateway is not None:
            await self.gateway.stop()
        count = len(self.ctx.pgids)
        left = self._leftovers()
        self._record_pids()
        took = time.monotonic() - began
        if left:
            self.errors.print(
                Text(
                    f"{plural(len(left), 'process', 'processes')} still ran after the stop "
                    f"and were killed: {', '.join(str(p.pid) for p in left)}",
                    style="bold red",
                )
            )
            return False
        self.printer.note(
            UP,
            f"stopped in {took:.1f} s; "
            + (
                "the 1 process started is gone"
                if count == 1
                else f"none of the {count} processes started is left"
            ),
            style="bold",
        )
        return True

    def _leftovers(self) -> list[Pid]:
        """Processes of ours still alive after everything stopped: killed (SIGKILL),
        and returned so that ``up`` can say so."""
        left: list[Pid] = []
        for pgid in sorted(self.ctx.pgids):
            members = group_members(pgid)
            if members:
                left.extend(members)
                _signal_group(pgid, signal.SIGKILL)
        watchdog = self.watchdog.pid
        for pid in descendants(os.getpid()):
            if pid.pid != watchdog and pid not in left:
                left.append(pid)
                with contextlib.suppress(OSError):
                    os.kill(pid.pid, signal.SIGKILL)
        return left

    def _clean_previous_run(self) -> None:
        leftovers = self.state.leftovers()
        if leftovers:
            killed = kill_leftovers(list(leftovers.values()))
            if killed:
                self.printer.note(
                    UP,
                    f"stopped {plural(len(killed), 'process', 'processes')} left by a previous "
                    f"run that did not stop cleanly: {', '.join(sorted(leftovers))}",
                    style="yellow",
                )

    # ------------------------------------------------------------------ state and ps

    def _record_pids(self) -> None:
        entries: dict[str, Pid] = {}
        for instance in [self.gateway, *self.instances.values()]:
            spawned = instance.spawned if instance is not None else None
            if instance is not None and spawned is not None and spawned.returncode is None:
                entries[instance.name] = spawned.ident
        for spawned in self._tasks:
            if spawned.returncode is None:
                entries[spawned.name] = spawned.ident
        with contextlib.suppress(OSError):
            self.state.record_pids(entries)

    def _assign_colours(self) -> None:
        self.printer.colour(UP)
        self.printer.colour("gateway")
        for name in self.order:
            spec = self.system.services[name]
            if spec.migrate:
                self.printer.colour(f"{name}-migrate")
            for index in range(1, spec.replicas + 1):
                self.printer.colour(f"{name}-{index}")

    def _save_state(self) -> None:
        if self._control is None:
            return
        me = Pid.of(os.getpid())
        self.state.write_state(
            {
                "version": 1,
                "system": self.name,
                "status": self.status,
                "file": str(self.sf.path),
                "pid": os.getpid(),
                "pid_started": me.started if me is not None else None,
                "started": self.started,
                "control": {"port": self._control.port, "token": self._control.token},
                "gateway": self._gateway_info(),
                "colours": self.printer.colours,
            }
        )

    def _gateway_info(self) -> dict[str, Any] | None:
        plan = self.plan
        if plan is None or not plan.port:
            return None
        return {
            "url": plan.url,
            "admin_url": plan.admin_url,
            "registry_url": f"{plan.admin_url}/v1/registry" if plan.registry_token else None,
            "admin_token_file": str(plan.admin_token_file) if plan.admin_token_file else None,
            "registry_token_file": (
                str(plan.registry_token_file) if plan.registry_token_file else None
            ),
        }

    def env_of(self, service: str) -> dict[str, str]:
        """What ``up`` sets in the environment of ``service``'s processes (not what
        they inherit unchanged): for running one more instance by hand."""
        spec = self.system.services[service]
        env = self._env(service, spec, f"{service}-by-hand", 0, None)
        return {k: v for k, v in env.items() if os.environ.get(k) != v}

    def ps(self) -> dict[str, Any]:
        """What ``meshgate ps`` shows: the system and each instance."""
        rows = []
        for instance in [self.gateway, *self.instances.values()]:
            if instance is None:
                continue
            row = instance.snapshot()
            if instance.kind is Kind.GATEWAY and self.plan is not None and self.plan.port:
                row["url"] = self.plan.url
            elif instance.address is not None:
                row["url"] = f"http://{instance.address}"
            rows.append(row)
        return {
            "system": self.name,
            "file": str(self.sf.path),
            "pid": os.getpid(),
            "status": self.status,
            "uptime": time.time() - self.started,
            "gateway": self._gateway_info(),
            "colours": self.printer.colours,
            "instances": rows,
        }

    async def _handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "ps":
            return {"ok": True, **self.ps()}
        if op == "down":
            self.printer.note(UP, f"meshgate down: stopping {self.name}", style="bold")
            self.request_stop()
            return {"ok": True, "pid": os.getpid()}
        if op == "scale":
            replicas = request.get("replicas")
            if not isinstance(replicas, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                for k, v in replicas.items()
            ):
                return {"ok": False, "error": "give replicas as {service: count}"}
            try:
                changes = await self.scale(replicas)
            except (ValueError, StartupError) as exc:
                return {"ok": False, "error": str(exc)}
            return {"ok": True, "changes": changes, **self.ps()}
        if op == "env":
            service = request.get("service")
            if not isinstance(service, str) or service not in self.system.services:
                known = ", ".join(self.system.services) or "(none)"
                return {"ok": False, "error": f"no service named {service!r}; known: {known}"}
            return {"ok": True, "env": self.env_of(service)}
        if op == "restart":
            targets = request.get("targets")
            if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
                return {"ok": False, "error": "give targets as a list of names"}
            try:
                restarted = await self.restart(targets)
            except (ValueError, StartupError) as exc:
                return {"ok": False, "error": str(exc)}
            return {"ok": True, "restarted": restarted, **self.ps()}
        return {"ok": False, "error": f"unknown op {op!r}; known: ps, env, scale, restart, down"}

    # ------------------------------------------------------------------ while running

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_INTERVAL)
            ready = [
                i
                for i in [self.gateway, *self.instances.values()]
                if i is not None and i.status == "ready"
            ]
            await asyncio.gather(*(i.check(health=True) for i in ready), return_exceptions=True)

    async def _watch_system_file(self, path: Path) -> None:
        """Apply edits of the system file that can be applied while running, and say
        which need a restart (see :mod:`meshgate.runner.reload`)."""
        last = file_signature(path)
        while True:
            await asyncio.sleep(1.0)
            current = file_signature(path)
            if current is None or current == last:
                continue
            last = current
            try:
                fresh = await asyncio.to_thread(load_system, path)
            except ConfigError as exc:
                self.printer.note(
                    UP, f"{_shown(path)} changed but is not used: {exc}", style="yellow"
                )
                continue
            await self._apply(compare(self.system, fresh.system))

    async def _apply(self, change: Change) -> None:
        shown = _shown(self.sf.path)
        if change.empty:
            self.system = change.system
            return
        self.system = change.system
        for service, fields in change.restart.items():
            self.printer.note(
                UP,
                f"{shown}: services.{service}: {', '.join(fields)} changed; instances that "
                f"start from now on use it, the running ones once restarted: meshgate "
                f"restart {service}",
                style="yellow",
            )
        if change.new_up:
            self.printer.note(
                UP,
                f"{shown}: {', '.join(change.new_up)} changed, which a running system cannot "
                "take: not applied; it needs a new up (meshgate down, then meshgate up)",
                style="yellow",
            )
        if change.replicas:
            wanted = ", ".join(f"{k}={v}" for k, v in change.replicas.items())
            self.printer.note(UP, f"{shown}: replicas changed; scaling to {wanted}")
            try:
                await self.scale(change.replicas)
            except (ValueError, StartupError) as exc:
                self.printer.note(UP, f"scaling to {wanted} failed: {exc}", style="bold red")

    async def _watch_gateway_config(self, path: Path) -> None:
        """Pass changes of the gateway configuration on (the gateway reloads its
        file when it changes); a change that is not valid is reported and left out."""

        last = file_signature(path)
        while True:
            await asyncio.sleep(1.0)
            current = file_signature(path)
            if current is None or current == last:
                continue
            last = current
            plan = self.plan
            if plan is None:
                continue
            try:
                config, base = await asyncio.to_thread(_read_gateway_config, path)
                plan.replace(base, config, self.state)
                plan.write(pinned=self._gateway_pinned)
            except (ConfigError, OSError, yaml.YAMLError) as exc:
                self.printer.note(
                    UP, f"{_shown(path)} changed but is not used: {exc}", style="yellow"
                )
                continue
            self.printer.note(UP, f"{_shown(path)} changed; the gateway reloads it")

    # ------------------------------------------------------------------ the summary

    def _print_ready(self) -> None:
        plan = self.plan
        took = self.ready_after or 0.0
        count = 1 + len(self.instances)
        self.printer.note(
            UP, f"{self.name} is ready: {plural(count, 'process', 'processes')} in {took:.1f} s"
        )
        self.console.print(
            instances_table(self.ps()["instances"], self.printer.colours), soft_wrap=True
        )
        if plan is None:  # pragma: no cover - the gateway is ready by now
            return
        lines = [("gateway", plan.url)]
        admin = plan.admin_url
        if plan.admin_token_file is not None:
            admin += f"  (token in {_shown(plan.admin_token_file)})"
        lines.append(("admin", admin))
        if plan.registry_token is not None:
            lines.append(("registry", f"{plan.admin_url}/v1/registry"))
        lines.append(("dashboard", f"{plan.admin_url}/ui  (log in with the admin token)"))
        out = Text()
        for label, value in lines:
            out.append(f"  {label:<9}", style="bold")
            out.append(value + "\n")
        examples = self._examples()
        if examples:
            out.append("Try:\n", style="bold")
            for example in examples:
                out.append(f"  {example}\n")
        commands = (
            "meshgate ps, meshgate logs SERVICE -f, meshgate scale SERVICE=N, "
            "meshgate restart SERVICE, meshgate down"
        )
        if self.detached:
            out.append(f"It runs in the background: {commands}", style="dim")
        else:
            out.append(
                f"Ctrl-C stops it all. In another terminal (from {_shown(self.sf.root)} or "
                f"below): {commands}",
                style="dim",
            )
        self.console.print(out, soft_wrap=True, highlight=False)

    def _examples(self) -> list[str]:
        plan = self.plan
        if plan is None:  # pragma: no cover
            return []
        values = {
            "state": str(self.state.path),
            "root": str(self.sf.root),
            "system": self.name,
            "python": self.python,
            "gateway": plan.url,
            "admin": plan.admin_url,
            "admin_token_file": str(plan.admin_token_file or ""),
        }
        if self.system.examples:
            return [expand(line, values) for line in self.system.examples]
        out = []
        for route in plan.config.routes[:4]:
            match = route.match
            path = match.path_prefix or match.path
            methods = match.methods
            if path is None or (methods and "GET" not in methods):
                continue
            # A stripped prefix in front of an app: its readiness answers there.
            plain = route.strip_prefix and route.rewrite is None
            suffix = "/health/ready" if plain and route.service in self._app_services() else ""
            out.append(f"curl -i {plan.url}{path.rstrip('/')}{suffix}")
        return out

    def _app_services(self) -> set[str]:
        return {n for n, s in self.system.services.items() if s.app is not None}
