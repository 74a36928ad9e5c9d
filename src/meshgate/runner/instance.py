"""One supervised instance: a process started, watched until ready, kept running
(restarted with backoff after a crash) and stopped with a drain.

Each start of the process is a :class:`Spawned`: the process in its own session,
its output pumped line by line to the merged stream and to the instance's log
file, and its process group checked empty when it ends. An :class:`Instance`
owns its process; everything that happens to it happens in its one task
(:meth:`Instance.run`), so a stop and a crash can never race.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import re
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from meshgate.runner.errors import StartupError
from meshgate.runner.logs import InstanceLog, LogPrinter, is_noise
from meshgate.runner.model import ReadySpec, RestartPolicy
from meshgate.runner.procs import (
    OWNERSHIP_KNOWN,
    Pid,
    Watchdog,
    command_line,
    group_members,
    launch_argv,
    listener_pids,
    owns_listener,
    port_in_use,
    signal_group,
)

if TYPE_CHECKING:
    from meshgate.registry import Heartbeater, RegistryClient

__all__ = ["Context", "Instance", "Kind", "Launch", "Spawned"]

APP_READY_RE = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*) on http://(?P<host>\S+):(?P<port>\d+)$"
)
"""The line ``meshgate serve`` prints once it listens."""

STABLE_AFTER = 30.0
"""An instance that ran this long before it crashed starts its backoff again."""
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
TAIL_LINES = 40
"""How many of its last lines an instance keeps for error messages."""
_GROUP_GRACE = 3.0
"""How long processes left in a group after its leader exited get after SIGTERM."""


NOTE_AFTER = 3.0
"""How long an instance may refuse connections while it starts before ``up`` says so."""


def _error_text(exc: BaseException) -> str:
    """The reason an error gives (``Connection refused``), else its type's name."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OSError) and cause.strerror and cause.strerror not in text:
        text = f"{text} ({cause.strerror})" if text else cause.strerror
    return text or type(exc).__name__


