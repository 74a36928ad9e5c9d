"""``meshgate traces``: the traces the control plane's collector keeps, listed and shown
as a waterfall in the terminal. Both talk to the admin API's ``/v1/observability``.

Which system: ``--admin-url`` (``MESHGATE_ADMIN_URL``) with the admin token
(``--token-file``, ``MESHGATE_ADMIN_TOKEN``), else the system that ``meshgate up``
runs from the current folder (or ``--file``), found through its state folder as
``meshgate ps`` finds it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.table import Table
from rich.text import Text

from meshgate.cli.main import app, err, out

__all__ = ["traces_app"]

traces_app = typer.Typer(
    help="List the traces the control plane keeps, or show one as a waterfall.",
    invoke_without_command=True,
    no_args_is_help=False,
)
app.add_typer(traces_app, name="traces")

_BAR_WIDTH = 40
_PALETTE = ("cyan", "magenta", "green", "yellow", "blue", "bright_red", "bright_cyan", "orange3")


@dataclass(frozen=True)
class _Target:
    url: str
    token: str


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(message, markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _read_token(path: Path) -> str:
    try:
        token = path.expanduser().read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise _fail(f"cannot read the admin token file {path}: {exc.strerror}") from None
    if not token:
        raise _fail(f"the admin token file {path} is empty")
    return token


def _target(
    admin_url: str | None,
    token: str | None,
    token_file: Path | None,
    file: Path | None,
    system: str | None = None,
) -> _Target:
    """Where the admin API is and its token (see the module docstring)."""
    if admin_url:
        if token:
            return _Target(admin_url.rstrip("/"), token.strip())
        if token_file is not None:
            return _Target(admin_url.rstrip("/"), _read_token(token_file))
        raise _fail(
            f"--admin-url {admin_url} needs the admin token: give --token-file or set "
            "MESHGATE_ADMIN_TOKEN"
        )
    from meshgate.runner.errors import AmbiguousSystemError, NotRunningError  # noqa: PLC0415
    from meshgate.runner.systems import find_system  # noqa: PLC0415 - keep start-up light

    try:
        state, _ = find_system(file, system, command="traces")
    except (AmbiguousSystemError, NotRunningError) as exc:
        raise _fail(str(exc)) from None
    if not state.running():
        raise _fail(
            f"nothing runs from {state.path} (no meshgate up holds it); start the system "
            "with meshgate up, give --file, or point at a gateway with --admin-url"
        )
    gateway = (state.read_state() or {}).get("gateway")
    if not isinstance(gateway, dict) or not gateway.get("admin_url"):
        raise _fail(f"{state.state_file} names no gateway yet; the system is starting, try again")
    if token:
        return _Target(str(gateway["admin_url"]), token.strip())
    path = token_file or (
        Path(gateway["admin_token_file"]) if gateway.get("admin_token_file") else None
    )
    if path is None:
        raise _fail(
            "the gateway's admin token is set in its configuration, not in a file: "
            "set MESHGATE_ADMIN_TOKEN or give --token-file"
        )
    return _Target(str(gateway["admin_url"]), _read_token(path))


def _get(target: _Target, path: str, params: dict[str, str] | None = None) -> Any:
    url = f"{target.url}/v1/observability{path}"
    try:
        res = httpx.get(
            url, params=params, headers={"Authorization": f"Bearer {target.token}"}, timeout=15
        )
    except httpx.HTTPError as exc:
        raise _fail(f"cannot reach the admin API at {target.url}: {exc}") from None
    if res.status_code == 401:
        raise _fail(f"the admin API at {target.url} refused the admin token (401)")
    try:
        body = res.json()
    except ValueError:
        body = None
    if res.status_code != 200:
        problem = body if isinstance(body, dict) else {}
        detail = problem.get("detail") or f"HTTP {res.status_code}"
        if res.status_code == 404 and not problem.get("error"):
            detail = f"{target.url} serves no /v1/observability (a gateway without the collector)"
        raise _fail(f"error: {detail}")
    return body


AdminUrl = Annotated[
    str | None,
    typer.Option(
        "--admin-url",
        envvar="MESHGATE_ADMIN_URL",
        help="The gateway's admin listener (default: the system meshgate up runs here).",
        show_default=False,
    ),
]
TokenFile = Annotated[
    Path | None,
    typer.Option("--token-file", help="A file holding the admin token.", show_default=False),
]
SystemFile = Annotated[
    Path | None,
    typer.Option(
        "--file",
        "-f",
        envvar="MESHGATE_FILE",
        help="The system file (default: meshgate.yaml in the current folder).",
        show_default=False,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print the API's JSON.")]
SystemName = Annotated[
    str | None,
    typer.Option("--system", help="The running system of this name.", show_default=False),
]


def _token() -> str | None:
    return os.environ.get("MESHGATE_ADMIN_TOKEN") or None


def _ms(value: float) -> str:
    if value >= 1000:
        return f"{value / 1000:.2f} s"
    if value >= 10:
        return f"{value:.0f} ms"
    return f"{value:.1f} ms"


def _time(ns: int) -> str:
    moment = dt.datetime.fromtimestamp(ns / 1e9).astimezone()
    return moment.strftime("%H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def _colours(names: list[str]) -> dict[str, str]:
    return {name: _PALETTE[i % len(_PALETTE)] for i, name in enumerate(sorted(set(names)))}


@traces_app.callback()
def traces(
    ctx: typer.Context,
    *,
    service: Annotated[
        str | None, typer.Option("--service", "-s", help="Only traces with a span of SERVICE.")
    ] = None,
    slow: Annotated[
        str | None, typer.Option("--slow", help="Only traces at least this long (200ms, 1.5s).")
    ] = None,
    errors: Annotated[bool, typer.Option("--errors", help="Only traces with a failed span.")] = (
        False
    ),
    since: Annotated[
        str | None, typer.Option("--since", help="Only traces started in the last 15m, 2h...")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=1000)] = 20,
    as_json: AsJson = False,
    admin_url: AdminUrl = None,
    token_file: TokenFile = None,
    file: SystemFile = None,
    system: SystemName = None,
) -> None:
    """List the newest traces the control plane keeps (most recent first)."""
    ctx.obj = (admin_url, token_file, file, system)
    if ctx.invoked_subcommand is not None:
        return
    target = _target(admin_url, _token(), token_file, file, system)
    params = {"limit": str(limit)}
    if service:
        params["service"] = service
    if slow:
        params["slow"] = slow
    if errors:
        params["errors"] = "true"
    if since:
        params["since"] = since
    body = _get(target, "/traces", params)
    if as_json:
        out.print_json(json.dumps(body))
        return
    found = body["traces"]
    if not found:
        out.print("no trace matches (traces appear once services export to the collector)")
        return
    colours = _colours([s for t in found for s in t["services"]])
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("started", no_wrap=True)
    # Whole, always: it is what `meshgate traces show` takes.
    table.add_column("trace id", no_wrap=True, min_width=32)
    table.add_column("root")
    table.add_column("duration", justify="right", no_wrap=True)
    table.add_column("spans", justify="right")
    table.add_column("services")
    table.add_column("", no_wrap=True)
    for t in found:
        services = Text()
        for name in t["services"]:
            services.append(f"{name} ", style=colours[name])
        table.add_row(
            _time(t["start_ns"]),
            t["trace_id"],
            Text(
                f"{t['root_service']}: {t['root_name']}", style=colours.get(t["root_service"], "")
            ),
            _ms(t["duration_ms"]),
            str(t["spans"]),
            services,
            Text(f"{t['errors']} error{'s' if t['errors'] != 1 else ''}", style="red")
            if t["error"]
            else "",
        )
    out.print(table)


def _rows(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    flat: list[dict[str, Any]] = []
    for node in nodes:
        flat.append(node)
        flat.extend(_rows(node["children"]))
    return flat


def _bar(offset: float, duration: float, total: float) -> str:
    start = min(int(offset / total * _BAR_WIDTH), _BAR_WIDTH - 1)
    length = max(round(duration / total * _BAR_WIDTH), 1)
    length = min(length, _BAR_WIDTH - start)
    return " " * start + "█" * length + " " * (_BAR_WIDTH - start - length)


@traces_app.command("show")
def show(
    ctx: typer.Context,
    trace_id: Annotated[str, typer.Argument(help="The trace id (32 hex digits).")],
    *,
    as_json: AsJson = False,
    admin_url: AdminUrl = None,
    token_file: TokenFile = None,
    file: SystemFile = None,
    system: SystemName = None,
) -> None:
    """Show one trace as a waterfall: every span, indented under its parent, with a
    bar where it ran, and each service's share of the time."""
    parent = ctx.obj or (None, None, None, None)
    target = _target(
        admin_url or parent[0],
        _token(),
        token_file or parent[1],
        file or parent[2],
        system or parent[3],
    )
    body = _get(target, f"/traces/{trace_id}")
    if as_json:
        out.print_json(json.dumps(body))
        return
    rows = _rows(body["spans"])
    colours = _colours([r["service"] for r in rows])
    total = max(body["duration_ms"], 0.001)
    out.print(
        Text.assemble(
            ("trace ", "bold"),
            (body["trace_id"], "bold"),
            f"  {_ms(body['duration_ms'])}, {body['span_count']} spans, started "
            f"{_time(body['start_ns'])}",
            ("  error" if body["error"] else "", "red"),
        )
    )
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("span", no_wrap=True, overflow="ellipsis", max_width=60)
    table.add_column("service", no_wrap=True)
    table.add_column(f"0 ─ {_ms(total)}", no_wrap=True)
    table.add_column("duration", justify="right", no_wrap=True)
    for row in rows:
        style = colours[row["service"]]
        name = Text("  " * row["depth"] + row["name"], style="red" if row["error"] else "")
        table.add_row(
            name,
            Text(row["service"], style=style),
            Text(_bar(row["offset_ms"], row["duration_ms"], total), style=style),
            _ms(row["duration_ms"]),
        )
    out.print(table)
    shares = Text("self time: ", style="bold")
    for entry in body["services"]:
        shares.append(
            f"{entry['service']} {_ms(entry['self_ms'])} ({entry['share'] * 100:.0f} %)  ",
            style=colours.get(entry["service"], ""),
        )
    out.print(shares)
