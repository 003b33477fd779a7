"""Builds the ChatService gRPC server on the chassis."""

from __future__ import annotations

import redis.asyncio as redis

from parley.chassis import Database, DependencyCheck, GrpcApp, TokenVerifier
from parley.proto import chat_pb2, chat_pb2_grpc

from .servicer import ChatServicer
from .settings import ChatSettings

__all__ = ["SERVICE_NAME", "create_server"]

SERVICE_NAME = "chat.ChatService"


def create_server(settings: ChatSettings) -> GrpcApp:
    """A ready-to-start server bound to its port (read `.port`; port 0 picks a free one)."""
    db = Database(settings.database, application_name="parley-chat")
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=5)

    async def redis_ready() -> None:
        await client.ping()

    app = GrpcApp(
        settings.server,
        services=[chat_pb2.DESCRIPTOR.services_by_name["ChatService"]],
        verifier=TokenVerifier(settings.auth),
        checks=[DependencyCheck("postgres", db.probe), DependencyCheck("redis", redis_ready)],
    )
    chat_pb2_grpc.add_ChatServiceServicer_to_server(ChatServicer(), app.server)
    db.register_metrics(app.metrics.registry)
    app.on_start(db.open)
    app.on_stop(db.close)
    app.on_stop(client.aclose)
    return app
