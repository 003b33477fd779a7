"""The parts of the command line that need no server: error lines, exit codes, file rows."""

from __future__ import annotations

import csv
import io

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from parley.client import (
    Internal,
    NewUser,
    ParleyError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from parley.client.cli.errors import describe, exit_code
from parley.client.cli.importing import Format, RowReader

USER_METHOD = "/user.UserService/GetUser"


@pytest.mark.parametrize("code", list(grpc.StatusCode)[1:], ids=lambda c: c.name)
def test_exit_code_is_ten_plus_the_status(code: grpc.StatusCode) -> None:
    assert exit_code(ParleyError("x", code=code)) == 10 + code.value[0]


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (
            Unavailable(
                "user-service is unavailable",
                target="chat:50052",
                method="/chat.ChatService/ListMessages",
                reason="DEPENDENCY_UNAVAILABLE",
            ),
            "parley: UNAVAILABLE: ChatService at chat:50052: user-service is unavailable"
            " - try: retry shortly; `parley health` shows what is down",
        ),
        (
            Unauthenticated("token has expired", target="u:1", method=USER_METHOD),
            "parley: UNAUTHENTICATED: token has expired"
            " - try: get a new token with `parley token --sub 1 --scope users:write`",
        ),
        (
            Unimplemented("unknown service", target="127.0.0.1:50052", method=USER_METHOD),
            "parley: UNIMPLEMENTED: the server at 127.0.0.1:50052 does not serve"
            " /user.UserService/GetUser - try: check --user-addr or PARLEY_USER_ADDR:"
            " it may point at another service",
        ),
        (
            ResourceExhausted("rate limit", method="/chat.ChatService/StreamChat"),
            "parley: RESOURCE_EXHAUSTED: rate limit - try: slow down, and retry after a pause",
        ),
        (
            Internal("boom", target="u:1", method=USER_METHOD, hint="see the log", request_id="r1"),
            "parley: INTERNAL: UserService at u:1: boom - try: see the log (request id r1)",
        ),
    ],
    ids=lambda value: value.code.name if isinstance(value, ParleyError) else "",
)
def test_error_lines(error: ParleyError, line: str) -> None:
    assert describe(error, timeout=10, token_given=True) == line


names = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=20)


@given(st.lists(st.tuples(names, names, st.integers(0, 150)), max_size=8))
def test_csv_rows_keep_their_values_and_lines(rows: list[tuple[str, str, int]]) -> None:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["email", "age", "name"])  # any column order
    for name, email, age in rows:
        writer.writerow([email, age, name])
    reader = RowReader(io.StringIO(text.getvalue(), newline=""), Format.CSV)
    reader.check_header()
    read = list(reader)
    assert read == [NewUser(n.strip(), e.strip(), a) for n, e, a in rows]
    assert reader.errors == []
    assert len(reader.lines) == len(rows)
    assert reader.lines == sorted(set(reader.lines)) and all(line >= 2 for line in reader.lines)
