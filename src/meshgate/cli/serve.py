"""``meshgate serve MODULE:SERVICE``: run one instance of a service built on the SDK."""

from __future__ import annotations

import importlib
import socket
import sys
from pathlib import Path
from typing import Annotated

import typer

from meshgate.cli._extras import missing_extra, one_line
from meshgate.cli.main import _run, app, err
from meshgate.config.model import Address
from meshgate.errors import MeshgateError

__all__ = ["load_service", "serve"]


def load_service(target: str) -> object:
    """The object ``module:attribute`` names (the current folder is importable).

    Raises:
        typer.BadParameter: the target is malformed, cannot be imported, or lacks it.
        typer.Exit: importing it failed on purpose (a meshgate error such as a bad
            database URL, or a missing optional dependency); the one-line reason was
            printed.
    """
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise typer.BadParameter(
            f"{target!r}: write MODULE:ATTRIBUTE, e.g. examples.shop.users.app:service"
        )
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except MeshgateError as exc:
        # Raised while the module builds its service: a bad URL, a missing driver.
        err.print(f"error: {target}: {one_line(exc)}")
        raise typer.Exit(1) from None
    except ImportError as exc:
        missing = missing_extra(exc)
        if missing is not None:
            err.print(f"error: {target}: {missing}")
            raise typer.Exit(1) from None
        raise typer.BadParameter(
            f"cannot import {module_name!r}: {exc}; run from the folder that holds it "
            "or put it on PYTHONPATH"
        ) from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise typer.BadParameter(f"module {module_name!r} has no {attribute!r}") from None


@app.command()
def serve(
    target: Annotated[str, typer.Argument(help="MODULE:ATTRIBUTE of a meshgate.service.Service.")],
    listen: Annotated[
        str, typer.Option(help="host:port to listen on (port 0: any free port).")
    ] = "127.0.0.1:0",
    advertise: Annotated[
        str | None,
        typer.Option(help="host:port to register (default: the bound address)."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run one instance of a service: JSON logs, registration in the registry
    (MESHGATE_REGISTRY_URL, MESHGATE_REGISTRY_TOKEN) once ready, and a drain on
    SIGTERM or Ctrl-C. Exits 1, saying why, when the service may not start (its
    database is not migrated)."""
    from meshgate.service import (  # noqa: PLC0415
        Service,
        ServiceStartupError,
        configure_logging,
        logs,
    )

    service = load_service(target)
    if not isinstance(service, Service):
        raise typer.BadParameter(
            f"{target!r} is a {type(service).__name__}, not a meshgate.service.Service"
        )
    try:
        address = Address.model_validate(listen)
    except ValueError as exc:
        raise typer.BadParameter(f"--listen: {exc}") from None
    configure_logging(service.name, log_level)
    try:
        sock = socket.create_server((address.host, address.port), reuse_port=False)
    except OSError as exc:
        err.print(f"cannot listen on {address}: {exc.strerror}", highlight=False)
        raise typer.Exit(1) from None
    host, port = sock.getsockname()[:2]
    err.print(f"{service.name} on http://{host}:{port}", highlight=False)
    try:
        _run(service.serve(sock=sock, advertise=advertise, log_level=log_level))
    except ServiceStartupError as exc:
        logs.flush()
        err.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(1) from None
