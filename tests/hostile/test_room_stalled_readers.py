"""Clients that never read the answer of ListRooms or ListMembers hold none of ChatService's
shared resources: no pooled Postgres connection, no transaction, and memory only for their
own answers.

grpcio's client always reads a unary answer itself, so the stalled clients are made by hand
with h2: each opens a TCP connection of its own to 127.0.0.1, announces
SETTINGS_INITIAL_WINDOW_SIZE=0 in its preface (the server may send no DATA), sends one request
and then neither reads nor sends a WINDOW_UPDATE. The requests ask for the largest pages:
ListRooms page_size=500 of 600 seeded public rooms with 200-character titles (~125 KB), and
ListMembers page_size=1000 of a room of 1,000 members (~20 KB). One `parley-chat serve` with a
pool of PARLEY_DB_POOL_MAX=10 gets 20 of each (40 calls, four times its pool). Once every
handler has answered OK, the answers stuck in the server behind flow control:

- ordinary clients' ListRooms, ListMembers and GetRoom, 30 at once (three times the pool) and
  30 one by one, get the same answers as before, each within 3 s (the pool's timeout is 5 s);
- no request was refused a pooled connection, every pooled connection is idle (the server's
  parley_db_pool_* metrics), and pg_stat_activity shows no chat connection active or idle in
  a transaction;
- the server's resident memory grew by less than 4 copies of each stalled answer plus 64 KiB
  per call, plus 4 MiB (~17.5 MiB);
- the stalled sockets got the response headers and nothing else: no DATA, no trailers (read
  only then, with nothing sent back).
Closed, the stalled connections are closed by the server too, and it serves as before.

The stall lasts a few seconds, well before the server's keepalive or its SETTINGS ACK timeout
would drop connections that acknowledge nothing.

Measured on a 2-core VM (6 runs): RSS +10.9-11.2 MiB for the 40 stalled calls, +11.4-11.8 MiB
with the ordinary calls (~295 KiB a call on average: ~420 KiB for a stalled ListRooms,
~105 KiB for a stalled ListMembers, ~25 KiB for a stalled GetRoom of ~300 bytes); the slowest
ordinary call 93-129 ms. Servers changed (for a trial, not kept) to keep a pooled connection
until a call is over, or to do so for one stalled call only, or to keep 2 MiB a call, fail:
the stalled calls past the pool's ten are never answered; one pooled connection is never
idle; +94 MiB.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from parley.proto import chat_pb2, chat_pb2_grpc
from parley.testing import bearer, rss_bytes, sample_key, scrape_metrics, wait_until_sync

POOL_SIZE = 10
STALLED = 2 * POOL_SIZE  # of each method: 40 connections in all
ROOMS = 600  # more than a page: the stalled ListRooms pages are full
ROOM_PAGE = 500  # ListRooms' largest page
TITLE = 200  # the longest title
MEMBERS = 1000  # ListMembers' largest page
SERVICE = "chat.ChatService"
DEADLINE = 3.0  # for an ordinary call: under the pool's 5 s timeout (PARLEY_DB_POOL_TIMEOUT)
# The memory bound: per stalled call 4 times its answer's size (measured: ~3.3 times; until
# the write completes grpc seems to keep the reply message, its serialized bytes and the
# transport's copy) and CALL_COST for the connection and the call (measured: ~25 KiB);
# MEMORY_SLACK for the allocator.
CALL_COST = 64 * 1024
MEMORY_SLACK = 4 * 2**20
BUSY_IN_POSTGRES = (
    "SELECT pid, state, query FROM pg_stat_activity WHERE datname = current_database()"
    " AND application_name = 'parley-chat'"
    " AND state IN ('active', 'idle in transaction', 'idle in transaction (aborted)')"
)


def grpc_connections(pid: int, port: int) -> int:
    """TCP connections process `pid` holds that were accepted on `port` (not its pooled
    Postgres connections, whose number may change)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    # grpc listens on a dual-stack socket: 127.0.0.1 is ::ffff:127.0.0.1 in /proc/net/tcp6.
    lines = [
        line
        for table in ("tcp", "tcp6")
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]
    ]
    accepted = 0
    for line in lines:
        fields = line.split()
        local_port = int(fields[1].rpartition(":")[2], 16)
        listening = fields[3] == "0A"
        if local_port == port and not listening and fields[9] in inodes:
            accepted += 1
    return accepted


def frame(message: Any) -> bytes:
    """A gRPC length-prefixed message, uncompressed."""
    data: bytes = message.SerializeToString()
    return b"\x00" + len(data).to_bytes(4, "big") + data


