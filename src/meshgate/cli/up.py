"""``meshgate up`` and its companions ``ps``, ``logs``, ``scale`` and ``down``: run a
whole system from its system file (``meshgate.yaml``) and look after it.

The companions find the running system through its state folder, ``.meshgate``
beside the system file: the one in the current folder, or the one of ``--file``
(``MESHGATE_FILE``). The reference is docs/up.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from meshgate.cli.main import app, err, out
from meshgate.errors import ConfigError, MeshgateError

if TYPE_CHECKING:
    from meshgate.runner.state import StateDir

__all__ = ["down", "logs", "ps", "scale", "up"]

_DEFAULT = Path("meshgate.yaml")
_FILE_HELP = "The system file (default: meshgate.yaml in the current folder)."

SystemFileOption = Annotated[
    Path | None,
    typer.Option("--file", "-f", help=_FILE_HELP, envvar="MESHGATE_FILE", show_default=False),
]


def _state(file: Path | None) -> StateDir:
    from meshgate.runner.loader import STATE_FOLDER  # noqa: PLC0415
    from meshgate.runner.state import StateDir  # noqa: PLC0415

    path = (file or _DEFAULT).absolute()
    return StateDir(path.parent / STATE_FOLDER)


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(message, markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


@app.command()
def up(
    file: Annotated[
        Path | None, typer.Argument(help=_FILE_HELP, envvar="MESHGATE_FILE", show_default=False)
    ] = None,
) -> None:
    """Run a whole system: the gateway and its registry, then every service in
    dependency order, waiting for each to be ready; one merged log; restarts after
    crashes; Ctrl-C or SIGTERM drains and stops everything."""
    from meshgate.runner import AlreadyRunningError, Runner, load_system  # noqa: PLC0415

    try:
        sf = load_system(file or _DEFAULT)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    runner = Runner(sf, console=Console(soft_wrap=True, highlight=False), errors=err)
    try:
        code = asyncio.run(runner.run())
    except AlreadyRunningError as exc:
        raise _fail(f"error: {exc}") from None
    except (OSError, MeshgateError) as exc:
        raise _fail(f"error: {exc}") from None
    raise typer.Exit(code)


@app.command()
def ps(
    file: SystemFileOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the instances of the running system: pid, address, status, health,
    restarts and uptime."""
    from meshgate.runner.render import instances_table, uptime  # noqa: PLC0415

    answer = _ask(file, "ps")
    if as_json:
        answer.pop("ok", None)
        out.print_json(json.dumps(answer))
        return
    out.print(
        f"{answer['system']}: {answer['status']}, up {uptime(answer.get('uptime'))} "
        f"(meshgate up pid {answer['pid']}, {answer['file']})",
        highlight=False,
    )
    out.print(instances_table(answer["instances"], answer.get("colours")), soft_wrap=True)
    gateway = answer.get("gateway")
    if gateway:
        out.print(
            f"gateway {gateway['url']}  admin {gateway['admin_url']}"
            + (
                f"  (token in {gateway['admin_token_file']})"
                if gateway.get("admin_token_file")
                else ""
            ),
            highlight=False,
        )


@app.command()
def logs(
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
        typer.Option("--file", help=_FILE_HELP, envvar="MESHGATE_FILE", show_default=False),
    ] = None,
) -> None:
    """Show the logs of a service or instance (kept in .meshgate/logs), merged in
    time order; also after the system stopped."""
    from meshgate.runner.logs import LogPrinter, log_files, tail_lines  # noqa: PLC0415
    from meshgate.runner.logs import follow as follow_files  # noqa: PLC0415

    state = _state(file)
    folder = state.logs
    if not folder.is_dir():
        raise _fail(
            f"no logs in {folder}: meshgate up of this system never ran here; give --file "
            "or run it from the system's folder"
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
    answer = _ask(file, "scale", timeout=600.0, replicas=wanted)
    for change in answer.get("changes", []):
        out.print(f"{change['service']}: {change['from']} -> {change['to']}", highlight=False)
    rows = [i for i in answer["instances"] if i["service"] in wanted]
    if rows:
        out.print(instances_table(rows, answer.get("colours")), soft_wrap=True)


@app.command()
def down(
    file: SystemFileOption = None,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for everything to stop.", min=1)
    ] = 120.0,
) -> None:
    """Stop the running system (as Ctrl-C in its terminal does) and wait until every
    process is gone; also removes processes left by a run that did not stop cleanly."""
    from meshgate.runner.control import request  # noqa: PLC0415
    from meshgate.runner.errors import ControlError, NotRunningError  # noqa: PLC0415
    from meshgate.runner.procs import Pid, kill_leftovers  # noqa: PLC0415

    state = _state(file)
    if not state.running():
        leftovers = state.leftovers()
        if leftovers:
            kill_leftovers(list(leftovers.values()))
            out.print(
                f"nothing was running from {state.path}, but processes of a run that did "
                f"not stop cleanly were: stopped {', '.join(sorted(leftovers))}",
                highlight=False,
            )
            state.record_pids({})
            return
        out.print(f"nothing runs from {state.path}", highlight=False)
        return
    data = state.read_state() or {}
    try:
        request(state, "down")
    except NotRunningError:
        out.print(f"nothing runs from {state.path}", highlight=False)
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
    out.print(f"stopped {data.get('system', 'the system')}", highlight=False)


def _ask(file: Path | None, op: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
    from meshgate.runner.control import request  # noqa: PLC0415
    from meshgate.runner.errors import ControlError, NotRunningError  # noqa: PLC0415

    state = _state(file)
    try:
        return request(state, op, timeout=timeout, **params)
    except NotRunningError as exc:
        raise _fail(f"{exc}; start it with meshgate up, or give --file") from None
    except ControlError as exc:
        raise _fail(f"error: {exc}") from None
