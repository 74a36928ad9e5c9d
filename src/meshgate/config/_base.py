"""Shared pieces of the configuration model: the frozen base model, names, addresses,
durations and sizes as users write them.
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

__all__ = [
    "_FRAMING_HEADERS",
    "_HEADER_NAME_RE",
    "_HOST_RE",
    "_METHODS",
    "_NAME_RE",
    "Address",
    "Duration",
    "Name",
    "Size",
    "_Model",
    "parse_duration",
    "parse_size",
]


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_FRAMING_HEADERS = frozenset(
    ("content-length", "transfer-encoding", "connection", "upgrade", "keep-alive", "te", "trailer")
)
"""Headers that frame the message or the connection: only the gateway sets them."""
_HOST_RE = re.compile(r"^(\*\.)?([A-Za-z0-9-]+\.)*[A-Za-z0-9-]+\.?$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(?:([KMG])(i)?)?B?\s*$", re.IGNORECASE)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"})


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, use_attribute_docstrings=True
    )


# ---------------------------------------------------------------------------- scalars


def parse_duration(value: object) -> float:
    """Seconds from ``1.5``, ``"250ms"``, ``"5s"``, ``"2m"`` or ``"1h"``."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or text like '250ms', '5s', '2m'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[m.group(2) or "s"]
        seconds = float(m.group(1)) * scale
    else:
        raise ValueError(
            f"{value!r} is not a duration; write seconds as a number or text like "
            "'250ms', '5s', '2m' or '1h'"
        )
    if math.isnan(seconds):
        # NaN compares false with everything: the timeout would silently never fire.
        raise ValueError(f"{value!r} is not a duration; write a number of seconds")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {value!r}")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from ``1024``, ``"64KiB"``, ``"10MB"`` (KB = 1000 bytes, KiB = 1024)."""
    if isinstance(value, bool):
        raise ValueError("a size is a number of bytes or text like '64KiB' or '10MB'")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        power = " KMG".index(m.group(2).upper()) if m.group(2) else 0
        size = int(m.group(1)) * (1024 if m.group(3) else 1000) ** power
    else:
        raise ValueError(
            f"{value!r} is not a size; write bytes as a number or text like '64KiB' or '10MB'"
        )
    if size < 0:
        raise ValueError(f"a size cannot be negative, got {value!r}")
    return size


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]


class Address(_Model):
    """A host and a port, written ``"host:port"``, ``"[::1]:port"`` or ``":port"``."""

    host: str
    port: int = Field(ge=0, le=65535)

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        text = value.strip()
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(
                f"{value!r} is not an address; write 'host:port' such as '127.0.0.1:8080'"
            )
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host:
            host = "0.0.0.0"
        return {"host": host, "port": int(port)}

    @field_validator("host")
    @classmethod
    def _check_host(cls, host: str) -> str:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not _HOST_RE.match(host) or host.startswith("*"):
                raise ValueError(f"{host!r} is not an IP address or host name") from None
        return host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        """Whether the address only accepts connections from this machine."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def _check_name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid name; use letters, digits, '_', '.', '-' "
            "(up to 63, starting with a letter or digit)"
        )
    return value


Name = Annotated[str, AfterValidator(_check_name)]


# ---------------------------------------------------------------------------- gateway
