"""``meshgate`` commands. Each is a thin layer over the library; errors in user
input are printed as the library words them, never as a traceback."""

from __future__ import annotations

import asyncio
import inspect
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from meshgate import __version__
from meshgate.cli._extras import missing_extra, one_line
from meshgate.config.loader import load
from meshgate.errors import ConfigError, SupervisorError
from meshgate.runner.render import plural

app = typer.Typer(
    name="meshgate",
    help="meshgate: API gateway, registry and service platform.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# No markup: messages quote user input and pip lines such as 'meshgate[redis]',
# which rich would take for a style and drop.
err = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)
out = Console(soft_wrap=True, markup=False, highlight=False)

ConfigFile = Annotated[
    Path, typer.Argument(help="The configuration file (YAML).", show_default=False)
]


def _run(coro: object) -> None:
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover
        asyncio.run(coro)  # type: ignore[arg-type]


@app.command()
def version() -> None:
    """Print the meshgate version."""
    out.print(__version__)


_SYSTEM_ONLY = frozenset({"services", "root", "examples", "env", "name"})
"""Top-level keys of a system file (meshgate.yaml) that a gateway configuration lacks."""
_GATEWAY_ONLY = frozenset({"routes", "upstreams", "consumers"})
"""Top-level keys of a gateway configuration that a system file lacks."""


def guess_kind(path: Path) -> tuple[str, bool]:
    """Whether ``path`` is a system file (``"system"``) or a gateway configuration
    (``"gateway"``), from its top-level keys (its name when they do not tell), and
    whether the keys told."""
    import yaml  # noqa: PLC0415

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        data = None
    keys = set(data) if isinstance(data, dict) else set()
    system, gateway = len(keys & _SYSTEM_ONLY), len(keys & _GATEWAY_ONLY)
    nested = data.get("gateway") if isinstance(data, dict) else None
    if isinstance(nested, dict) and "config" in nested:
        system += 1  # gateway.config names a gateway configuration: a system file
    if system != gateway:
        return ("system" if system > gateway else "gateway"), True
    return ("system" if path.name == "meshgate.yaml" else "gateway"), False


