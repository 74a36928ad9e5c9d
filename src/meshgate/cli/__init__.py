"""The ``meshgate`` command: thin commands over the library."""

from meshgate.cli.main import app, main

__all__ = ["app", "main"]
