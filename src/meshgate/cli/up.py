"""``meshgate up`` and its companions ``ps``, ``logs``, ``scale``, ``restart`` and
``down``: run a whole system from its system file (``meshgate.yaml``) and look
after it.

The companions find the running system through its state folder, ``.meshgate``
beside the system file: that of ``--file`` (``MESHGATE_FILE``) or ``--system NAME``,
else the one that runs where they are run (see :mod:`meshgate.runner.systems`).
The reference is docs/up.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from meshgate.cli.main import app, err, out
from meshgate.errors import ConfigError, MeshgateError

if TYPE_CHECKING:
    from meshgate.runner.state import StateDir

__all__ = ["down", "env", "logs", "ps", "restart", "scale", "up"]

_DEFAULT = Path("meshgate.yaml")
_FILE_HELP = "The system file (default: meshgate.yaml in the current folder)."
_FIND_HELP = (
    "The system file (default: the system that runs here: the nearest meshgate.yaml at or "
    "above this folder, or a running system whose folder or root holds it)."
)

SystemFileOption = Annotated[
    Path | None,
    typer.Option("--file", "-f", help=_FIND_HELP, envvar="MESHGATE_FILE", show_default=False),
]
SystemNameOption = Annotated[
    str | None,
    typer.Option(
        "--system",
        help="The running system by name (its name: in meshgate.yaml, or its folder's).",
        show_default=False,
    ),
]


def _find(file: Path | None, system: str | None, command: str, *, running: bool = True) -> StateDir:
    """The state folder of the system ``command`` is about (see meshgate.runner.systems)."""
    from meshgate.runner.errors import AmbiguousSystemError, NotRunningError  # noqa: PLC0415
    from meshgate.runner.systems import find_system  # noqa: PLC0415

    try:
        state, _ = find_system(file, system, command=command, running=running)
    except (AmbiguousSystemError, NotRunningError) as exc:
        raise _fail(f"error: {exc}") from None
    return state


def _nothing_runs(
    state: StateDir, command: str, hint: str = "; start it with meshgate up, or give --file"
) -> str:
    """Nothing runs from ``state``: say so, and name the systems that do run."""
    from meshgate.runner.systems import known_systems  # noqa: PLC0415

    others = [k for k in known_systems() if k.state != state.path and k.running()]
    message = f"nothing runs from {state.path}"
    if not others:
        return message + hint
    named = "; ".join(f"{k.shown()}: meshgate {command} --system {k.name}" for k in others)
    return f"{message}; running elsewhere: {named}"


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(message, markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


@app.command()
def up(
    file: Annotated[
        Path | None, typer.Argument(help=_FILE_HELP, envvar="MESHGATE_FILE", show_default=False)
    ] = None,
    detach: Annotated[
        bool,
        typer.Option(
            "--detach",
            "-d",
            help="Run it in the background: return once it is ready (or failed), its "
            "output in .meshgate/up.log.",
        ),
    ] = False,
    detached_child: Annotated[bool, typer.Option("--detached-child", hidden=True)] = False,
) -> None:
    """Run a whole system: the gateway and its registry, then every service in
    dependency order, waiting for each to be ready; one merged log; restarts after
    crashes; Ctrl-C or SIGTERM drains and stops everything."""
    from meshgate.runner import AlreadyRunningError, Runner, load_system  # noqa: PLC0415

    try:
        sf = load_system(file or _DEFAULT)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    if detach:
        raise typer.Exit(_detach(sf.path))
    runner = Runner(
        sf, console=Console(soft_wrap=True, highlight=False), errors=err, detached=detached_child
    )
    try:
        code = asyncio.run(runner.run())
    except AlreadyRunningError as exc:
        raise _fail(f"error: {exc}") from None
    except (OSError, MeshgateError) as exc:
        raise _fail(f"error: {exc}") from None
    raise typer.Exit(code)


def _detach(path: Path) -> int:
    """Start ``up`` of ``path`` in a session of its own, its output in
    ``.meshgate/up.log``; wait until it is ready (print what runs, return 0) or it
    exited (print its last lines, return its code)."""
    from meshgate.runner.loader import STATE_FOLDER  # noqa: PLC0415
    from meshgate.runner.render import instances_table  # noqa: PLC0415
    from meshgate.runner.state import StateDir  # noqa: PLC0415

    state = StateDir(path.parent / STATE_FOLDER)
    if state.running():
        data = state.read_state() or {}
        raise _fail(
            f"error: this system is already running (meshgate up, pid {data.get('pid', '?')}) "
            f"with its state in {state.path}; see it with meshgate ps, stop it with "
            "meshgate down"
        )
    state.ensure()
    output = state.path / "up.log"
    with output.open("wb") as log:
        child = subprocess.Popen(  # noqa: S603 - our own interpreter and command
            [sys.executable, "-m", "meshgate", "up", str(path), "--detached-child"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path.cwd(),
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
    err.print(f"meshgate up (pid {child.pid}) starting in the background; output in {output}")
    try:
        while child.poll() is None:
            data = state.read_state() or {}
            if data.get("status") == "ready" and data.get("pid") == child.pid:
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        err.print("still starting in the background: meshgate ps shows it, meshgate down stops it")
        return 130
    code = child.poll()
    if code is not None:
        lines = output.read_text(encoding="utf-8", errors="replace").splitlines()
        for line in lines[-40:]:
            err.print(line)
        return code or 1
    answer = _ask_state(state, "ps")
    out.print(f"{answer['system']} is ready (meshgate up pid {answer['pid']}, {answer['file']})")
    out.print(instances_table(answer["instances"], answer.get("colours")), soft_wrap=True)
    _print_gateway(answer)
    out.print(
        "It runs in the background: meshgate ps, meshgate logs -f, meshgate down "
        f"(from {path.parent} or below, or with --file {path})"
    )
    return 0


def _print_gateway(answer: dict[str, Any]) -> None:
    gateway = answer.get("gateway")
    if gateway:
        token = gateway.get("admin_token_file")
        out.print(
            f"gateway {gateway['url']}  admin {gateway['admin_url']}"
            + (f"  (token in {token})" if token else "")
        )


@app.command()
def ps(
    file: SystemFileOption = None,
    system: SystemNameOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the instances of the running system: pid, address, status, health,
    restarts and uptime."""
    from meshgate.runner.render import instances_table, uptime  # noqa: PLC0415

    answer = _ask(file, system, "ps")
    if as_json:
        answer.pop("ok", None)
        out.print_json(json.dumps(answer))
        return
    out.print(
        f"{answer['system']}: {answer['status']}, up {uptime(answer.get('uptime'))} "
        f"(meshgate up pid {answer['pid']}, {answer['file']})"
    )
    out.print(instances_table(answer["instances"], answer.get("colours")), soft_wrap=True)
    _print_gateway(answer)


