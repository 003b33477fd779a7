"""A failed call's status as the server sent it, with its rich details decoded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

__all__ = ["RichError", "rich_error"]

DETAILS_KEY = "grpc-status-details-bin"


@dataclass
class RichError:
    """The code, message and `google.rpc` details of a failed call."""

    code: grpc.StatusCode
    message: str
    status: status_pb2.Status | None = None
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    violations: list[tuple[str, str]] = field(default_factory=list)

    @property
    def fields(self) -> list[str]:
        """The fields named by the BadRequest field violations."""
        return [name for name, _ in self.violations]


def rich_error(error: Any) -> RichError:
    """Decodes `grpc-status-details-bin` of a sync or asyncio call's error, checking that the
    details agree with the call's own code and message."""
    code: grpc.StatusCode = error.code()
    message: str = error.details() or ""
    found = RichError(code=code, message=message)
    for key, value in error.trailing_metadata() or ():
        if key == DETAILS_KEY:
            found.status = status_pb2.Status.FromString(value)
    if found.status is None:
        return found
    assert found.status.code == code.value[0], "status details disagree with the call's code"
    assert found.status.message == message, "status details disagree with the call's message"
    for detail in found.status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            found.reason = info.reason
            found.metadata = dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.violations = [(v.field, v.description) for v in bad.field_violations]
    return found
