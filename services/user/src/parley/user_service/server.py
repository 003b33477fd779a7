"""Builds the UserService gRPC server on the chassis."""

from __future__ import annotations

from parley.chassis import Database, DependencyCheck, GrpcApp, TokenVerifier
from parley.proto import user_pb2, user_pb2_grpc

from .importing import IMPORT_LIMITS
from .migrations import MIGRATIONS
from .servicer import UserServicer
from .settings import UserSettings
from .store import UserStore

__all__ = ["SERVICE_NAME", "create_server"]

SERVICE_NAME = "user.UserService"


def create_server(settings: UserSettings) -> GrpcApp:
    """A ready-to-start server bound to its port (read `.port`; port 0 picks a free one)."""
    db = Database(settings.database, application_name="parley-user")

    async def postgres_ready() -> None:
        async with db.connection() as conn:
            await MIGRATIONS.require_current(conn)

    app = GrpcApp(
        settings.server,
        services=[user_pb2.DESCRIPTOR.services_by_name["UserService"]],
        verifier=TokenVerifier(settings.auth),
        checks=[DependencyCheck("postgres", postgres_ready)],
    )
    user_pb2_grpc.add_UserServiceServicer_to_server(
        UserServicer(UserStore(db), settings.imports), app.server
    )
    app.metrics.initialize_limits(IMPORT_LIMITS)
    db.register_metrics(app.metrics.registry)
    app.on_start(db.open)
    app.on_stop(db.close)
    return app
