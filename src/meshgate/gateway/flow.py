"""Why a client connection's reading is paused: a bit per reason, so that each side
that holds the client back (the pipeline, a full upstream, a buffered body, a refusal,
an upgrade waiting for its 101) lets go only of its own reason."""

from __future__ import annotations

__all__ = ["BODY_BUFFER", "PIPELINE", "REFUSED", "TUNNEL_WAIT", "UPSTREAM_FULL"]

PIPELINE = 1
"""A pipelined request waits for the one before it to be answered."""
UPSTREAM_FULL = 2
"""The upstream connection's write buffer is full (it reads the body slower)."""
BODY_BUFFER = 4
"""A body arrived before any upstream connection, and its buffer is full."""
REFUSED = 8
"""The connection is ending (a refused request); nothing more is read as a request."""
TUNNEL_WAIT = 16
"""Bytes after an Upgrade request wait for the upstream's 101, and their buffer is full."""