class RawCall:
    """One unary call of ChatService on a TCP connection of its own, made with h2. With
    `window=0` the server may send no DATA: the answer is never read."""

    def __init__(self, port: int, method: str, request: Any, token: str, *, window: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        # The preface's SETTINGS carry the window: no DATA frame may come before it applies.
        self.conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self.conn.initiate_connection()
        self.stream = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            self.stream,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", f"/{SERVICE}/{method}"),
                (":authority", f"127.0.0.1:{port}"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("authorization", f"Bearer {token}"),
            ],
        )
        self.conn.send_data(self.stream, frame(request), end_stream=True)
        self.sock.sendall(self.conn.data_to_send())

    def arrived(self) -> list[h2.events.Event]:
        """Whatever the server has sent so far, read without waiting; nothing is answered."""
        self.sock.setblocking(False)
        events: list[h2.events.Event] = []
        try:
            while chunk := self.sock.recv(1 << 16):
                events += self.conn.receive_data(chunk)
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)
        return events

    def read_all(self, timeout: float) -> tuple[bytes, dict[str, str]]:
        """Reads the whole answer, granting window as data comes: its body and trailers."""
        body = b""
        trailers: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        ended = False
        while not ended:
            assert time.monotonic() < deadline, "the answer did not come in time"
            chunk = self.sock.recv(1 << 16)
            assert chunk, "the server closed the connection"
            for event in self.conn.receive_data(chunk):
                if isinstance(event, h2.events.DataReceived):
                    body += event.data
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                elif isinstance(event, h2.events.TrailersReceived):
                    trailers = {str(k): str(v) for k, v in event.headers}
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True
            self.sock.sendall(self.conn.data_to_send())
        return body, trailers

    def close(self) -> None:
        self.sock.close()


def unframe(body: bytes) -> bytes:
    assert body[0] == 0 and int.from_bytes(body[1:5], "big") == len(body) - 5, body[:5]
    return body[5:]


def seed(stack: Any, prefix: str) -> str:
    """ROOMS public rooms with the longest titles, named to sort before any other room; the
    first of them (its name returned) has MEMBERS members."""
    stack.sql(
        "INSERT INTO chat_rooms (name, title)"
        " SELECT %s || lpad(g::text, 4, '0'), rpad('Stalled reader room ' || g, %s, '.')"
        " FROM generate_series(1, %s) AS g RETURNING 1",
        prefix,
        TITLE,
        ROOMS,
    )
    crowded = f"{prefix}0001"
    # Members straight into Postgres: far more at once than AddMember would take to add, and
    # with member_count kept as AddMember keeps it.
    stack.sql(
        "INSERT INTO chat_room_members (room, user_id)"
        " SELECT %s, 1000000 + g FROM generate_series(1, %s) AS g RETURNING 1",
        crowded,
        MEMBERS,
    )
    stack.sql(
        "UPDATE chat_rooms SET member_count = (SELECT count(*) FROM chat_room_members"
        " WHERE room = %s) WHERE name = %s RETURNING 1",
        crowded,
        crowded,
    )
    return crowded


def pool_is_idle(samples: dict[str, float]) -> bool:
    size = samples["parley_db_pool_connections"]
    return (
        1 <= size <= POOL_SIZE
        and samples["parley_db_pool_idle_connections"] == size
        and samples["parley_db_pool_waiting_requests"] == 0
    )


def handled_ok(samples: dict[str, float], method: str) -> float:
    key = sample_key(
        "grpc_server_handled_total",
        grpc_code="OK",
        grpc_method=method,
        grpc_service=SERVICE,
        grpc_type="unary",
    )
    return samples.get(key, 0.0)