@app.command()
def check(
    file: ConfigFile,
    kind: Annotated[
        str | None,
        typer.Option(
            "--kind",
            help="system (a meshgate.yaml of meshgate up) or gateway (a meshgate gateway "
            "configuration); default: told by its keys.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Validate a system file (meshgate.yaml) or a gateway configuration, saying
    which it checked; exit 1 and list every problem if it is invalid."""
    from meshgate.gateway.runtime import compile_config  # noqa: PLC0415

    if kind not in (None, "system", "gateway"):
        err.print(f"--kind {kind!r} is not one of system, gateway")
        raise typer.Exit(2)
    certain = kind is not None
    if kind is None:
        kind, certain = guess_kind(file)
    other = "gateway" if kind == "system" else "system"
    try:
        if kind == "system":
            from meshgate.runner.loader import load_system  # noqa: PLC0415

            sf = load_system(file)
            if sf.gateway_config is not None:
                compile_config(sf.gateway_config)
        else:
            config = load(file)
            compile_config(config)  # reads the key and certificate files it names
    except ConfigError as exc:
        err.print(str(exc))
        if not certain:
            what = "a system file" if kind == "system" else "a gateway configuration"
            err.print(f"(checked as {what}; give --kind {other} to check it as the other kind)")
        raise typer.Exit(1) from None
    if kind == "system":
        services = sf.system.services
        instances = sum(spec.replicas for spec in services.values())
        gateway = (
            f"gateway configuration {sf.system.gateway.config}: "
            f"{plural(len(sf.gateway_config.routes), 'route')}"
            if sf.gateway_config is not None
            else "a generated gateway configuration"
        )
        out.print(
            f"{file}: ok (system file: {plural(len(services), 'service')}, "
            f"{plural(instances, 'instance')}; {gateway})"
        )
        for warning in sf.warnings:
            err.print(f"warning: {warning}")
        return
    out.print(
        f"{file}: ok (gateway configuration: {plural(len(config.routes), 'route')}, "
        f"{plural(len(config.upstreams), 'upstream')})"
    )


@app.command()
def gateway(
    file: ConfigFile,
    workers: Annotated[
        int | None,
        typer.Option("--workers", "-w", help="Worker processes (default: one per CPU).", min=1),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the API gateway described by FILE until SIGTERM or Ctrl-C (then drain)."""
    from meshgate.gateway.supervisor import Supervisor  # noqa: PLC0415 - keep `check` fast

    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        err.print(f"--log-level {log_level!r} is not one of debug, info, warning, error")
        raise typer.Exit(2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        text = file.read_text(encoding="utf-8")
        supervisor = Supervisor(text, str(file), workers=workers, log_level=level)
    except OSError as exc:
        err.print(f"{file}: cannot read the file: {exc.strerror}", highlight=False)
        raise typer.Exit(1) from None
    except ConfigError as exc:
        err.print(str(exc), markup=False, highlight=False)
        raise typer.Exit(1) from None

    async def run() -> None:
        await supervisor.start()
        try:
            await serve()
        finally:
            await supervisor.stop()

    async def serve() -> None:
        gw = supervisor.config.gateway
        token = supervisor.token
        scheme = "https" if gw.tls is not None else "http"
        admin_scheme = "https" if gw.admin.tls is not None else "http"
        err.print(
            f"meshgate {__version__}: gateway on {scheme}://{gw.listen.host}:{supervisor.port} "
            f"({plural(supervisor.worker_count, 'worker')}); admin on "
            f"{admin_scheme}://{gw.admin.listen.host}:{supervisor.admin_port}",
            highlight=False,
        )
        if token is not None and token.path is not None:
            err.print(f"admin token in {token.path}", highlight=False)
        if supervisor.registry is not None:
            where = supervisor.registry_token
            err.print(
                f"registry on {admin_scheme}://{gw.admin.listen.host}:{supervisor.admin_port}"
                "/v1/registry"
                + (f"; token in {where.path}" if where is not None and where.path else ""),
                highlight=False,
            )
        await supervisor.serve()

    try:
        _run(run())
    except SupervisorError as exc:
        err.print(f"error: {one_line(exc)}", highlight=False)
        raise typer.Exit(1) from None


@app.command("hash-key")
def hash_key(
    key: Annotated[
        str | None,
        typer.Argument(help="The API key; a new random one is made when omitted."),
    ] = None,
) -> None:
    """Print an API key's stored form (sha256:...) for a consumer's api_keys."""
    import secrets  # noqa: PLC0415

    from meshgate.gateway.filters.auth import hash_api_key  # noqa: PLC0415

    if key is None:
        key = secrets.token_urlsafe(32)
        err.print("new API key (give it to the consumer; it is not stored):", highlight=False)
        out.print(key, highlight=False)
        err.print("its stored form, for the configuration:", highlight=False)
    out.print(hash_api_key(key), highlight=False)


@app.command("demo-upstream")
def demo_upstream(
    listen: Annotated[str, typer.Option(help="host:port to listen on.")] = "127.0.0.1:9001",
    name: Annotated[str, typer.Option(help="The instance name it answers with.")] = "demo",
) -> None:
    """Run a demo upstream that answers with what it received (for trying the gateway)."""
    from meshgate.config.model import Address  # noqa: PLC0415
    from meshgate.demo import serve_demo  # noqa: PLC0415

    try:
        address = Address.model_validate(listen)
    except ValueError as exc:
        err.print(f"--listen: {exc}", highlight=False)
        raise typer.Exit(2) from None

    async def run() -> None:
        server = await serve_demo(address.host, address.port, name)
        err.print(f"demo upstream {name!r} on http://{address}", highlight=False)
        async with server:
            await server.serve_forever()

    try:
        _run(run())
    except OSError as exc:
        err.print(f"cannot listen on {address}: {exc.strerror}", highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        pass


def unwrap(text: str | None) -> str | None:
    """A docstring as help text: each paragraph on one line, so that the terminal
    wraps it at its width instead of at the docstring's line breaks."""
    if text is None:
        return None
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())


def unwrap_help(typer_app: typer.Typer) -> None:
    """Give every command of ``typer_app`` (and of the groups in it) its docstring
    unwrapped (see :func:`unwrap`) as its help, unless it was given one."""
    for command in typer_app.registered_commands:
        command.help = unwrap(command.help or inspect.getdoc(command.callback))
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            info = group.typer_instance.info
            info.help = unwrap(info.help if isinstance(info.help, str) else None)
            unwrap_help(group.typer_instance)


def main() -> None:
    """Console-script entry point. A missing optional dependency, wherever it is
    imported, ends in one line naming the extra to install, not a traceback."""
    try:
        app()
    except ImportError as exc:
        message = missing_extra(exc)
        if message is None:
            raise
        err.print(f"error: {message}")
        raise SystemExit(1) from None
