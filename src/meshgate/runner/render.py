"""Tables and summaries for the console: what runs, where, and how it is doing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

__all__ = ["instances_table", "plural", "uptime"]

_STATUS_STYLES = {
    "ready": "green",
    "starting": "yellow",
    "restarting": "yellow",
    "stopping": "yellow",
    "failed": "red",
    "exited": "red",
    "stopped": "dim",
}


def plural(count: int, noun: str, many: str | None = None) -> str:
    """``1 worker``, ``2 workers``; ``many`` for nouns that do not just take an s."""
    return f"{count} {noun if count == 1 else many or noun + 's'}"


def uptime(seconds: float | None) -> str:
    """``42s``, ``3m05s``, ``2h10m``, ``3d04h``; ``-`` when not running."""
    if seconds is None:
        return "-"
    total = int(seconds)
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    if total < 86400:
        return f"{total // 3600}h{total % 3600 // 60:02d}m"
    return f"{total // 86400}d{total % 86400 // 3600:02d}h"


def instances_table(
    instances: Sequence[dict[str, Any]], colours: dict[str, str] | None = None
) -> Table:
    """One row per instance: name, pid, address, status, health, restarts, uptime."""
    colours = colours or {}
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("INSTANCE", "PID", "ADDRESS", "STATUS", "HEALTH", "RESTARTS", "UPTIME"):
        table.add_column(column, no_wrap=True)
    for item in instances:
        status = str(item.get("status", "?"))
        health = str(item.get("health") or "-")
        table.add_row(
            Text(str(item["name"]), style=colours.get(str(item["name"]), "")),
            str(item.get("pid") or "-"),
            str(item.get("url") or item.get("address") or "-"),
            Text(status, style=_STATUS_STYLES.get(status, "")),
            Text(health, style="" if health in ("ok", "-") else "yellow"),
            str(item.get("restarts", 0)),
            uptime(item.get("uptime")),
        )
    return table
