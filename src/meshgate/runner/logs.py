"""One log stream for the whole system: every line prefixed and coloured by the
instance that wrote it, JSON lines shown compactly, and each instance's lines kept
in its own file for ``meshgate logs``.

Files hold each line as the process wrote it, after the time the runner read it
(``2025-01-31T12:00:00.123Z <line>``), so that several files merge in order. The
runner's own notes about an instance (exits, restarts) are lines starting with
``[meshgate]``.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import re
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.text import Text

__all__ = [
    "EVENT_MARK",
    "InstanceLog",
    "LogPrinter",
    "follow",
    "log_files",
    "render",
    "tail_lines",
]

EVENT_MARK = "[meshgate] "
"""How the runner's own notes about an instance start in its log file."""

PALETTE = (
    "cyan",
    "magenta",
    "green",
    "yellow",
    "blue",
    "bright_red",
    "bright_cyan",
    "bright_magenta",
    "bright_green",
    "bright_yellow",
    "bright_blue",
    "red",
)
"""Instance colours, given in the order instances first appear."""

_LEVEL_STYLES = {
    "debug": "dim",
    "warning": "yellow",
    "error": "bold red",
    "critical": "bold red",
}
_TS_LEN = len("2025-01-31T12:00:00.123Z")
_PLAIN_LEVEL_RE = re.compile(r"\b(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b")


def timestamp(now: float | None = None) -> str:
    """UTC, milliseconds, fixed width: sorts as text."""
    moment = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


# ---------------------------------------------------------------------------- rendering


def is_noise(line: str) -> bool:
    """Lines left out of the console (they stay in the log files): httpx's INFO
    line for every request an SDK service makes, such as its registry heartbeats."""
    if not line.startswith('{"') or '"httpx"' not in line:
        return False
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return (
        isinstance(record, dict)
        and record.get("logger") == "httpx"
        and record.get("level") in ("debug", "info")
    )


def render(line: str) -> Text:
    """One output line for the console: a JSON log record as ``level message``
    (with its request id and exception), a gateway access-log record as
    ``METHOD path status duration``, anything else as written (ANSI colours kept)."""
    if line.startswith(EVENT_MARK):
        return Text(line[len(EVENT_MARK) :], style="bold")
    if line.startswith("{") and line.endswith("}"):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            if "message" in record:
                return _render_record(record)
            if "method" in record and "status" in record:
                return _render_access(record)
    text = Text.from_ansi(line)
    match = _PLAIN_LEVEL_RE.search(line)
    if match is not None and match.group(1).lower() in _LEVEL_STYLES and not text.spans:
        text.stylize(_LEVEL_STYLES[match.group(1).lower()])
    return text


def _render_record(record: dict[str, Any]) -> Text:
    level = str(record.get("level", "info")).lower()
    style = _LEVEL_STYLES.get(level, "")
    text = Text()
    text.append(f"{level:<7} ", style=style or "dim")
    text.append(str(record.get("message", "")), style=style)
    request_id = record.get("request_id")
    if request_id:
        text.append(f"  request_id={request_id}", style="dim")
    exception = record.get("exception")
    if exception:
        text.append("\n" + str(exception), style="red")
    return text


def _render_access(record: dict[str, Any]) -> Text:
    status = record.get("status")
    style = "red" if isinstance(status, int) and status >= 500 else ""
    if isinstance(status, int) and 400 <= status < 500:
        style = "yellow"
    text = Text()
    text.append(f"{record.get('method', '?')} {record.get('path', '?')} ")
    text.append(str(status), style=style or "green")
    duration = record.get("duration_ms")
    if isinstance(duration, int | float):
        text.append(f" {duration:.1f} ms", style="dim")
    route = record.get("route")
    if route:
        text.append(f"  route={route}", style="dim")
    return text


