"""``meshgate sagas``: the sagas of a running system (or of one service instance),
over their HTTP API (:mod:`meshgate.events.api`).

``list`` asks every service of the system that drives sagas (one instance each:
the instances of a service share its database), or the one named with
``--service``; ``--url`` names an instance directly. The system is found through
its state folder, like ``meshgate ps``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

__all__ = ["app", "service_urls"]

app = typer.Typer(
    name="sagas",
    help="The sagas of a running system: list, show (every step and attempt), retry.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, soft_wrap=True, highlight=False)
out = Console(soft_wrap=True, highlight=False)

_FILE_HELP = "The system file (default: meshgate.yaml in the current folder)."
FileOption = Annotated[
    Path | None,
    typer.Option("--file", "-f", help=_FILE_HELP, envvar="MESHGATE_FILE", show_default=False),
]
ServiceOption = Annotated[
    str | None,
    typer.Option("--service", "-s", help="Only this service's sagas.", show_default=False),
]
UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="A service instance to ask (http://host:port), not the system.",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]
PATH = "/meshgate/sagas"


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(message, markup=False)
    return typer.Exit(code)


def service_urls(file: Path | None, service: str | None) -> dict[str, str]:
    """One instance URL per service of the running system (of ``service`` only when
    given), found through its state folder and registry.

    Raises:
        typer.Exit: the system is not running or its registry does not answer.
    """
    from meshgate.runner.loader import STATE_FOLDER  # noqa: PLC0415
    from meshgate.runner.state import StateDir  # noqa: PLC0415

    path = (file or Path("meshgate.yaml")).absolute()
    state = StateDir(path.parent / STATE_FOLDER)
    info = state.read_state() if state.running() else None
    gateway = (info or {}).get("gateway") or {}
    registry_url = gateway.get("admin_url")
    token_file = gateway.get("registry_token_file")
    if not registry_url or not token_file:
        raise _fail(
            f"no running system at {path} (its .meshgate has no registry): start it with "
            "meshgate up, give --file, or ask one instance with --url http://host:port"
        )
    token = Path(token_file).read_text(encoding="utf-8").strip()
    try:
        answer = httpx.get(
            f"{registry_url}/v1/registry/services",
            headers={"Authorization": f"Bearer {token}"},
            timeout=5.0,
        )
    except httpx.HTTPError as exc:
        raise _fail(f"the registry at {registry_url} does not answer: {exc}") from None
    services: dict[str, list[dict[str, Any]]] = answer.json().get("services", {})
    if service is not None:
        if service not in services:
            known = ", ".join(sorted(services)) or "(none)"
            raise _fail(f"no instance of service {service!r} is registered; running: {known}")
        services = {service: services[service]}
    return {name: f"http://{found[0]['address']}" for name, found in services.items() if found}


def _get(url: str, params: dict[str, Any] | None = None) -> httpx.Response | None:
    try:
        return httpx.get(url, params=params, timeout=10.0)
    except httpx.HTTPError as exc:
        err.print(f"{url}: {exc}", markup=False)
        return None


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail") or response.text)
    except ValueError:
        return response.text[:500]


def _targets(file: Path | None, service: str | None, url: str | None) -> dict[str, str]:
    if url is not None:
        return {service or url: url.rstrip("/")}
    return service_urls(file, service)


@app.command("list")
def list_sagas(
    *,
    status: Annotated[
        str | None,
        typer.Option(
            "--status",
            help="running, compensating, completed, compensated or stuck.",
            show_default=False,
        ),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=1000)] = 50,
    service: ServiceOption = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
    file: FileOption = None,
) -> None:
    """The sagas, newest first, of every service that drives some (or one)."""
    params: dict[str, Any] = {"limit": limit}
    if status is not None:
        params["status"] = status
    found: list[dict[str, Any]] = []
    counts: dict[str, dict[str, int]] = {}
    for name, base in _targets(file, service, url).items():
        answer = _get(f"{base}{PATH}", params)
        if answer is None:
            continue
        if answer.status_code == 404 and url is None and service is None:
            continue  # a service that drives no sagas
        if answer.status_code != 200:
            raise _fail(f"{name}: {_detail(answer)}")
        body = answer.json()
        counts[body["service"]] = body["counts"]
        found += [{"service": body["service"], **s} for s in body["sagas"]]
    found.sort(key=lambda s: s["created_at"] or "", reverse=True)
    if as_json:
        out.print_json(json.dumps({"sagas": found, "counts": counts}))
        return
    if not counts:
        raise _fail("no service of this system drives sagas")
    table = Table(box=None, pad_edge=False)
    table.add_column("ID", no_wrap=True)
    for column in ("SERVICE", "SAGA", "STATUS", "STEP", "STARTED", "ERROR"):
        table.add_column(column, overflow="fold")
    for saga in found:
        style = {"stuck": "bold red", "compensated": "yellow", "completed": "green"}.get(
            saga["status"], ""
        )
        table.add_row(
            saga["id"],
            saga["service"],
            saga["name"],
            f"[{style}]{saga['status']}[/]" if style else saga["status"],
            saga.get("step") or "",
            (saga["created_at"] or "")[:19],
            (saga.get("error") or "")[:80],
        )
    out.print(table)
    for name, by_status in counts.items():
        shown = ", ".join(f"{n} {s}" for s, n in sorted(by_status.items())) or "none"
        out.print(f"{name}: {shown}")


def _find(
    file: Path | None, saga_id: str, service: str | None, url: str | None
) -> tuple[str, dict[str, Any]]:
    for base in _targets(file, service, url).values():
        answer = _get(f"{base}{PATH}/{saga_id}")
        if answer is not None and answer.status_code == 200:
            return base, answer.json()
    raise _fail(f"no saga {saga_id!r} in this system; list them with meshgate sagas list")


@app.command()
def show(
    saga_id: Annotated[str, typer.Argument(help="The saga's id.", show_default=False)],
    service: ServiceOption = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
    file: FileOption = None,
) -> None:
    """One saga: its input, results, and every attempt of every step with timing
    and error."""
    _, saga = _find(file, saga_id, service, url)
    if as_json:
        out.print_json(json.dumps(saga))
        return
    out.print(
        f"saga {saga['id']} ({saga['name']}, service {saga['service']}): {saga['status']}"
        + (f" at step {saga['step']}" if saga.get("step") else ""),
        markup=False,
    )
    if saga.get("error"):
        out.print(f"  error: {saga['error']}", markup=False)
    out.print(f"  started {saga['created_at']}, updated {saga['updated_at']}", markup=False)
    out.print(f"  input: {json.dumps(saga['input'])}", markup=False)
    table = Table(box=None, pad_edge=False)
    for column in ("#", "STEP", "PHASE", "TRY", "STATUS", "STARTED", "MS", "ERROR / RESULT"):
        table.add_column(column, overflow="fold")
    for attempt in saga["attempts"]:
        note = attempt.get("error") or (
            json.dumps(attempt["result"]) if attempt.get("result") is not None else ""
        )
        table.add_row(
            str(attempt["position"] + 1),
            attempt["step"],
            attempt["phase"],
            str(attempt["attempt"]),
            attempt["status"],
            (attempt["started_at"] or "")[11:23],
            "" if attempt["duration_ms"] is None else f"{attempt['duration_ms']:.1f}",
            note[:120],
        )
    out.print(table)


@app.command()
def retry(
    saga_id: Annotated[str, typer.Argument(help="The stuck saga's id.", show_default=False)],
    service: ServiceOption = None,
    url: UrlOption = None,
    file: FileOption = None,
) -> None:
    """Compensate a stuck saga again, from the compensation that failed."""
    base, _ = _find(file, saga_id, service, url)
    try:
        answer = httpx.post(f"{base}{PATH}/{saga_id}/retry", timeout=10.0)
    except httpx.HTTPError as exc:
        raise _fail(f"{base}: {exc}") from None
    if answer.status_code != 202:
        raise _fail(f"error: {_detail(answer)}")
    out.print(f"saga {saga_id}: compensating again", markup=False)
