"""Bearer tokens of the control plane (admin API, registry): configured, read from a
0600 file, or generated into one."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from meshgate.config.model import AdminSettings

__all__ = ["AdminToken"]


@dataclass(frozen=True)
class AdminToken:
    """The admin bearer token, and the file it was read from or written to."""

    value: str
    path: Path | None
    generated: bool

    @classmethod
    def resolve(cls, admin: AdminSettings, admin_port: int) -> AdminToken:
        """The configured token, else the one in the token file, else a new one saved there."""
        return cls.of(admin.token, admin.token_file, f"admin-{admin_port}.token")

    @classmethod
    def of(cls, token: SecretStr | None, token_file: str | None, default_name: str) -> AdminToken:
        """``token``, else the one in ``token_file`` (default ``~/.meshgate/<default_name>``),
        else a new one saved there (mode 0600)."""
        if token is not None:
            return cls(token.get_secret_value(), None, generated=False)
        path = Path(token_file or Path.home() / ".meshgate" / default_name).expanduser()
        try:
            existing = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            existing = ""
        if existing:
            return cls(existing, path, generated=False)
        value = secrets.token_urlsafe(32)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(value + "\n")
        os.chmod(path, 0o600)
        return cls(value, path, generated=True)