@app.command()
def logs(  # noqa: PLR0917 - typer reads the parameters as options
    target: Annotated[
        str | None,
        typer.Argument(
            help="A service (all its instances), an instance (users-2) or gateway; "
            "default: everything.",
            show_default=False,
        ),
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines (Ctrl-C stops).")
    ] = False,
    lines: Annotated[
        int, typer.Option("--lines", "-n", help="How many of the last lines to show.", min=0)
    ] = 100,
    raw: Annotated[bool, typer.Option("--raw", help="Lines as written (JSON left as is).")] = False,
    file: Annotated[
        Path | None,
        typer.Option("--file", help=_FIND_HELP, envvar="MESHGATE_FILE", show_default=False),
    ] = None,
    system: SystemNameOption = None,
) -> None:
    """Show the logs of a service or instance (kept in .meshgate/logs), merged in
    time order; also after the system stopped."""
    from meshgate.runner.logs import LogPrinter, log_files, tail_lines  # noqa: PLC0415
    from meshgate.runner.logs import follow as follow_files  # noqa: PLC0415

    state = _find(file, system, "logs", running=False)
    folder = state.logs
    if not folder.is_dir():
        raise _fail(
            f"no logs in {folder}: meshgate up of this system never ran here; give --file "
            "or --system, or run it from the system's folder"
        )
    found = log_files(folder, target)
    if target is not None and not found:
        known = sorted({re.sub(r"-(\d+|migrate)$", "", p.stem) for p in log_files(folder, None)})
        instances = sorted(p.stem for p in log_files(folder, None))
        raise _fail(
            f"no logs of {target!r} in {folder}; services: {', '.join(known) or '(none)'}; "
            f"instances: {', '.join(instances) or '(none)'}"
        )
    data = state.read_state() or {}
    colours = data.get("colours") if isinstance(data.get("colours"), dict) else None
    printer = LogPrinter(Console(soft_wrap=True, highlight=False), colours)
    for path in found:
        printer.colour(path.stem)
    for _, name, text in tail_lines(found, lines):
        printer.line(name, text, raw=raw)
    if not follow:
        return
    with contextlib.suppress(KeyboardInterrupt):
        follow_files(
            lambda: log_files(folder, target),
            lambda name, text: printer.line(name, text, raw=raw),
            stop=lambda: False,
        )


