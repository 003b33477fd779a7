"""The one exception type whose message the command line prints as a single line."""

from __future__ import annotations

__all__ = ["DevstackError"]


class DevstackError(Exception):
    """The stack cannot start or keep running; the message says why in one line."""