def answer_summary(response: httpx.Response, limit: int = 300) -> str:
    """What a failing answer says, in one line: the failing checks of a readiness
    document (``cache: Connection refused``), a problem's ``detail``, or its text."""
    try:
        body = response.json()
    except ValueError:
        text = " ".join(response.text.split())
        return text[:limit]
    parts: list[str] = []
    if isinstance(body, dict):
        checks = body.get("checks")
        if isinstance(checks, dict):
            for name, outcome in checks.items():
                if isinstance(outcome, dict) and not outcome.get("ok", True):
                    parts.append(
                        f"{name}: {outcome.get('error') or outcome.get('detail') or 'failing'}"
                    )
        if not parts:
            for key in ("detail", "title", "error", "status"):
                if isinstance(body.get(key), str) and body[key]:
                    parts.append(body[key])
                    break
    text = "; ".join(parts) or " ".join(response.text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Kind(enum.Enum):
    GATEWAY = "gateway"
    APP = "app"
    COMMAND = "command"
    TASK = "task"
    """A process that runs to completion (a migration)."""


@dataclass
class Launch:
    """What to execute for one start of an instance."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path
    port: int | None = None
    """The port given to it, when the runner chose or was told one."""
    fixed: tuple[tuple[str, int, str], ...] = ()
    """Ports set in the system file, as (host, port, where it is set): each must be
    free before the process starts, or the start fails naming who holds it."""


@dataclass
class Context:
    """What instances share with the runner."""

    printer: LogPrinter
    watchdog: Watchdog
    http: httpx.AsyncClient
    logs: Path
    force: asyncio.Event
    """Set on a second Ctrl-C: stop without waiting for drains."""
    changed: Callable[[], None]
    """Called when a process starts or ends (the runner records its PIDs)."""
    registry: RegistryClient | None = None
    admin_token: str = ""
    pgids: set[int] = field(default_factory=set)
    """Every process group ever started (checked empty at the end)."""


class Spawned:
    """One start of a process: its own session, its output pumped, its group watched."""

    def __init__(
        self, ctx: Context, name: str, proc: asyncio.subprocess.Process, log: InstanceLog
    ) -> None:
        self.ctx = ctx
        self.name = name
        self.proc = proc
        self.pid = proc.pid
        self.ident = Pid.of(proc.pid) or Pid(proc.pid, None)
        self.log = log
        self.started = time.monotonic()
        self.pump: asyncio.Task[None] | None = None
        loop = asyncio.get_running_loop()
        self._exit: asyncio.Future[int] = loop.create_future()
        self._watch = loop.create_task(self._watch_exit(), name=f"meshgate-exit-{name}")

    @classmethod
    async def start(
        cls,
        ctx: Context,
        name: str,
        launch: Launch,
        on_line: Callable[[str], None],
    ) -> Spawned:
        """Start ``launch`` as ``name``; ``on_line`` gets each line of its output.

        Raises:
            OSError: the program cannot be started (the shim reports a missing
                program as exit code 127 with a line saying so).
        """
        log = InstanceLog(ctx.logs / f"{name}.log")
        try:
            proc = await asyncio.create_subprocess_exec(
                *launch_argv(launch.argv),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                cwd=launch.cwd,
                env=launch.env,
                start_new_session=True,
                limit=1024 * 1024,
            )
        except BaseException:
            log.close()
            raise
        spawned = cls(ctx, name, proc, log)
        ctx.pgids.add(proc.pid)
        ctx.watchdog.add(proc.pid)
        assert proc.stdout is not None  # noqa: S101 - we asked for a pipe
        spawned.pump = asyncio.get_running_loop().create_task(
            spawned._pump(proc.stdout, on_line), name=f"meshgate-pump-{name}"
        )
        ctx.changed()
        return spawned

    async def _pump(self, stream: asyncio.StreamReader, on_line: Callable[[str], None]) -> None:
        while True:
            try:
                raw = await stream.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                raw = exc.partial
                if not raw:
                    return
            except asyncio.LimitOverrunError as exc:
                raw = await stream.read(exc.consumed)  # a very long line, in pieces
            except OSError:  # pragma: no cover - the pipe broke
                return
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            self.log.write(line)
            try:
                on_line(line)
            except Exception as exc:  # noqa: BLE001 - a display problem must not stop the pump
                self.log.event(f"could not show a line: {exc}")

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    async def _watch_exit(self) -> None:
        # Not proc.wait(): asyncio answers it only once the output pipe closed too,
        # which a grandchild that inherited it (a shell's background job) delays
        # for as long as it lives. The return code is set as soon as the process
        # exits.
        while self.proc.returncode is None:  # noqa: ASYNC110 - no event to wait on
            await asyncio.sleep(0.05)
        self._exit.set_result(self.proc.returncode)

    async def wait(self) -> int:
        """The exit code, as soon as the process exited."""
        return await asyncio.shield(self._exit)

    def signal(self, sig: int) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def terminate(self, timeout: float) -> tuple[int, bool]:
        """SIGTERM, wait up to ``timeout`` seconds (less after a second Ctrl-C), then
        SIGKILL the whole group. Returns (exit code, whether it was killed)."""
        killed = False
        if self.proc.returncode is None:
            self.signal(signal.SIGTERM)
            exited = asyncio.ensure_future(self.wait())
            forced = asyncio.ensure_future(self.ctx.force.wait())
            try:
                await asyncio.wait({exited, forced}, timeout=timeout, return_when="FIRST_COMPLETED")
            finally:
                forced.cancel()
            if not exited.done():
                killed = True
                signal_group(self.pid, signal.SIGKILL)
            await exited
        await self.finish()
        return self._exit.result(), killed

    async def finish(self) -> list[Pid]:
        """After the leader exited: stop what is left in its group (SIGTERM, then
        SIGKILL), read the rest of its output, forget it. Returns the processes that
        needed SIGKILL."""
        await self.wait()
        left = group_members(self.pid)
        stubborn: list[Pid] = []
        if left:
            signal_group(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + _GROUP_GRACE
            while left and time.monotonic() < deadline and not self.ctx.force.is_set():
                await asyncio.sleep(0.05)
                left = group_members(self.pid)
            if left:
                stubborn = left
                signal_group(self.pid, signal.SIGKILL)
                deadline = time.monotonic() + 2.0
                # Polling /proc: there is no event for "the group is empty".
                while group_members(self.pid) and time.monotonic() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        if not group_members(self.pid):
            self.ctx.watchdog.remove(self.pid)
        if self.pump is not None:
            # Output still buffered in the pipe comes first; a grandchild that kept
            # the pipe open (and was just killed) must not hold us.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self.pump), 2.0)
            self.pump.cancel()
        self.log.close()
        self.ctx.changed()
        return stubborn


def describe_exit(code: int | None) -> str:
    """``exited with code 1`` / ``was killed by SIGKILL``."""
    if code is None:
        return "ended"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


class Instance:
    """One instance of a service (or the gateway), supervised by its own task."""

    def __init__(
        self,
        ctx: Context,
        *,
        name: str,
        service: str,
        index: int,
        kind: Kind,
        build: Callable[[Instance], Launch],
        ready: ReadySpec,
        stop_timeout: float,
        restart: RestartPolicy = "always",
        registers: bool = False,
        on_ready: Callable[[Instance], Awaitable[None]] | None = None,
        also: Callable[[Instance], Awaitable[str | None]] | None = None,
    ) -> None:
        self.ctx = ctx
        self.name = name
        self.service = service
        self.index = index
        self.kind = kind
        self.build = build
        self.ready_spec = ready
        self.stop_timeout = stop_timeout
        self.restart_policy = restart
        self.registers = registers
        """A command instance the runner registers in the registry on its behalf."""
        self.on_ready = on_ready
        self.also = also
        """A further condition of readiness (and health): None when it holds, else
        why not (the gateway's: its registry answers)."""
        self.status = "created"
        self.health = ""
        self.restarts = 0
        self.exit_code: int | None = None
        self.port: int | None = None
        self.host = "127.0.0.1"
        self.announced: str | None = None
        """The service name an app printed (what it registers as)."""
        self.match: re.Match[str] | None = None
        """The gateway's ready line."""
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.spawned: Spawned | None = None
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Done when the instance is first ready; fails with :class:`StartupError`
        if it exits or times out before that."""
        self._stop = asyncio.Event()
        self._seen = asyncio.Event()
        """Set when the ready line (or the ready log pattern) was seen."""
        self._heartbeater: Heartbeater | None = None
        self._log_re = re.compile(ready.log) if ready.log is not None else None
        self._task: asyncio.Task[None] | None = None
        self.waiting = ""
        """Why the last readiness check failed (shown while it waits, and on timeout)."""
        self._answered = False
        """Whether :attr:`waiting` comes from an answer (a 503, the registry) rather
        than from a process still starting (connection refused)."""
        self._noted = ""
        self._start_error = ""

    # -- public

    @property
    def pid(self) -> int | None:
        spawned = self.spawned
        return spawned.pid if spawned is not None and spawned.returncode is None else None

    @property
    def address(self) -> str | None:
        return None if self.port is None else f"{self.host}:{self.port}"

    @property
    def admin_url(self) -> str | None:
        """The gateway's admin URL, from its ready line."""
        match = self.match
        if match is None:
            return None
        host = match["admin_host"]
        if host in ("0.0.0.0", "[::]", "::"):
            host = "127.0.0.1"
        return f"{match['admin_scheme']}://{host}:{match['admin_port']}"

    def start(self) -> None:
        """Start supervising (returns at once; await :attr:`first` for readiness)."""
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"meshgate-instance-{self.name}"
        )

    async def stop(self) -> None:
        """Drain and stop it (deregister, SIGTERM, wait, SIGKILL); return once its
        processes are gone. Idempotent."""
        self._stop.set()
        if self._task is not None:
            await asyncio.shield(self._task)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def snapshot(self) -> dict[str, object]:
        """What ``meshgate ps`` shows of it."""
        now = time.time()
        return {
            "name": self.name,
            "service": self.service,
            "index": self.index,
            "kind": self.kind.value,
            "pid": self.pid,
            "status": self.status,
            "health": self.health,
            "restarts": self.restarts,
            "address": self.address,
            "port": self.port,
            "registered_as": self.announced if self.kind is Kind.APP else None,
            "started": self.started_at,
            "uptime": None
            if self.started_at is None or self.pid is None
            else now - self.started_at,
            "exit_code": self.exit_code,
            "waiting": self.waiting if self.status == "starting" else "",
        }

    def last_lines(self, count: int = 20) -> list[str]:
        return list(self.tail)[-count:]

    # -- the supervising task

    async def _run(self) -> None:
        try:
            await self._supervise()
        except Exception as exc:  # noqa: BLE001 - reported, and the process stopped
            # A bug here must not leave a process unwatched, nor hang ``up``.
            self.status = "failed"
            self._note(f"supervision failed: {type(exc).__name__}: {exc}", style="bold red")
            spawned = self.spawned
            if spawned is not None and spawned.returncode is None:
                signal_group(spawned.pid, signal.SIGKILL)
                await spawned.finish()
            if not self.first.done():
                self.first.set_exception(StartupError(self.failure("could not be supervised")))
        finally:
            if not self.first.done():
                self.first.cancel()

    async def _supervise(self) -> None:
        failures = 0
        while not self._stop.is_set():
            outcome, code = await self._once()
            if self._stop.is_set():
                break
            reason = self._reason(outcome, code)
            if not self.first.done():
                self.status = "failed"
                self.first.set_exception(StartupError(self.failure(reason)))
                return
            if self.restart_policy == "never" or (
                self.restart_policy == "on-failure" and code == 0
            ):
                self.status = "exited"
                self._note(f"{reason}; not restarted (restart: {self.restart_policy})")
                return
            ran = time.monotonic() - (self.spawned.started if self.spawned else 0.0)
            failures = 1 if ran >= STABLE_AFTER else failures + 1
            delay = min(BACKOFF_FIRST * 2 ** (failures - 1), BACKOFF_MAX)
            self.status = "restarting"
            self._note(f"{reason}; restarting in {delay:g} s", style="bold yellow")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            if self._stop.is_set():
                break
            self.restarts += 1
        self.status = "stopped"

    async def _once(self) -> tuple[str, int | None]:
        """One start: spawn, wait for ready, serve until exit or stop. Returns
        (outcome, exit code): outcome is ``exited``, ``timeout``, ``stopped`` or
        ``unstartable``."""
        self.status = "starting"
        self.health = ""
        self._seen.clear()
        self.announced = None if self.kind is Kind.APP else self.announced
        self.waiting, self._answered, self._noted = "", False, ""
        try:
            launch = self.build(self)
            self._check_ports(launch)
            self.port = launch.port if self.kind is not Kind.GATEWAY else self.port
            self.spawned = await Spawned.start(self.ctx, self.name, launch, self._on_line)
        except (OSError, ValueError) as exc:
            self._start_error = str(exc)
            self.tail.append(f"cannot start: {exc}")
            self._note(f"cannot start: {exc}", style="bold red")
            return "unstartable", None
        spawned = self.spawned
        self.started_at = time.time()
        self.exit_code = None
        outcome = await self._until_ready(spawned)
        if outcome == "ready":
            self.status = "ready"
            self.health = "ok"
            self.ready_at = time.time()
            if self.registers:
                await self._register()
            if self.kind is Kind.APP and self.announced not in (None, self.service):
                self._note(
                    f"it registers as {self.announced!r}, but the system file calls it "
                    f"{self.service!r}: routes and clients that ask the registry for "
                    f"{self.service!r} find nothing; give both the same name",
                    style="bold yellow",
                )
            if self.on_ready is not None:
                await self.on_ready(self)
            if not self.first.done():
                self.first.set_result(None)
            outcome = await self._until_exit(spawned)
        if outcome in ("stopped", "timeout"):
            await self._leave_registry(drain=outcome == "stopped")
            self.status = "stopping"
            code, killed = await spawned.terminate(self.stop_timeout)
            if killed and outcome == "stopped":
                self._note(f"did not stop within {self.stop_timeout:g} s of SIGTERM; killed")
        else:
            code = await spawned.wait()
            await self._leave_registry(drain=False)
            await spawned.finish()
        self.exit_code = code
        return outcome, code

    def _check_ports(self, launch: Launch) -> None:
        """Refuse to start on a fixed port that another process holds: it would take
        the readiness checks, and the traffic, meant for this instance."""
        for host, port, where in launch.fixed:
            taken = port_in_use(host, port)
            if taken is not None:
                raise ValueError(
                    f"port {port} ({where}) is in use: {taken}; stop that process, give "
                    "another port, or leave the port out for a free one"
                )

    def _reason(self, outcome: str, code: int | None) -> str:
        if outcome == "timeout":
            where = (
                "gateway.ready_timeout"
                if self.kind is Kind.GATEWAY
                else f"services.{self.service}.ready.timeout"
            )
            last = f"; the last check: {self.waiting}" if self.waiting else ""
            return (
                f"did not become ready within {self.ready_spec.timeout:g} s ({where}); "
                f"it is ready when {self.readiness()}{last}"
            )
        if outcome == "unstartable":
            return f"could not be started: {self._start_error}"
        return describe_exit(code)

    def failure(self, reason: str) -> str:
        """The message of a failed start: what happened and the last log lines."""
        lines = self.last_lines()
        shown = "\n".join(f"  {self.name} | {line}" for line in lines) or "  (no output)"
        return f"{self.name} {reason}; its last lines:\n{shown}"

    def readiness(self) -> str:
        """How readiness is known, in words."""
        spec = self.ready_spec
        if self.kind is Kind.GATEWAY:
            return "its ready line, then GET /status on the admin listener and its registry answer"
        if self.kind is Kind.APP:
            return f"GET {spec.http or '/health/ready'} answers 200, then it is in the registry"
        if spec.http is not None:
            return f"GET {spec.http} on its port answers 2xx or 3xx{self._own_port_words()}"
        if spec.tcp:
            return f"its port accepts connections{self._own_port_words()}"
        if spec.log is not None:
            return f"a line matches {spec.log!r}"
        return "running"

    def _note(self, message: str, style: str = "bold") -> None:
        self.ctx.printer.note(self.name, message, style)
        if self.spawned is not None:
            self.spawned.log.event(message)
        else:
            log = InstanceLog(self.ctx.logs / f"{self.name}.log")
            log.event(message)
            log.close()

    def _on_line(self, line: str) -> None:
        if not is_noise(line):
            self.tail.append(line)
        self.ctx.printer.line(self.name, line)
        if self._seen.is_set():
            return
        if self.kind is Kind.APP:
            match = APP_READY_RE.match(line.strip())
            if match is not None:
                self.announced = match["name"]
                self.host = match["host"].strip("[]")
                self.port = int(match["port"])
                self._seen.set()
        elif self.kind is Kind.GATEWAY:
            from meshgate.runner.gateway import GATEWAY_READY_RE  # noqa: PLC0415 - a cycle

            match = GATEWAY_READY_RE.search(line)
            if match is not None:
                self.match = match
                self.port = int(match["port"])
                self._seen.set()
        elif self._log_re is not None and self._log_re.search(line):
            self._seen.set()

    async def _until_ready(self, spawned: Spawned) -> str:
        probe = asyncio.ensure_future(self._probe())
        exited = asyncio.ensure_future(spawned.wait())
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            done, _ = await asyncio.wait(
                {probe, exited, stop},
                timeout=self.ready_spec.timeout,
                return_when="FIRST_COMPLETED",
            )
        finally:
            for task in (probe, stop):
                task.cancel()
        if stop in done:
            return "stopped"
        if exited in done:
            return "exited"
        if probe in done and not probe.cancelled() and probe.exception() is None:
            return "ready"
        return "timeout"

    async def _until_exit(self, spawned: Spawned) -> str:
        exited = asyncio.ensure_future(spawned.wait())
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            done, _ = await asyncio.wait({exited, stop}, return_when="FIRST_COMPLETED")
        finally:
            stop.cancel()
        return "stopped" if stop in done else "exited"

    # -- readiness and health

    async def _probe(self) -> None:
        """Return once the instance is ready (see :meth:`readiness`); while it waits,
        say why it is not ready each time the reason changes."""
        began = time.monotonic()
        delay = 0.05
        while not await self.check():
            self._show_waiting(time.monotonic() - began)
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _show_waiting(self, waited: float) -> None:
        reason = self.waiting
        # A process that is still starting refuses connections for a while: only a
        # reason that lasts, or one its dependencies gave, is worth a line.
        if not reason or reason == self._noted or (not self._answered and waited < NOTE_AFTER):
            return
        self._noted = reason
        self._note(f"not ready yet: {reason}", style="yellow")

    def _not_ready(self, reason: str, *, answered: bool) -> bool:
        self.waiting, self._answered = reason, answered
        return False

    async def check(self, *, health: bool = False) -> bool:
        """Whether it is ready now; with ``health``, only its own health (not the
        registry), recording the reason in :attr:`health` when it fails. A failed
        readiness check records why in :attr:`waiting`."""
        spec = self.ready_spec
        if self.kind is Kind.GATEWAY:
            if not self._seen.is_set() and not health:
                return self._not_ready("its ready line was not printed yet", answered=False)
            if self.admin_url is None:
                return False
            ok = await self._get(
                f"{self.admin_url}/status",
                {"Authorization": f"Bearer {self.ctx.admin_token}"},
                health=health,
            )
            return ok and await self._also(health=health)
        if self.kind is Kind.APP:
            if self.port is None:
                return self._not_ready("it did not say where it listens yet", answered=False)
            if not await self._get(
                f"http://{self._client_address()}{spec.http or '/health/ready'}", health=health
            ):
                return False
            return health or await self._registered()
        if spec.http is not None:
            ok = await self._get(f"http://{self._client_address()}{spec.http}", health=health)
            return ok and self._own_port(health=health)
        if spec.tcp:
            return await self._connects(health=health) and self._own_port(health=health)
        if spec.log is not None:
            if self._seen.is_set() or health:
                return True
            return self._not_ready(f"no line matched {spec.log!r} yet", answered=False)
        return True

    async def _also(self, *, health: bool) -> bool:
        if self.also is None:
            return True
        reason = await self.also(self)
        if reason is None:
            return True
        if health:
            self.health = f"failing: {reason}"
            return False
        return self._not_ready(reason, answered=True)

    def _own_port(self, *, health: bool) -> bool:
        """Whether the listener on its port is this instance's (its process, group or
        children), not another process that happens to hold the port."""
        spawned = self.spawned
        if spawned is None or self.port is None:
            return False
        owned = owns_listener(spawned.pid, self.port)
        if owned is None or owned:
            return True
        holders = [p for p in listener_pids(self.port) if p != spawned.pid]
        who = ", ".join(f"pid {p} ({command_line(p)})" for p in holders) or "another process"
        reason = f"port {self.port} answers, but it is held by {who}, not by {self.name}"
        if health:
            self.health = f"failing: port {self.port} held by another process"
            return False
        return self._not_ready(reason, answered=True)

    def _own_port_words(self) -> str:
        return ", on a listener of its own" if OWNERSHIP_KNOWN else ""

    def _client_address(self) -> str:
        host = self.host if self.host not in ("0.0.0.0", "") else "127.0.0.1"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def _get(self, url: str, headers: dict[str, str] | None = None, *, health: bool) -> bool:
        label = f"GET {httpx.URL(url).path}"
        try:
            response = await self.ctx.http.get(url, headers=headers, timeout=2.0)
        except httpx.HTTPError as exc:
            if health:
                self.health = f"failing: {type(exc).__name__}"
            return self._not_ready(f"{label}: {_error_text(exc)}", answered=False)
        ok = 200 <= response.status_code < 400
        if health:
            self.health = "ok" if ok else f"failing: {response.status_code}"
        if not ok:
            summary = answer_summary(response)
            return self._not_ready(
                f"{label} answered {response.status_code}" + (f": {summary}" if summary else ""),
                answered=True,
            )
        return True

    async def _connects(self, *, health: bool) -> bool:
        try:
            async with asyncio.timeout(2.0):
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except (OSError, TimeoutError) as exc:
            if health:
                self.health = f"failing: {type(exc).__name__}"
            return self._not_ready(
                f"port {self.port}: {_error_text(exc) or 'no answer within 2 s'}", answered=False
            )
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        if health:
            self.health = "ok"
        return True

    async def _registered(self) -> bool:
        registry = self.ctx.registry
        if registry is None or self.announced is None:
            return self._not_ready("the registry is not known yet", answered=False)
        from meshgate.registry import RegistryError  # noqa: PLC0415

        try:
            snapshot = await registry.snapshot(self.announced)
        except RegistryError as exc:
            return self._not_ready(f"the registry did not answer: {exc}", answered=True)
        if any(i.address == self.address for i in snapshot.instances):
            return True
        return self._not_ready(
            f"{self.announced} at {self.address} is not in the registry yet (its log says why)",
            answered=False,
        )

    # -- the registry, for command instances and after crashes

    async def _register(self) -> None:
        registry = self.ctx.registry
        if registry is None or self.address is None:
            return
        from meshgate.registry import Heartbeater, InstanceSpec, RegistryError  # noqa: PLC0415

        heartbeater = Heartbeater(
            registry, self.service, self.name, InstanceSpec(address=self.address, ttl=10.0)
        )
        try:
            await heartbeater.start()
        except RegistryError as exc:
            self._note(f"could not register in the registry: {exc}", style="bold red")
            return
        self._heartbeater = heartbeater

    async def _leave_registry(self, *, drain: bool) -> None:
        """Take the instance out of the registry: a command's registration, or what
        an app that died left behind (so that nobody waits for its TTL). With
        ``drain``, give gateways a second to stop sending before it is stopped."""
        heartbeater, self._heartbeater = self._heartbeater, None
        if heartbeater is not None:
            await heartbeater.stop()
            if drain and not self.ctx.force.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.ctx.force.wait(), 1.0)
            return
        if self.kind is not Kind.APP or drain or self.announced is None:
            return  # a stopping app deregisters itself, then drains
        registry = self.ctx.registry
        if registry is None:
            return
        from meshgate.registry import RegistryError  # noqa: PLC0415

        try:
            snapshot = await registry.snapshot(self.announced)
            for found in snapshot.instances:
                if found.address == self.address:
                    await registry.deregister(self.announced, found.id)
        except RegistryError:
            pass  # the TTL removes it