@pytest.mark.timeout(60)
def test_never_read_room_answers_hold_no_shared_resources(
    stack: Any, serve: Callable[..., Any]
) -> None:
    server = serve("chat", PARLEY_DB_POOL_MAX=str(POOL_SIZE), PARLEY_LOG_LEVEL="WARNING")
    pid = server.pid
    prefix = f"00000-stalled-{uuid.uuid4().hex[:8]}-"
    crowded = seed(stack, prefix)
    token = stack.chatter_token
    me = bearer(token)
    rooms_request = chat_pb2.ListRoomsRequest(page_size=ROOM_PAGE)
    members_request = chat_pb2.ListMembersRequest(room=crowded, page_size=MEMBERS)
    get_request = chat_pb2.GetRoomRequest(name=crowded)

    def metrics() -> dict[str, float]:
        return scrape_metrics(server.metrics_port)

    def pool_state() -> dict[str, float]:
        return {k: v for k, v in metrics().items() if k.startswith("parley_db_pool_")}

    with ExitStack() as cleanup:
        cleanup.callback(
            stack.sql, "DELETE FROM chat_rooms WHERE name LIKE %s RETURNING 1", prefix + "%"
        )
        channel = cleanup.enter_context(grpc.insecure_channel(server.target))
        chats: Any = chat_pb2_grpc.ChatServiceStub(channel)

        # What an ordinary client gets: full pages of big answers, mostly the seeded rooms
        # (rooms other tests of this database made, such as "0", may sort before them).
        rooms = chats.ListRooms(rooms_request, metadata=me, timeout=10)
        members = chats.ListMembers(members_request, metadata=me, timeout=10)
        room = chats.GetRoom(get_request, metadata=me, timeout=10)
        assert len(rooms.rooms) == ROOM_PAGE and rooms.next_page_token
        assert rooms.ByteSize() > 100_000, rooms.ByteSize()
        assert len(members.members) == MEMBERS and not members.next_page_token
        assert room.member_count == MEMBERS
        memory_bound = MEMORY_SLACK + STALLED * (
            4 * rooms.ByteSize() + CALL_COST + 4 * members.ByteSize() + CALL_COST
        )

        # The hand-made call is a valid one: a client that reads gets the same answer.
        control = RawCall(server.port, "ListRooms", rooms_request, token, window=65535)
        try:
            body, trailers = control.read_all(10)
        finally:
            control.close()
        assert trailers.get("grpc-status") == "0", trailers
        assert chat_pb2.ListRoomsResponse.FromString(unframe(body)) == rooms

        def ordinary_calls() -> float:
            """Ordinary calls, 30 at once (three times the pool) and then 30 one by one, all
            answered as before within DEADLINE; returns the slowest one's seconds."""

            def timed(call: Callable[..., Any], request: Any, expected: Any) -> float:
                started = time.perf_counter()
                try:
                    reply = call(request, metadata=me, timeout=DEADLINE)
                except grpc.RpcError as error:
                    pytest.fail(f"{request.DESCRIPTOR.name} failed: {error}")
                assert reply == expected, request.DESCRIPTOR.name
                return time.perf_counter() - started

            work: list[tuple[Any, Any, Any]] = [
                (chats.ListRooms, rooms_request, rooms),
                (chats.ListMembers, members_request, members),
                (chats.GetRoom, get_request, room),
            ] * 10
            with ThreadPoolExecutor(len(work)) as pool:
                at_once = list(pool.map(lambda job: timed(*job), work))
            one_by_one = [timed(*job) for job in work]
            return max(at_once + one_by_one)

        ordinary_calls()  # warm-up: connections, prepared statements, the user cache, the heap
        wait_until_sync(
            lambda: pool_is_idle(metrics()), 10, "an idle pool before the stalled calls"
        )
        # Only the ordinary client's connection is left (the control's and the fixture's
        # health check's are closed).
        wait_until_sync(
            lambda: grpc_connections(pid, server.port) == 1,
            10,
            "one client connection",
            lambda: grpc_connections(pid, server.port),
        )
        before = metrics()
        rss_before = rss_bytes(pid)

        stalled: list[RawCall] = []
        for method, request in (("ListRooms", rooms_request), ("ListMembers", members_request)):
            for _ in range(STALLED):
                call = RawCall(server.port, method, request, token, window=0)
                cleanup.callback(call.close)
                stalled.append(call)

        # Every handler has answered OK: the answers now wait in the server for window.
        def all_answered() -> bool:
            now = metrics()
            return all(
                handled_ok(now, method) == handled_ok(before, method) + STALLED
                for method in ("ListRooms", "ListMembers")
            )

        wait_until_sync(all_answered, 20, "every stalled call's handler to answer", pool_state)
        stalled_growth = rss_bytes(pid) - rss_before
        wait_until_sync(
            lambda: pool_is_idle(metrics()), 10, "every pooled connection idle", pool_state
        )
        slowest = ordinary_calls()
        refused = (
            metrics()["parley_db_pool_request_errors_total"]
            - before["parley_db_pool_request_errors_total"]
        )
        wait_until_sync(lambda: pool_is_idle(metrics()), 10, "every pooled connection idle again")
        # The servers' health checks run a query now and then: a busy connection must not last.
        wait_until_sync(
            lambda: not stack.sql(BUSY_IN_POSTGRES),
            10,
            "no chat connection busy in Postgres",
            lambda: stack.sql(BUSY_IN_POSTGRES),
        )
        growth = max(stalled_growth, rss_bytes(pid) - rss_before)
        connections_during = grpc_connections(pid, server.port)

        # Still stalled: the server sent each call its response headers and nothing more.
        # (Read only now, and nothing is sent back: no SETTINGS ACK, no WINDOW_UPDATE.)
        for call in stalled:
            events = call.arrived()
            kinds = {type(event).__name__ for event in events}
            assert any(isinstance(e, h2.events.ResponseReceived) for e in events), kinds
            assert not kinds & {"DataReceived", "TrailersReceived", "StreamEnded", "StreamReset"}
        assert server.alive(), server.log_text()
        assert connections_during == 1 + 2 * STALLED, connections_during

        print(
            f"\n{2 * STALLED} stalled calls (ListRooms {rooms.ByteSize()} B, ListMembers"
            f" {members.ByteSize()} B): server RSS +{stalled_growth / 2**20:.1f} MiB, with the"
            f" ordinary calls +{growth / 2**20:.1f} MiB ({growth / 2 / STALLED / 1024:.0f} KiB"
            f" a call; bound {memory_bound / 2**20:.1f} MiB); slowest ordinary call"
            f" {slowest * 1000:.0f} ms"
        )
        assert refused == 0, f"{refused} requests got no pooled connection"
        assert growth < memory_bound, (
            f"{2 * STALLED} stalled calls grew the server by {growth / 2**20:.1f} MiB"
            f" (bound {memory_bound / 2**20:.1f} MiB)"
        )

        for call in stalled:
            call.close()
        wait_until_sync(
            lambda: grpc_connections(pid, server.port) == 1,
            10,
            "the server to close the stalled calls' connections",
        )
        wait_until_sync(lambda: pool_is_idle(metrics()), 10, "an idle pool after the stalled calls")
        ordinary_calls()

    assert server.alive(), server.log_text()
    assert "unhandled error" not in server.log_text(), server.log_text()


