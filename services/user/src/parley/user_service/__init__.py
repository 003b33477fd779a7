"""Parley UserService: users in Postgres over gRPC."""

from .server import SERVICE_NAME, create_server
from .settings import UserSettings

__all__ = ["SERVICE_NAME", "UserSettings", "create_server"]
