"""What routing means, shared by the configuration and the gateway: the canonical form
of a request path (:mod:`.paths`) and the order in which routes are tried
(:mod:`.precedence`). Below both: it imports neither at run time."""

from __future__ import annotations

from meshgate.routing.errors import PathError
from meshgate.routing.paths import EncodedSlashes, normalize_path
from meshgate.routing.precedence import covers, precedence_key, segment_covers

__all__ = [
    "EncodedSlashes",
    "PathError",
    "covers",
    "normalize_path",
    "precedence_key",
    "segment_covers",
]