@pytest.mark.timeout(60)
def test_unary_calls_past_the_replica_limit_are_refused(
    stack: Any, serve: Callable[..., Any]
) -> None:
    """Stalled answers count against PARLEY_MAX_UNARY_CALLS until they are read: however many
    connections a client opens, the replica holds at most that many of them."""
    limit = 5
    server = serve("chat", PARLEY_MAX_UNARY_CALLS=str(limit), PARLEY_LOG_LEVEL="WARNING")
    token = stack.chatter_token
    request = chat_pb2.ListRoomsRequest(page_size=ROOM_PAGE)

    def metrics() -> dict[str, float]:
        return scrape_metrics(server.metrics_port)

    def refusals() -> float:
        key = sample_key("parley_limit_refusals_total", limit="unary_calls_per_replica")
        return metrics().get(key, 0.0)

    with ExitStack() as cleanup:
        channel = cleanup.enter_context(grpc.insecure_channel(server.target))
        chats: Any = chat_pb2_grpc.ChatServiceStub(channel)
        health: Any = health_pb2_grpc.HealthStub(channel)
        assert chats.ListRooms(request, metadata=bearer(token), timeout=10) is not None
        # A call's place is given back once grpc has finished it, a moment after the client
        # has its answer.
        wait_until_sync(
            lambda: metrics()["parley_unary_calls_open"] == 0,
            10,
            "the answered call to give its place back",
            lambda: metrics()["parley_unary_calls_open"],
        )

        stalled = [
            cleanup.enter_context(
                closing(RawCall(server.port, "ListRooms", request, token, window=0))
            )
            for _ in range(limit)
        ]
        wait_until_sync(
            lambda: metrics()["parley_unary_calls_open"] == limit,
            10,
            f"{limit} stalled calls to be held",
            lambda: metrics()["parley_unary_calls_open"],
        )
        with pytest.raises(grpc.RpcError) as refused:
            chats.ListRooms(request, metadata=bearer(token), timeout=10)
        error: Any = refused.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "PARLEY_MAX_UNARY_CALLS=5" in error.details()
        assert refusals() == 1
        # Probes are not the service's calls: they never compete with them.
        status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING

        for call in stalled:
            call.close()
        wait_until_sync(
            lambda: metrics()["parley_unary_calls_open"] == 0,
            15,
            "the stalled calls to be let go once their connections closed",
            lambda: metrics()["parley_unary_calls_open"],
        )
        assert chats.ListRooms(request, metadata=bearer(token), timeout=10) is not None
