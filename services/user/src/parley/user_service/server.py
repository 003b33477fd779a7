"""Builds the UserService gRPC server on the chassis."""

from __future__ import annotations

from parley.chassis import GrpcApp, TokenVerifier
from parley.proto import user_pb2, user_pb2_grpc
from parley.proto.contract import USER_SERVICE

from .importing import IMPORT_LIMITS
from .migrations import MIGRATIONS
from .servicer import UserServicer
from .settings import UserSettings
from .store import UserStore

__all__ = ["SERVICE_NAME", "create_server"]

SERVICE_NAME = USER_SERVICE


def create_server(settings: UserSettings) -> GrpcApp:
    """A ready-to-start server bound to its port (read `.port`; port 0 picks a free one)."""
    app = GrpcApp(
        settings.server,
        services=[user_pb2.DESCRIPTOR.services_by_name["UserService"]],
        verifier=TokenVerifier(settings.auth),
    )
    db = app.use_database(settings.database, application_name="parley-user", migrations=MIGRATIONS)
    user_pb2_grpc.add_UserServiceServicer_to_server(
        UserServicer(UserStore(db), settings.imports), app.server
    )
    app.metrics.initialize_limits(IMPORT_LIMITS)
    return app
