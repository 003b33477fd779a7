"""Unary calls: the echo baseline, GetUser and CreateUser, with the same client, payload size
and number of calls in flight."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import grpc

from parley.bench.baseline import ECHO_UNARY_METHOD
from parley.bench.loadgen import FixedRequest, LoadResult, Workload
from parley.bench.plan import Plan, load_row
from parley.bench.report import Report
from parley.bench.target import Target
from parley.proto import user_pb2, user_pb2_grpc
from parley.proto.contract import USER_SERVICE

__all__ = ["CreateUsers", "Reader", "make_reader", "measure_unary"]

GET_USER = f"/{USER_SERVICE}/GetUser"
CREATE_USER = f"/{USER_SERVICE}/CreateUser"
WRITE = ("users:write",)


@dataclass(frozen=True)
class CreateUsers:
    """A new user on every call: e-mail addresses unique across workers, calls and runs."""

    tag: str

    def request(self, worker: int, sequence: int) -> bytes:
        return user_pb2.CreateUserRequest(
            name=f"Bench {worker}-{sequence}",
            email=f"b-{self.tag}-{worker}-{sequence}@bench.example",
            age=30,
        ).SerializeToString()


@dataclass(frozen=True)
class Reader:
    """A user that GetUser reads, and what its request and reply look like on the wire."""

    user_id: int
    request: bytes
    reply_size: int


def make_reader(target: Target) -> Reader:
    """Creates the user GetUser reads and measures its reply's size."""
    metadata = (("authorization", f"Bearer {target.token('1', WRITE)}"),)
    with grpc.insecure_channel(target.user) as channel:
        stub = user_pb2_grpc.UserServiceStub(channel)
        created = stub.CreateUser(
            user_pb2.CreateUserRequest(
                name="Bench Reader", email=f"reader-{uuid.uuid4().hex[:10]}@bench.example", age=36
            ),
            metadata=metadata,
            timeout=10,
        )
        request = user_pb2.GetUserRequest(id=created.user.id)
        reply = stub.GetUser(request, metadata=metadata, timeout=10)
    return Reader(created.user.id, request.SerializeToString(), reply.ByteSize())


def _ratio(result: LoadResult, baseline: LoadResult) -> float | None:
    return result.throughput / baseline.throughput if baseline.throughput else None


def measure_unary(
    target: Target, echo_address: str, reader: Reader, plan: Plan, report: Report
) -> LoadResult:
    """The echo baseline, GetUser and CreateUser; returns the baseline's result."""
    metadata = (("authorization", f"Bearer {target.token('1', WRITE)}"),)
    same = FixedRequest(reader.request)
    baseline = plan.load(Workload(echo_address, ECHO_UNARY_METHOD, same, metadata=metadata))
    row = report.add(load_row("baseline: bare grpc.aio echo (unary)", baseline))
    row.ratio, row.ratio_basis = 1.0, "itself"
    row.notes = (
        f"{reader.reply_size}-byte replies (a GetUser reply's size), "
        f"{len(reader.request)}-byte requests"
    )

    get = plan.load(Workload(target.user, GET_USER, same, metadata=metadata))
    row = report.add(load_row("GetUser (auth, metrics, Postgres)", get))
    row.ratio, row.ratio_basis = _ratio(get, baseline), "calls/s vs echo"
    row.target = "≥ 0.60× calls/s and p99 ≤ 2× echo's"
    if not row.broken and row.ratio is not None and baseline.p99 > 0:
        p99_ratio = get.p99 / baseline.p99
        row.details["p99_ratio"] = p99_ratio
        row.passed = row.ratio >= 0.6 and p99_ratio <= 2.0
        row.notes = (row.notes + "; " if row.notes else "") + f"p99 {p99_ratio:.2f}× echo's"

    create = plan.load(
        Workload(target.user, CREATE_USER, CreateUsers(uuid.uuid4().hex[:8]), metadata=metadata)
    )
    row = report.add(load_row("CreateUser (auth, validation, Postgres insert)", create))
    row.ratio, row.ratio_basis = _ratio(create, baseline), "calls/s vs echo"
    return baseline
