"""TCP ports: asking the OS for free ones and checking that chosen ones are not taken."""

from __future__ import annotations

import socket
from contextlib import ExitStack

from parley.devstack.errors import DevstackError

__all__ = ["LOOPBACK", "check_free", "free_ports"]

LOOPBACK = "127.0.0.1"


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """`count` distinct ports that were free a moment ago (all held open until all are chosen)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def check_free(port: int, what: str, *, host: str = LOOPBACK, hint: str = "") -> None:
    """Fail with one line naming `what` when `port` cannot be bound on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            suffix = f"; {hint}" if hint else ""
            raise DevstackError(
                f"port {port} for {what} is not available on {host} ({exc.strerror}){suffix}"
            ) from None
