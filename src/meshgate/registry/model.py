"""What the registry holds: instance specs as services send them, registered
instances, and snapshots of the registry at an index.

Every model is frozen and validated on construction; error messages name the field,
the bad value and the fix.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from meshgate.registry.errors import InvalidNameError

__all__ = [
    "MAX_METADATA_BYTES",
    "MAX_METADATA_ENTRIES",
    "MAX_TTL",
    "MIN_TTL",
    "Instance",
    "InstanceSpec",
    "Snapshot",
    "check_name",
    "describe_validation_error",
]

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
"""Service names and instance ids (and zones): safe in URLs, Redis keys and logs."""
_NAME_RULE = "use 1 to 63 letters, digits, '_', '.' or '-', starting with a letter or digit"

MIN_TTL = 1.0
"""The shortest TTL in seconds: shorter would evict healthy instances on a GC pause."""
MAX_TTL = 300.0
"""The longest TTL in seconds: a dead instance stays listed at most this long."""
MAX_METADATA_ENTRIES = 64
"""At most this many metadata entries per instance."""
MAX_METADATA_BYTES = 16 * 1024
"""At most this many bytes (UTF-8) of metadata keys and values together per instance."""
_MAX_METADATA_VALUE = 1024
_METADATA_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}")
_VERSION_RE = re.compile(r"[\x21-\x7e]{0,64}")  # printable ASCII, no spaces
_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?"
)
_ADDRESS_FIX = "give host:port such as 10.0.0.5:8080, users-1.internal:8080 or [fd00::5]:8080"


def _name_problem(value: str, field: str) -> str | None:
    if isinstance(value, str) and NAME_RE.fullmatch(value):
        return None
    return f"{value!r} is not a valid {field}; {_NAME_RULE}"


def check_name(value: str, field: str) -> str:
    """``value`` if it is a valid service name or instance id; raises
    :class:`InvalidNameError` naming ``field`` otherwise."""
    problem = _name_problem(value, field)
    if problem is not None:
        raise InvalidNameError(field, str(value), problem)
    return value


def _split_address(address: str) -> tuple[str, int]:
    """``(host, port)`` of ``host:port`` / ``[v6]:port``; raises ValueError with the fix."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{address!r} is not host:port; {_ADDRESS_FIX}")
    if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{address!r} has no valid port (1-65535); {_ADDRESS_FIX}")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(
                f"{address!r}: {host} is not an IPv6 address; {_ADDRESS_FIX}"
            ) from None
        return host[1:-1], int(port_text)
    if ":" in host:
        raise ValueError(f"{address!r}: write an IPv6 address in brackets, such as [{host}]:8080")
    labels = host.rstrip(".").split(".")
    if all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(
                f"{address!r}: {host} is not an IPv4 address; {_ADDRESS_FIX}"
            ) from None
    elif not _HOSTNAME_RE.fullmatch(host):
        raise ValueError(f"{address!r}: {host!r} is not a host name or IP; {_ADDRESS_FIX}")
    return host, int(port_text)


