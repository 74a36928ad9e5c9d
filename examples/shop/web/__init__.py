"""The ``web`` service of the reference shop."""
