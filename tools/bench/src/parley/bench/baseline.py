"""The baselines: bare grpc.aio servers, each in a process of its own, that do nothing but the
gRPC part of what Parley's services do.

- The echo server answers a unary call with a fixed reply of a given size (that of a GetUser
  reply) and a server-streaming call with a given number of messages of a given size (those of
  a ListUsers page). Generic handlers, bytes in and out: no parsing, no auth, no database.
- The broadcast server writes every message any stream sends to every open stream, the
  sender's own included (what a single in-process chat room would do with no storage, no
  Redis and no auth).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

__all__ = [
    "BROADCAST_METHOD",
    "ECHO_STREAM_METHOD",
    "ECHO_UNARY_METHOD",
    "BaselineServer",
    "start_broadcast_server",
    "start_echo_server",
]

ECHO_UNARY_METHOD = "/bench.Echo/Unary"
ECHO_STREAM_METHOD = "/bench.Echo/Stream"
BROADCAST_METHOD = "/bench.Broadcast/Stream"
_START_TIMEOUT = 30.0


@dataclass(frozen=True)
class EchoShape:
    unary_reply_size: int
    stream_item_size: int
    stream_items: int


def _passthrough(data: bytes) -> bytes:
    return data


class _EchoHandler(grpc.GenericRpcHandler):
    def __init__(self, shape: EchoShape) -> None:
        reply = b"x" * shape.unary_reply_size
        item = b"y" * shape.stream_item_size
        count = shape.stream_items

        async def unary(request: bytes, context: Any) -> bytes:
            return reply

        async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
            for _ in range(count):
                yield item

        self._handlers = {
            ECHO_UNARY_METHOD: grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=_passthrough, response_serializer=_passthrough
            ),
            ECHO_STREAM_METHOD: grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=_passthrough, response_serializer=_passthrough
            ),
        }

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        return self._handlers.get(handler_call_details.method)


class _BroadcastHandler(grpc.GenericRpcHandler):
    def __init__(self) -> None:
        self._streams: set[asyncio.Queue[bytes]] = set()
        self._handler = grpc.stream_stream_rpc_method_handler(
            self._stream, request_deserializer=_passthrough, response_serializer=_passthrough
        )

    async def _stream(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self._streams.add(inbox)
        # Headers at once, as Parley sends them once a stream has joined its room: a client
        # awaiting them knows the stream is open.
        await context.send_initial_metadata(())

        async def read() -> None:
            async for message in requests:
                for stream in self._streams:
                    stream.put_nowait(message)

        reader = asyncio.create_task(read())
        try:
            while True:
                yield await inbox.get()
        finally:
            self._streams.discard(inbox)
            reader.cancel()

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        if handler_call_details.method == BROADCAST_METHOD:
            return self._handler
        return None


async def _serve(handler: grpc.GenericRpcHandler, ports: Any, stop: Any) -> None:
    # As Parley's servers in the bench stack: no limit on streams a connection, and a burst
    # of calls waits for its handler instead of being cancelled by grpc's default (1,000).
    server = grpc.aio.server(
        options=[
            ("grpc.max_concurrent_streams", 100_000),
            ("grpc.server.max_pending_requests", 100_000),
            ("grpc.server.max_pending_requests_hard_limit", 100_000),
        ]
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ports.put(port)
    await asyncio.to_thread(stop.wait)
    await server.stop(0.5)


def _run(kind: str, shape: EchoShape | None, ports: Any, stop: Any) -> None:
    handler: grpc.GenericRpcHandler
    if kind == "echo":
        assert shape is not None
        handler = _EchoHandler(shape)
    else:
        handler = _BroadcastHandler()
    asyncio.run(_serve(handler, ports, stop))


class BaselineServer:
    """A baseline server process on a free loopback port; `close()` stops it."""

    def __init__(self, kind: str, shape: EchoShape | None = None) -> None:
        context = multiprocessing.get_context("spawn")
        ports: Any = context.Queue()
        self._stop = context.Event()
        self._process = context.Process(
            target=_run, args=(kind, shape, ports, self._stop), name=f"bench-{kind}", daemon=True
        )
        self._process.start()
        try:
            port = ports.get(timeout=_START_TIMEOUT)
        except queue.Empty:
            self.close()
            raise RuntimeError(f"the {kind} baseline server did not start") from None
        self.address = f"127.0.0.1:{port}"

    @property
    def pid(self) -> int:
        pid = self._process.pid
        assert pid is not None
        return pid

    def close(self) -> None:
        self._stop.set()
        self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    def __enter__(self) -> BaselineServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_echo_server(
    unary_reply_size: int, stream_item_size: int = 64, stream_items: int = 1000
) -> BaselineServer:
    """The echo baseline, its replies shaped like the calls it stands in for."""
    return BaselineServer("echo", EchoShape(unary_reply_size, stream_item_size, stream_items))


def start_broadcast_server() -> BaselineServer:
    """The chat baseline: one process, every message to every open stream."""
    return BaselineServer("broadcast")
