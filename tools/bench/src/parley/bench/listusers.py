"""ListUsers: users a second streamed on a big page, and the time of a page 1,000 pages deep
against the first page, by offset (`page`) and by keyset (`page_token`)."""

from __future__ import annotations

import grpc
import psycopg

from parley.bench.baseline import ECHO_STREAM_METHOD
from parley.bench.loadgen import FixedRequest, LoadResult, Workload
from parley.bench.plan import Plan, load_row
from parley.bench.report import Report, Row
from parley.bench.target import Target
from parley.proto import user_pb2, user_pb2_grpc
from parley.proto.contract import NEXT_PAGE_TOKEN_KEY as NEXT_PAGE_TOKEN
from parley.proto.contract import USER_SERVICE

__all__ = ["fill_users", "measure_listusers", "user_item_size"]

LIST_USERS = f"/{USER_SERVICE}/ListUsers"


def fill_users(database_url: str, count: int) -> None:
    """`count` users in one INSERT ... SELECT generate_series, then ANALYZE."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO users (name, email, age) SELECT 'user ' || i, "
            "'u' || i || '@bench.example', i %% 100 FROM generate_series(1, %s) AS i",
            (count,),
        )
        conn.execute("ANALYZE users")


def _page(
    target: Target, request: user_pb2.ListUsersRequest, metadata: tuple[tuple[str, str], ...]
) -> tuple[list[user_pb2.User], str]:
    with grpc.insecure_channel(target.user) as channel:
        call = user_pb2_grpc.UserServiceStub(channel).ListUsers(
            request, metadata=metadata, timeout=30
        )
        users = list(call)
        trailers = dict(call.trailing_metadata() or ())
    token = trailers.get(NEXT_PAGE_TOKEN, "")
    return users, token if isinstance(token, str) else token.decode()


def user_item_size(target: Target) -> int:
    """The wire size of one streamed User, as the first page holds them."""
    metadata = (("authorization", f"Bearer {target.token('1')}"),)
    users, _ = _page(target, user_pb2.ListUsersRequest(page_size=1), metadata)
    return users[0].ByteSize() if users else 64


def _time_ratio(row: Row, result: LoadResult, first: LoadResult) -> None:
    if row.broken or first.p50 <= 0:
        return
    row.ratio = result.p50 / first.p50
    row.ratio_basis = "p50 time vs page 1"
    row.target = "≤ 1.5× page 1's time"
    row.passed = row.ratio <= 1.5


def measure_listusers(target: Target, echo_address: str, plan: Plan, report: Report) -> None:
    token = target.token("1")
    metadata = (("authorization", f"Bearer {token}"),)

    def workload(address: str, method: str, request: user_pb2.ListUsersRequest) -> Workload:
        return Workload(
            address,
            method,
            FixedRequest(request.SerializeToString()),
            kind="server_stream",
            metadata=metadata,
        )

    big = user_pb2.ListUsersRequest(page_size=plan.big_page)
    baseline = plan.load(workload(echo_address, ECHO_STREAM_METHOD, big))
    row = report.add(load_row("baseline: bare grpc.aio server stream", baseline, items="items"))
    row.ratio, row.ratio_basis = 1.0, "itself"
    row.notes = f"{plan.big_page} messages of a streamed User's size per call"

    streamed = plan.load(workload(target.user, LIST_USERS, big))
    row = report.add(
        load_row(f"ListUsers streaming, page 1 of {plan.big_page}", streamed, items="users")
    )
    if baseline.item_throughput:
        row.ratio = streamed.item_throughput / baseline.item_throughput
        row.ratio_basis = "items/s vs bare stream"
    row.target = "≥ 50,000 users/s"
    if not row.broken:
        row.passed = streamed.item_throughput >= 50_000

    # The deep page: page `deep_pages + 1`, i.e. `deep_pages` pages after the first.
    size, deep = plan.page_size, plan.deep_pages + 1
    _, deep_token = _page(
        target, user_pb2.ListUsersRequest(page=deep - 1, page_size=size), metadata
    )
    deep_users, _ = _page(target, user_pb2.ListUsersRequest(page=deep, page_size=size), metadata)
    in_flight = plan.paging_concurrency
    first = plan.load(
        workload(target.user, LIST_USERS, user_pb2.ListUsersRequest(page=1, page_size=size)),
        concurrency=in_flight,
    )
    row = report.add(load_row(f"ListUsers page 1 of {size} (baseline for paging)", first))
    row.ratio, row.ratio_basis = 1.0, "itself"
    row.notes = f"{in_flight} call(s) in flight for every paging row"

    offset = plan.load(
        workload(target.user, LIST_USERS, user_pb2.ListUsersRequest(page=deep, page_size=size)),
        concurrency=in_flight,
    )
    row = report.add(load_row(f"ListUsers page {deep:,} by offset (`page`)", offset))
    _time_ratio(row, offset, first)
    if len(deep_users) < size:
        row.passed = None  # not the page the target is about
        row.notes = (row.notes + "; " if row.notes else "") + (
            f"not judged: the table holds too few users, this page had {len(deep_users)}"
        )

    if deep_token:
        keyset = plan.load(
            workload(
                target.user,
                LIST_USERS,
                user_pb2.ListUsersRequest(page_size=size, page_token=deep_token),
            ),
            concurrency=in_flight,
        )
        row = report.add(load_row(f"ListUsers page {deep:,} by `page_token` (keyset)", keyset))
        _time_ratio(row, keyset, first)
    else:
        report.add(
            Row(
                name=f"ListUsers page {deep:,} by `page_token` (keyset)",
                notes="skipped: the table ends before this page",
            )
        )
