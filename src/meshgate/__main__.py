"""``python -m meshgate`` runs the ``meshgate`` command."""

from meshgate.cli import main

main()
