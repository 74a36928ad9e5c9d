"""``meshgate events``: the dead letters of the system's event bus, and replaying one.

The bus is the one ``--url`` names, else ``MESHGATE_EVENTS_URL``, else the one the
running (or last) ``meshgate up`` of the system used (``.meshgate/events.json``),
else ``nats://127.0.0.1:4222``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from meshgate.errors import MeshgateError

__all__ = ["app"]

app = typer.Typer(
    name="events",
    help="The event bus of a system: dead letters, and sending one back (replay).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, soft_wrap=True, highlight=False)
out = Console(soft_wrap=True, highlight=False)

UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="MESHGATE_EVENTS_URL",
        help="The bus (nats://host:4222 or redis://host:6379/0).",
        show_default=False,
    ),
]
NamespaceOption = Annotated[
    str | None,
    typer.Option(
        "--namespace",
        envvar="MESHGATE_EVENTS_NAMESPACE",
        help="The system's namespace on a shared bus.",
        show_default=False,
    ),
]
FileOption = Annotated[
    Path | None,
    typer.Option(
        "--file",
        "-f",
        help="The system file (default: meshgate.yaml in the current folder).",
        envvar="MESHGATE_FILE",
        show_default=False,
    ),
]


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(message, markup=False)
    return typer.Exit(code)


def _bus(url: str | None, namespace: str | None, file: Path | None) -> Any:
    from meshgate.events import connect_bus  # noqa: PLC0415
    from meshgate.events.core import DEFAULT_URL  # noqa: PLC0415
    from meshgate.runner.events import read_events_file  # noqa: PLC0415
    from meshgate.runner.loader import STATE_FOLDER  # noqa: PLC0415

    system: dict[str, str] = {}
    if url is None:
        path = (file or Path("meshgate.yaml")).absolute()
        system = read_events_file(path.parent / STATE_FOLDER) or {}
    return connect_bus(
        url or system.get("url") or DEFAULT_URL,
        namespace=namespace
        if namespace is not None
        else system.get("meshgate_events_namespace", ""),
        credentials=system.get("meshgate_events_credentials"),
        tls_ca=system.get("meshgate_events_tls_ca"),
        tls_cert=system.get("meshgate_events_tls_cert"),
        tls_key=system.get("meshgate_events_tls_key"),
    )


@app.command("dead-letters")
def dead_letters(
    *,
    service: Annotated[
        str | None,
        typer.Option("--service", "-s", help="Only this service's.", show_default=False),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=10000)] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    url: UrlOption = None,
    namespace: NamespaceOption = None,
    file: FileOption = None,
) -> None:
    """The events consumers gave up on (oldest first), with their last error."""
    bus = _bus(url, namespace, file)

    async def run() -> list[Any]:
        async with bus:
            letters: list[Any] = await bus.dead_letters(service=service, limit=limit)
            return letters

    try:
        letters = asyncio.run(run())
    except MeshgateError as exc:
        raise _fail(f"error: {exc}") from None
    if as_json:
        out.print_json(
            json.dumps(
                [
                    {
                        "id": d.id,
                        "service": d.service,
                        "group": d.group,
                        "topic": d.topic,
                        "event_id": d.event_id,
                        "attempts": d.attempts,
                        "time": d.time.isoformat(),
                        "error": d.error,
                        "event": d.data.decode("utf-8", errors="replace"),
                    }
                    for d in letters
                ]
            )
        )
        return
    if not letters:
        out.print(f"no dead letters on {bus.url}" + (f" for {service}" if service else ""))
        return
    table = Table(box=None, pad_edge=False)
    table.add_column("ID", no_wrap=True)
    for column in ("SERVICE", "GROUP", "TOPIC", "EVENT", "TRIES", "WHEN", "ERROR"):
        table.add_column(column, overflow="fold")
    for d in letters:
        table.add_row(
            d.id,
            d.service,
            d.group,
            d.topic,
            d.event_id,
            str(d.attempts),
            d.time.isoformat()[:19],
            d.error.splitlines()[0][:100] if d.error else "",
        )
    out.print(table)
    out.print(f"{len(letters)} dead letters; meshgate events replay ID sends one back")


@app.command()
def replay(
    letter_id: Annotated[str, typer.Argument(help="The dead letter's ID.", show_default=False)],
    url: UrlOption = None,
    namespace: NamespaceOption = None,
    file: FileOption = None,
) -> None:
    """Send a dead letter back to its topic (and take it out of the dead letters):
    its group handles it again; groups that handled it already skip it (their
    inbox has it)."""
    bus = _bus(url, namespace, file)

    async def run() -> Any:
        async with bus:
            letter = await bus.take_dead_letter(letter_id)
            try:
                from meshgate.events import TopicSettings  # noqa: PLC0415

                await bus.ensure_topic(letter.topic, TopicSettings())
                await bus.publish(
                    letter.topic, letter.data, msg_id=f"{letter.event_id}:replay:{letter.id}"
                )
            except MeshgateError:
                await bus.dead_letter(letter)  # not lost: back where it was
                raise
            return letter

    try:
        letter = asyncio.run(run())
    except MeshgateError as exc:
        raise _fail(f"error: {exc}") from None
    out.print(
        f"event {letter.event_id} sent back to {letter.topic} for group {letter.group}",
        markup=False,
    )
