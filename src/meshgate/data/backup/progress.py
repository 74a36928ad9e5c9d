"""How long operations report their progress (the CLI draws a Rich progress bar)."""

from __future__ import annotations

from typing import Protocol

__all__ = ["NullProgress", "Progress"]


class Progress(Protocol):
    """Receives progress: one step (a table, the check of the archive) at a time."""

    def begin(self, step: str, total: int | None) -> None:
        """A step starts; ``total`` is its size in rows (or bytes), when known."""

    def advance(self, amount: int) -> None:
        """``amount`` more rows (or bytes) of the current step are done."""

    def end(self) -> None:
        """The current step is done."""


class NullProgress:
    """Progress that goes nowhere."""

    def begin(self, step: str, total: int | None) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass

    def end(self) -> None:
        pass
