"""Domain errors and the one place that turns them into gRPC statuses (AIP-193).

Servicers raise these; the chassis interceptor aborts the call with the canonical code,
the message, and rich details (`google.rpc.ErrorInfo`, `google.rpc.BadRequest`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = [
    "ERROR_DOMAIN",
    "AlreadyExists",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "LimitExceeded",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "ServiceError",
    "Unauthenticated",
    "Unavailable",
    "to_status",
]

ERROR_DOMAIN = "parley"


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field: its path (such as `email`) and what is wrong with it."""

    field: str
    description: str


class ServiceError(Exception):
    """An error with a canonical gRPC status code and an UPPER_SNAKE_CASE reason."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    default_reason = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})

    def details(self) -> list[any_pb2.Any]:
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata
        )
        packed = any_pb2.Any()
        packed.Pack(info)
        return [packed]


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(self, violations: Sequence[FieldViolation], *, reason: str | None = None) -> None:
        if not violations:
            raise ValueError("InvalidArgument needs at least one field violation")
        message = "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(f"invalid request: {message}", reason=reason)
        self.violations = list(violations)

    def details(self) -> list[any_pb2.Any]:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in self.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        return [*super().details(), packed]


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class LimitExceeded(ResourceExhausted):
    """A configured limit refused the call: RESOURCE_EXHAUSTED naming the limit and its setting.

    `limit` is the short name the refusal is counted under (`parley_limit_refusals_total`).
    """

    default_reason = "LIMIT_EXCEEDED"

    def __init__(self, limit: str, setting: str, value: float, message: str) -> None:
        super().__init__(
            f"{message} (limit {setting}={value:g})",
            metadata={"limit": limit, "setting": setting, "value": f"{value:g}"},
        )
        self.limit = limit
        self.setting = setting


class OutOfRange(ServiceError):
    code = grpc.StatusCode.OUT_OF_RANGE
    default_reason = "OUT_OF_RANGE"


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class Internal(ServiceError):
    """A fault of the server itself; the message must not leak internals."""

    code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"


class Unavailable(ServiceError):
    """A dependency (postgres, redis, ...) cannot be reached; the message names it."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "DEPENDENCY_UNAVAILABLE"

    def __init__(self, dependency: str, detail: str) -> None:
        super().__init__(
            f"{dependency} is unavailable: {detail}", metadata={"dependency": dependency}
        )
        self.dependency = dependency


def to_status(error: ServiceError) -> grpc.Status:
    """The gRPC status, with `grpc-status-details-bin` trailing metadata, for an error."""
    code_value: int = error.code.value[0]
    assert code_value in code_pb2.Code.values()
    status = status_pb2.Status(code=code_value, message=error.message, details=error.details())
    return rpc_status.to_status(status)
