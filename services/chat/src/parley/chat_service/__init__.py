"""Parley ChatService: chat rooms over a bidirectional gRPC stream."""

from .server import SERVICE_NAME, create_server
from .settings import ChatSettings

__all__ = ["SERVICE_NAME", "ChatSettings", "create_server"]
