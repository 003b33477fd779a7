"""Logging: one line per event, plain or JSON, tagged with the current request id and, when
tracing is on and there is a span, its `trace_id` and `span_id`."""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

from parley.chassis import tracing

__all__ = ["configure_logging", "request_id_var"]

request_id_var: ContextVar[str] = ContextVar("parley_request_id", default="-")

_RESERVED = set(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "request_id",
    "trace_id",
    "span_id",
}


class _SecondCache:
    """A record's time formatted to the second, reformatted only when the second changes."""

    __slots__ = ("_fmt", "_second", "_text")

    def __init__(self, fmt: str) -> None:
        self._fmt = fmt
        self._second = -1
        self._text = ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._text = time.strftime(self._fmt, time.localtime(second))
            self._second = second
        return self._text


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    """The `extra=` fields of a record, in the order they were given."""
    attributes = record.__dict__
    if attributes.keys() <= _RESERVED:
        return {}
    return {k: v for k, v in attributes.items() if k not in _RESERVED}


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        ids = tracing.current_ids() if tracing.active() else None
        if ids is not None:
            record.trace_id, record.span_id = ids
        return True


def _trace_fields(record: logging.LogRecord) -> str:
    trace_id = getattr(record, "trace_id", None)
    if trace_id is None:
        return ""
    return f" trace_id={trace_id} span_id={getattr(record, 'span_id', '')}"


class _PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        self._seconds = _SecondCache(self.default_time_format)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return f"{self._seconds(record.created)},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        line += _trace_fields(record)
        # One event, one line: fold tracebacks and multi-line messages.
        return line.replace("\n", " | ")


class _JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._seconds = _SecondCache("%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "time": self._seconds(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        trace_id = getattr(record, "trace_id", None)
        if trace_id is not None:
            event["trace_id"] = trace_id
            event["span_id"] = getattr(record, "span_id", "")
        event.update(_extras(record))
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
    # No format shows the thread, the process or the caller's source line; not collecting
    # them saves a few microseconds per record (the logging HOWTO's "Optimization").
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
