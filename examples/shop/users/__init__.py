"""The ``users`` service of the reference shop."""
