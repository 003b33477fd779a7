"""Logs: one event per line, JSON or plain, tagged with the call's request id, never a token."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import grpc

from parley.chassis import NotFound
from parley.proto import user_pb2

_handler_log = logging.getLogger("parley.test.handler")


def events(stream: io.StringIO) -> list[dict[str, Any]]:
    lines = stream.getvalue().splitlines()
    assert lines, "nothing was logged"
    parsed = []
    for line in lines:
        event = json.loads(line)
        assert isinstance(event, dict), line
        parsed.append(event)
    return parsed


async def test_json_lines_carry_the_request_id(server: Any, auth: Any, log_to_buffer: Any):
    log = log_to_buffer("json", "INFO")

    async def behave(request: Any, context: Any) -> Any:
        _handler_log.info("looking up user %d", request.id, extra={"user_id": request.id})
        if request.id == 2:
            raise NotFound("user 2 not found")
        if request.id == 3:
            raise RuntimeError("lost the cursor\nsecond line")
        return user_pb2.GetUserResponse()

    server.servicer.get_user = behave
    for user_id in (1, 2, 3):
        call = server.stub.GetUser(
            user_pb2.GetUserRequest(id=user_id),
            metadata=[*auth, ("x-request-id", f"req-{user_id}")],
            timeout=5,
        )
        await call.code()

    logged = events(log)
    for event in logged:
        assert {"time", "level", "logger", "message", "request_id"} <= set(event)

    handler_lines = [e for e in logged if e["logger"] == "parley.test.handler"]
    assert [(e["request_id"], e["message"], e["user_id"]) for e in handler_lines] == [
        ("req-1", "looking up user 1", 1),
        ("req-2", "looking up user 2", 2),
        ("req-3", "looking up user 3", 3),
    ]

    access = [e for e in logged if e["logger"] == "parley.rpc" and e["message"].startswith("rpc ")]
    by_id = {e["request_id"]: e for e in access}
    assert set(by_id) == {"req-1", "req-2", "req-3"}
    assert "/user.UserService/GetUser OK" in by_id["req-1"]["message"]
    assert by_id["req-1"]["level"] == "INFO"
    assert "NOT_FOUND" in by_id["req-2"]["message"]
    assert "INTERNAL" in by_id["req-3"]["message"]
    assert by_id["req-3"]["level"] == "WARNING"

    # The unexpected error is logged once with its traceback, inside one JSON line.
    errors = [e for e in logged if e["level"] == "ERROR"]
    assert len(errors) == 1
    assert errors[0]["request_id"] == "req-3"
    assert "Traceback" in errors[0]["exception"]
    assert "lost the cursor" in errors[0]["exception"]


async def test_plain_lines_fold_tracebacks(server: Any, auth: Any, log_to_buffer: Any):
    log = log_to_buffer("plain", "INFO")

    async def broken(request: Any, context: Any) -> Any:
        raise RuntimeError("first\nsecond")

    server.servicer.get_user = broken
    call = server.stub.GetUser(
        user_pb2.GetUserRequest(id=1), metadata=[*auth, ("x-request-id", "plain-1")], timeout=5
    )
    assert await call.code() == grpc.StatusCode.INTERNAL
    lines = log.getvalue().splitlines()
    error_lines = [line for line in lines if " ERROR " in line]
    assert len(error_lines) == 1
    assert "[plain-1]" in error_lines[0]
    assert "Traceback" in error_lines[0] and "first | second" in error_lines[0]
    assert any("[plain-1]" in line and "INTERNAL" in line for line in lines)


def test_request_id_outside_a_call(log_to_buffer: Any):
    log = log_to_buffer("json", "DEBUG")
    logging.getLogger("parley.test").debug("starting")
    [event] = events(log)
    assert event["request_id"] == "-"
    assert event["level"] == "DEBUG"


def test_level_filters(log_to_buffer: Any):
    log = log_to_buffer("json", "WARNING")
    logging.getLogger("parley.test").info("quiet")
    logging.getLogger("parley.test").warning("loud")
    assert [e["message"] for e in events(log)] == ["loud"]


async def test_tokens_never_reach_the_log(serve: Any, make_token: Any, log_to_buffer: Any):
    for fmt in ("json", "plain"):
        log = log_to_buffer(fmt, "DEBUG")
        running = await serve()

        async def fail(request: Any, context: Any) -> Any:
            raise RuntimeError("handler failed")

        good = make_token(sub="7")
        tokens = [
            good,
            make_token(key="a-different-secret-that-is-32-bytes-long"),
            make_token(ttl=-3600),
            make_token(aud="elsewhere"),
            "not-a-jwt-but-secret-looking-0123456789",
        ]
        for token in tokens:
            await running.stub.GetUser(
                user_pb2.GetUserRequest(id=1),
                metadata=[("authorization", f"Bearer {token}")],
                timeout=5,
            ).code()
        running.servicer.get_user = fail
        await running.stub.GetUser(
            user_pb2.GetUserRequest(id=1),
            metadata=[("authorization", f"Bearer {good}")],
            timeout=5,
        ).code()
        await running.stop()

        output = log.getvalue()
        assert "Unauthenticated" in output or "UNAUTHENTICATED" in output
        assert "handler failed" in output
        for token in tokens:
            assert token not in output
            for part in token.split("."):
                if len(part) > 16:
                    assert part not in output, (fmt, part)