@app.command()
def scale(
    replicas: Annotated[
        list[str], typer.Argument(help="SERVICE=N, one or more.", show_default=False)
    ],
    file: SystemFileOption = None,
    system: SystemNameOption = None,
) -> None:
    """Change how many instances of services run; returns once the new ones are
    ready (and registered) or the removed ones have drained and stopped."""
    from meshgate.runner.render import instances_table  # noqa: PLC0415

    wanted: dict[str, int] = {}
    for item in replicas:
        service, sep, count = item.partition("=")
        if not sep or not service or not count.isdigit():
            raise _fail(f"{item!r}: write SERVICE=N, such as users=3", 2)
        wanted[service] = int(count)
    answer = _ask(file, system, "scale", timeout=600.0, replicas=wanted)
    for change in answer.get("changes", []):
        out.print(f"{change['service']}: {change['from']} -> {change['to']}")
    rows = [i for i in answer["instances"] if i["service"] in wanted]
    if rows:
        out.print(instances_table(rows, answer.get("colours")), soft_wrap=True)


@app.command()
def restart(
    targets: Annotated[
        list[str],
        typer.Argument(
            metavar="SERVICE...",
            help="Services (each instance in turn), instances (users-2) or gateway.",
            show_default=False,
        ),
    ],
    file: SystemFileOption = None,
    system: SystemNameOption = None,
) -> None:
    """Restart services of the running system with the system file's current
    settings: each instance drains, stops and starts again, and is ready before the
    next one goes, so a service with several instances keeps serving."""
    from meshgate.runner.render import instances_table  # noqa: PLC0415

    answer = _ask(file, system, "restart", timeout=3600.0, targets=targets)
    for item in answer.get("restarted", []):
        out.print(
            f"{item['target']}: restarted {', '.join(item['instances'])} in {item['seconds']} s"
        )
    names = {name for item in answer.get("restarted", []) for name in item["instances"]}
    rows = [i for i in answer["instances"] if i["name"] in names]
    if rows:
        out.print(instances_table(rows, answer.get("colours")), soft_wrap=True)


@app.command()
def env(
    service: Annotated[str, typer.Argument(help="The service.", show_default=False)],
    file: SystemFileOption = None,
    system: SystemNameOption = None,
) -> None:
    """Print what meshgate up sets in the environment of SERVICE's processes
    (registry URL and token, identity secret, database and cache URLs, the system
    file's env) as export lines, to run one more instance by hand beside the system:
    eval "$(meshgate env users)", then meshgate serve. The lines hold the system's
    secrets."""
    answer = _ask(file, system, "env", service=service)
    for key, value in sorted(answer["env"].items()):
        out.print(f"export {key}={shlex.quote(value)}")


@app.command()
def down(
    file: SystemFileOption = None,
    system: SystemNameOption = None,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for everything to stop.", min=1)
    ] = 120.0,
) -> None:
    """Stop the running system (as Ctrl-C in its terminal does) and wait until every
    process is gone; also removes processes left by a run that did not stop cleanly."""
    from meshgate.runner.control import request  # noqa: PLC0415
    from meshgate.runner.errors import ControlError, NotRunningError  # noqa: PLC0415
    from meshgate.runner.procs import Pid, kill_leftovers  # noqa: PLC0415

    state = _find(file, system, "down")
    if not state.running():
        leftovers = state.leftovers()
        if leftovers:
            kill_leftovers(list(leftovers.values()))
            out.print(
                f"nothing was running from {state.path}, but processes of a run that did "
                f"not stop cleanly were: stopped {', '.join(sorted(leftovers))}"
            )
            state.record_pids({})
            return
        out.print(_nothing_runs(state, "down", hint=""))
        return
    data = state.read_state() or {}
    try:
        request(state, "down")
    except NotRunningError:
        out.print(f"nothing runs from {state.path}")
        return
    except ControlError as exc:
        # The runner does not answer: SIGTERM does the same, if it is still ours.
        pid = data.get("pid")
        started = data.get("pid_started")
        runner = Pid(pid, started) if isinstance(pid, int) else None
        if runner is None or not runner.alive():
            raise _fail(f"error: {exc}") from None
        os.kill(runner.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while state.running():
        if time.monotonic() > deadline:
            raise _fail(
                f"{data.get('system', 'the system')} is still stopping after {timeout:g} s "
                f"(meshgate up pid {data.get('pid')}); see meshgate logs"
            )
        time.sleep(0.1)
    out.print(f"stopped {data.get('system', 'the system')}")


def _ask(
    file: Path | None, system: str | None, op: str, timeout: float = 30.0, **params: Any
) -> dict[str, Any]:
    return _ask_state(_find(file, system, op), op, timeout, **params)


def _ask_state(state: StateDir, op: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
    from meshgate.runner.control import request  # noqa: PLC0415
    from meshgate.runner.errors import ControlError, NotRunningError  # noqa: PLC0415

    try:
        return request(state, op, timeout=timeout, **params)
    except NotRunningError:
        raise _fail(_nothing_runs(state, op)) from None
    except ControlError as exc:
        raise _fail(f"error: {exc}") from None
