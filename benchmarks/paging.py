"""ListUsers paging cost: a deep page against the first page, offset paging against keyset paging.

Everything runs in one process against one server and database, and each result is a ratio
to the first-page baseline measured in the same run, so machine noise cancels out.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid

import grpc
import jwt
import psycopg

from parley.chassis import Env
from parley.proto import user_pb2, user_pb2_grpc
from parley.user_service import UserSettings, create_server
from parley.user_service.migrations import apply_migrations
from parley.user_service.paging import encode_token

ADMIN_URL = os.environ.get(
    "PARLEY_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
USERS = int(os.environ.get("PARLEY_BENCH_USERS", "200000"))
PAGE_SIZE = 50
ROUNDS = 30
SECRET = "bench-" + "b" * 40


async def _time_page(
    stub: user_pb2_grpc.UserServiceAsyncStub,
    request: user_pb2.ListUsersRequest,
    metadata: list[tuple[str, str]],
) -> float:
    samples = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        count = 0
        async for _user in stub.ListUsers(request, metadata=metadata):
            count += 1
        samples.append(time.perf_counter() - start)
        assert count == PAGE_SIZE, count
    return statistics.median(samples)


async def main() -> None:
    name = f"parley_bench_{uuid.uuid4().hex[:8]}"
    params = psycopg.conninfo.conninfo_to_dict(ADMIN_URL)
    url = psycopg.conninfo.make_conninfo("", **{**params, "dbname": name})
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        await apply_migrations(url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO users (name, email, age) SELECT 'user ' || i, 'u' || i || "
                "'@bench.example', i %% 100 FROM generate_series(1, %s) AS i",
                (USERS,),
            )
            conn.execute("ANALYZE users")
        env = Env(
            {
                "PARLEY_DATABASE_URL": url,
                "PARLEY_JWT_SECRET": SECRET,
                "PARLEY_GRPC_HOST": "127.0.0.1",
                "PARLEY_GRPC_PORT": "0",
                "PARLEY_METRICS_HOST": "127.0.0.1",
                "PARLEY_METRICS_PORT": "0",
                "PARLEY_LOG_LEVEL": "WARNING",
            }
        )
        app = create_server(UserSettings.from_env(env))
        await app.start()
        now = int(time.time())
        token = jwt.encode(
            {"sub": "1", "iss": "parley", "aud": "parley", "exp": now + 3600},
            SECRET,
            algorithm="HS256",
        )
        metadata = [("authorization", f"Bearer {token}")]
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
                stub = user_pb2_grpc.UserServiceStub(channel)
                deep_page = (USERS - 2 * PAGE_SIZE) // PAGE_SIZE
                after_id = (deep_page - 1) * PAGE_SIZE
                first = await _time_page(
                    stub, user_pb2.ListUsersRequest(page_size=PAGE_SIZE), metadata
                )
                offset = await _time_page(
                    stub, user_pb2.ListUsersRequest(page=deep_page, page_size=PAGE_SIZE), metadata
                )
                keyset = await _time_page(
                    stub,
                    user_pb2.ListUsersRequest(
                        page_size=PAGE_SIZE, page_token=encode_token(after_id)
                    ),
                    metadata,
                )
        finally:
            await app.stop()
        print(f"ListUsers, {USERS} users, page size {PAGE_SIZE}, median of {ROUNDS} calls")
        print(f"  first page (baseline)      {first * 1000:8.2f} ms   1.00x")
        print(f"  page {deep_page} by offset     {offset * 1000:8.2f} ms   {offset / first:5.2f}x")
        print(f"  same page by page_token  {keyset * 1000:8.2f} ms   {keyset / first:5.2f}x")
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    asyncio.run(main())