class InstanceSpec(BaseModel):
    """What a service instance registers: where to reach it and how long it lives
    without a heartbeat."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    address: str
    """Where the gateway connects: ``host:port``, ``[IPv6]:port``."""
    version: str = ""
    """The instance's version, for display and routing by version (printable ASCII,
    no spaces, at most 64 characters)."""
    zone: str = ""
    """The zone (or rack, or data centre) the instance runs in, for zone-aware routing."""
    metadata: dict[str, str] = Field(default_factory=dict)
    """Free-form labels; at most 64 entries and 16 KiB. Keys are kept sorted."""
    ttl: float = 10.0
    """Seconds the instance stays registered after its last heartbeat (1 to 300).
    Heartbeat every ttl/3 to survive a lost heartbeat or two."""

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        _split_address(value)
        return value

    @field_validator("version")
    @classmethod
    def _check_version(cls, value: str) -> str:
        if not _VERSION_RE.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a valid version; use at most 64 printable ASCII "
                "characters without spaces, such as 1.4.2 or 2024-05-01+abc123"
            )
        return value

    @field_validator("zone")
    @classmethod
    def _check_zone(cls, value: str) -> str:
        if value and not NAME_RE.fullmatch(value):
            raise ValueError(f"{value!r} is not a valid zone; {_NAME_RULE} (or leave it empty)")
        return value

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_METADATA_ENTRIES:
            raise ValueError(
                f"{len(value)} entries is too many; keep at most {MAX_METADATA_ENTRIES} "
                "(put large data in the service itself, not in the registry)"
            )
        size = 0
        for key, item in value.items():
            if not _METADATA_KEY_RE.fullmatch(key):
                raise ValueError(
                    f"key {key!r} is not valid; use 1 to 128 letters, digits, '_', '.', ':', "
                    "'/' or '-', starting with a letter or digit"
                )
            if len(item) > _MAX_METADATA_VALUE:
                raise ValueError(
                    f"the value of {key!r} has {len(item)} characters; keep it to "
                    f"{_MAX_METADATA_VALUE}"
                )
            size += len(key.encode()) + len(item.encode())
        if size > MAX_METADATA_BYTES:
            raise ValueError(
                f"{size} bytes of metadata is too much; keep keys and values under "
                f"{MAX_METADATA_BYTES} bytes together"
            )
        # Sorted, so that the same metadata is the same spec whatever order it came in.
        return dict(sorted(value.items()))

    @field_validator("ttl")
    @classmethod
    def _check_ttl(cls, value: float) -> float:
        if not MIN_TTL <= value <= MAX_TTL:
            raise ValueError(
                f"{value:g} seconds is out of range; give a TTL between {MIN_TTL:g} and "
                f"{MAX_TTL:g} seconds (the instance is evicted this long after its last heartbeat)"
            )
        return value

    @property
    def host(self) -> str:
        """The host of :attr:`address` (an IPv6 address without its brackets)."""
        return _split_address(self.address)[0]

    @property
    def port(self) -> int:
        """The port of :attr:`address`."""
        return _split_address(self.address)[1]


class Instance(InstanceSpec):
    """A registered instance of a service: its spec, its identity and its history."""

    service: str
    """The service this is an instance of."""
    id: str
    """The instance's id, unique within its service."""
    registered_at: datetime
    """When the instance registered (wall clock, UTC; for display only)."""
    last_heartbeat: datetime
    """When the registry last heard from the instance (wall clock, UTC; for display
    only: eviction uses a monotonic clock, or Redis's clock with the Redis backend)."""
    index: int
    """The registry index at the instance's last change (registration or new spec)."""

    @field_validator("service")
    @classmethod
    def _check_service(cls, value: str) -> str:
        problem = _name_problem(value, "service name")
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        problem = _name_problem(value, "instance id")
        if problem is not None:
            raise ValueError(problem)
        return value

    @property
    def spec(self) -> InstanceSpec:
        """The spec the instance registered with."""
        return InstanceSpec(
            address=self.address,
            version=self.version,
            zone=self.zone,
            metadata=self.metadata,
            ttl=self.ttl,
        )

    @classmethod
    def build(
        cls,
        service: str,
        instance_id: str,
        spec: InstanceSpec,
        *,
        registered_at: datetime,
        last_heartbeat: datetime,
        index: int,
    ) -> Instance:
        """An instance from a validated spec (not validated again)."""
        return cls.model_construct(
            address=spec.address,
            version=spec.version,
            zone=spec.zone,
            metadata=spec.metadata,
            ttl=spec.ttl,
            service=service,
            id=instance_id,
            registered_at=registered_at,
            last_heartbeat=last_heartbeat,
            index=index,
        )


class Snapshot(BaseModel):
    """The registry's instances (of one service, or of all) as of an index.

    With a service, :attr:`index` is that service's modify index (the registry index
    at its last change, 0 if it never had an instance); without one, the registry's
    index. Pass it back to ``wait`` to hear of the next change.
    """

    model_config = ConfigDict(frozen=True)

    index: int
    """The index this state is current as of."""
    instances: tuple[Instance, ...] = ()
    """The instances, sorted by service and id."""
    service: str | None = None
    """The service this snapshot is of, or None for the whole registry."""

    def by_service(self) -> dict[str, list[Instance]]:
        """The instances grouped by service name (services without instances left out)."""
        groups: dict[str, list[Instance]] = {}
        for instance in self.instances:
            groups.setdefault(instance.service, []).append(instance)
        return groups

    def to_json(self) -> dict[str, Any]:
        """The JSON body the HTTP API answers with for this snapshot."""
        if self.service is not None:
            return {
                "index": self.index,
                "service": self.service,
                "instances": [i.model_dump(mode="json") for i in self.instances],
            }
        return {
            "index": self.index,
            "services": {
                name: [i.model_dump(mode="json") for i in group]
                for name, group in self.by_service().items()
            },
        }

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Snapshot:
        """The snapshot an HTTP API answer (:meth:`to_json`) describes."""
        service = body.get("service")
        if service is not None:
            instances = [Instance.model_validate(i) for i in body.get("instances", ())]
        else:
            instances = [
                Instance.model_validate(i)
                for group in body.get("services", {}).values()
                for i in group
            ]
        return cls(index=int(body["index"]), instances=tuple(instances), service=service)


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem, each naming the field: ``ttl: 500 seconds is out of range; ...``."""
    lines = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "(body)"
        ctx = error.get("ctx") or {}
        if error["type"] == "value_error" and "error" in ctx:
            message = str(ctx["error"])
        elif error["type"] == "extra_forbidden":
            message = (
                "is not a field of an instance spec; the fields are address, version, "
                "zone, metadata and ttl"
            )
        elif error["type"] == "missing":
            message = "is required"
        else:
            message = error["msg"]
        lines.append(f"{where}: {message}")
    return "; ".join(lines)
