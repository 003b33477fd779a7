"""The chat component's migrations (files in `migrations/`), applied by `parley-chat migrate`."""

from __future__ import annotations

from parley.chassis.migrations import MigrationSet

__all__ = ["COMPONENT", "MIGRATIONS"]

COMPONENT = "chat"
MIGRATIONS = MigrationSet(COMPONENT, "parley.chat_service")
