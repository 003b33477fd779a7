"""Free ports and health checks."""

from __future__ import annotations

import random
import socket
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["free_port", "health_status"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 with nothing listening on it (at the time of the call).

    It is taken below the kernel's ephemeral range (32768 and up on Linux), so no outgoing
    connection can take it as its local port before the server that is to use it listens.
    """
    while True:
        port = random.randrange(20000, 32000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


async def health_status(port: int, service: str) -> int:
    """The grpc.health.v1 status the server on 127.0.0.1:`port` reports for `service`."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs' types are the sync ones
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(response.status)