class LogPrinter:
    """Prints lines of many instances as one stream: ``users-1 | message``."""

    def __init__(self, console: Console, colours: dict[str, str] | None = None) -> None:
        self.console = console
        self.broken = False
        """Set when the console can no longer be written (a closed pipe): the
        lines still go to the log files."""
        self.colours: dict[str, str] = dict(colours or {})
        self.width = max((len(n) for n in self.colours), default=7)

    def colour(self, name: str) -> str:
        """The colour of ``name`` (the next in the palette on first sight)."""
        found = self.colours.get(name)
        if found is None:
            found = PALETTE[len(self.colours) % len(PALETTE)]
            self.colours[name] = found
            self.width = max(self.width, len(name))
        return found

    def prefix(self, name: str) -> Text:
        return Text(f"{name:<{self.width}} | ", style=self.colour(name))

    def line(self, name: str, line: str, *, raw: bool = False) -> None:
        """Print one line written by instance ``name`` (unless it is noise, see
        :func:`is_noise`; ``raw`` prints every line as written)."""
        if not raw and is_noise(line):
            return
        body = Text(line) if raw else render(line)
        prefix = self.prefix(name)
        parts = body.split("\n")
        out = Text()
        for i, part in enumerate(parts):
            if i:
                out.append("\n")
            out.append_text(prefix)
            out.append_text(part)
        self._print(out)

    def note(self, name: str, message: str, style: str = "bold") -> None:
        """Print a note of the runner's about ``name`` (or the whole system)."""
        out = Text()
        for i, part in enumerate(message.split("\n")):
            if i:
                out.append("\n")
            out.append_text(self.prefix(name))
            out.append(part, style=style)
        self._print(out)

    def _print(self, text: Text) -> None:
        if self.broken:
            return
        try:
            self.console.print(text, soft_wrap=True, highlight=False)
        except (OSError, ValueError):  # `meshgate up | head` that ended, a closed terminal
            self.broken = True


# ---------------------------------------------------------------------------- files


class InstanceLog:
    """The log file of one instance, opened for appending."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._out: IO[str] | None = path.open("a", encoding="utf-8", errors="replace")

    def write(self, line: str) -> None:
        if self._out is not None:
            with contextlib.suppress(OSError, ValueError):
                self._out.write(f"{timestamp()} {line}\n")
                self._out.flush()

    def event(self, message: str) -> None:
        self.write(EVENT_MARK + message)

    def close(self) -> None:
        out, self._out = self._out, None
        if out is not None:
            with contextlib.suppress(OSError):
                out.close()


def log_files(folder: Path, target: str | None) -> list[Path]:
    """The log files in ``folder`` of ``target``: an instance (``users-2``), a service
    (``users``: its instances and its migration), or every one when None."""
    files = sorted(folder.glob("*.log"))
    if target is None:
        return files
    pattern = re.compile(rf"^{re.escape(target)}(-(\d+|migrate))?$")
    return [p for p in files if pattern.match(p.stem)]


def _parse(line: str) -> tuple[str, str]:
    """(timestamp, text) of a stored line; a line without one sorts first."""
    if len(line) > _TS_LEN and line[_TS_LEN] == " " and line[4] == "-":
        return line[:_TS_LEN], line[_TS_LEN + 1 :]
    return "", line


def _last_lines(path: Path, count: int) -> list[str]:
    """The last ``count`` lines of ``path`` (reading only its end when it is big)."""
    if count <= 0:
        return []
    try:
        with path.open("rb") as src:
            src.seek(0, 2)
            size = src.tell()
            block = 64 * 1024
            data = b""
            pos = size
            while pos > 0 and data.count(b"\n") <= count:
                step = min(block, pos)
                pos -= step
                src.seek(pos)
                data = src.read(step) + data
    except OSError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    if pos > 0:
        lines = lines[1:]  # the first one may be cut
    return lines[-count:]


def tail_lines(paths: Iterable[Path], count: int) -> list[tuple[str, str, str]]:
    """The last ``count`` lines of the files together, in time order, as
    (timestamp, instance, text)."""
    streams = []
    for path in paths:
        name = path.stem
        streams.append([(*_parse(line), name) for line in _last_lines(path, count)])
    merged = list(heapq.merge(*streams, key=lambda item: item[0]))
    return [(ts, name, text) for ts, text, name in merged[-count:] if count > 0]


def follow(
    files: Callable[[], list[Path]],
    emit: Callable[[str, str], None],
    stop: Callable[[], bool],
    interval: float = 0.2,
) -> None:
    """Print lines appended to ``files()`` from now on (new files included, such as
    instances added by ``scale``) until ``stop()`` is true."""
    offsets: dict[Path, int] = {}
    for path in files():
        with contextlib.suppress(OSError):
            offsets[path] = path.stat().st_size
    partial: dict[Path, bytes] = {}
    while not stop():
        batch: list[tuple[str, str, str]] = []
        for path in files():
            offset = offsets.get(path, 0)
            try:
                size = path.stat().st_size
                if size < offset:  # a new run started the file again
                    offset = 0
                if size == offset:
                    continue
                with path.open("rb") as src:
                    src.seek(offset)
                    data = partial.pop(path, b"") + src.read(size - offset)
            except OSError:
                continue
            offsets[path] = size
            *complete, rest = data.split(b"\n")
            if rest:
                partial[path] = rest
            for raw in complete:
                ts, text = _parse(raw.decode("utf-8", errors="replace"))
                batch.append((ts, path.stem, text))
        for _, name, text in sorted(batch, key=lambda item: item[0]):
            emit(name, text)
        time.sleep(interval)
