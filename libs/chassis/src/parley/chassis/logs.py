"""Logging: one line per event, plain or JSON, tagged with the current request id."""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from typing import Any

__all__ = ["configure_logging", "request_id_var"]

request_id_var: ContextVar[str] = ContextVar("parley_request_id", default="-")

_RESERVED = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "request_id"}


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class _PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {k: v for k, v in record.__dict__.items() if k not in _RESERVED}
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        # One event, one line: fold tracebacks and multi-line messages.
        return line.replace("\n", " | ")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        event.update({k: v for k, v in record.__dict__.items() if k not in _RESERVED})
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, default=str)


def configure_logging(fmt: str = "plain", level: str = "INFO") -> None:
    """Send every log record to stderr, one line each, in `plain` or `json` format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _PlainFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
