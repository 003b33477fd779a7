"""The service chassis both Parley services run on."""

from parley.chassis.auth import (
    AuthSettings,
    Identity,
    TokenVerifier,
    current_identity,
    require_scope,
)
from parley.chassis.config import ConfigError, DatabaseSettings, Env, ServerSettings
from parley.chassis.database import Database
from parley.chassis.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
    Unavailable,
)
from parley.chassis.health import DependencyCheck
from parley.chassis.logs import configure_logging
from parley.chassis.server import GrpcApp

__all__ = [
    "AlreadyExists",
    "AuthSettings",
    "ConfigError",
    "Database",
    "DatabaseSettings",
    "DeadlineExceeded",
    "DependencyCheck",
    "Env",
    "FailedPrecondition",
    "FieldViolation",
    "GrpcApp",
    "Identity",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "ServerSettings",
    "ServiceError",
    "TokenVerifier",
    "Unauthenticated",
    "Unavailable",
    "configure_logging",
    "current_identity",
    "require_scope",
]
