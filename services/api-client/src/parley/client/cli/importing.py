"""Reading the rows of `parley users import` from CSV or JSON Lines, and reporting on them.

Rows are read lazily, as gRPC sends them, so a file of any size streams through one
ImportUsers call. Each row remembers the line of the file it came from, so that the report
names lines a person can find in an editor, not positions in the request stream. A row this
side cannot even turn into a request (an age that is not a number, a line that is not JSON) is
reported the same way as a row the server refused, and is not sent.
"""

from __future__ import annotations

import csv
import enum
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from parley.client import NewUser
from parley.proto import user_pb2

__all__ = ["Format", "ImportReport", "RowError", "RowReader", "count_rows", "format_for"]

_INT32_MAX = 2**31 - 1


class Format(enum.StrEnum):
    """A file format `users import` reads."""

    CSV = "csv"
    JSONL = "jsonl"


_EXTENSIONS = {".csv": Format.CSV, ".jsonl": Format.JSONL, ".ndjson": Format.JSONL}


def format_for(name: str) -> Format | None:
    """The format a file name's extension implies, if any."""
    lowered = name.lower()
    for extension, fmt in _EXTENSIONS.items():
        if lowered.endswith(extension):
            return fmt
    return None


@dataclass(frozen=True)
class RowError:
    """Why one row of the file was not created."""

    line: int
    """The line of the file the row is on (1 is the first line, a CSV header included)."""
    code: str
    """The gRPC status name CreateUser would have returned, e.g. ALREADY_EXISTS."""
    field: str
    """The field at fault (`email`, `name,email`), or empty for the row as a whole."""
    message: str

    def as_json(self) -> dict[str, Any]:
        return {"line": self.line, "code": self.code, "field": self.field, "message": self.message}


class HeaderError(ValueError):
    """The CSV header lacks a required column."""


class RowReader:
    """The rows of one file as `NewUser`s, for `UserClient.import_users`.

    Iterating yields the rows that can be sent; `lines` maps each one's position in the
    request stream to its line in the file, and `errors` collects the rows that could not be
    sent. Iterated from gRPC's sending thread, and read after the call returns.
    """

    def __init__(self, stream: IO[str], fmt: Format) -> None:
        self._stream = stream
        self._format = fmt
        self._csv: csv.DictReader[str] | None = None
        self.lines: list[int] = []
        self.errors: list[RowError] = []

    def check_header(self) -> None:
        """For CSV, read the header now and raise HeaderError if it lacks a column, so that a
        wrong file is a usage error before any call."""
        if self._format is Format.CSV:
            self._csv = csv.DictReader(self._stream)
            columns = {(name or "").strip().lower() for name in self._csv.fieldnames or ()}
            missing = [name for name in ("name", "email") if name not in columns]
            if missing:
                raise HeaderError(
                    f"the CSV header needs the columns name and email (age is optional); "
                    f"missing: {', '.join(missing)}"
                )

    def __iter__(self) -> Iterator[NewUser]:
        rows = self._csv_rows() if self._format is Format.CSV else self._jsonl_rows()
        for line, row in rows:
            self.lines.append(line)
            yield row

    def _bad(self, line: int, field: str, message: str) -> None:
        self.errors.append(RowError(line, "INVALID_ARGUMENT", field, message))

    def _csv_rows(self) -> Iterator[tuple[int, NewUser]]:
        if self._csv is None:
            self.check_header()
        reader = self._csv
        assert reader is not None
        while True:
            try:
                record = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as exc:
                # The rest of the file cannot be read reliably: stop, and say where.
                self._bad(reader.line_num + 1, "", f"unreadable CSV, rows after it not read: {exc}")
                return
            fields = {(k or "").strip().lower(): (v or "").strip() for k, v in record.items()}
            age = _age(fields.get("age", ""))
            if isinstance(age, str):
                self._bad(reader.line_num, "age", age)
                continue
            yield reader.line_num, NewUser(fields.get("name", ""), fields.get("email", ""), age)

    def _jsonl_rows(self) -> Iterator[tuple[int, NewUser]]:
        line = 0
        while True:
            try:
                text = self._stream.readline()
            except UnicodeDecodeError as exc:
                self._bad(line + 1, "", f"unreadable text, rows after it not read: {exc}")
                return
            if not text:
                return
            line += 1
            if not text.strip():
                continue
            row = _json_row(text)
            if isinstance(row, RowError):
                self.errors.append(RowError(line, row.code, row.field, row.message))
                continue
            yield line, row


def _age(value: Any) -> int | str:
    """The age as an int, or why it is not one."""
    if value is None or value == "":
        return 0
    if isinstance(value, bool) or not isinstance(value, int | str):
        return f"must be a whole number, got {value!r}"
    try:
        number = int(value)
    except ValueError:
        return f"must be a whole number, got {value!r}"
    if not -_INT32_MAX <= number <= _INT32_MAX:
        return f"must be between 0 and 150, got {number}"
    return number


def _json_row(text: str) -> NewUser | RowError:
    """One JSON Lines row, or the error to report for it (its line filled in by the caller)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return RowError(0, "INVALID_ARGUMENT", "", f"not valid JSON: {exc.msg}")
    if not isinstance(value, dict):
        return RowError(0, "INVALID_ARGUMENT", "", "each line must be a JSON object")
    for name in ("name", "email"):
        if not isinstance(value.get(name, ""), str):
            return RowError(0, "INVALID_ARGUMENT", name, "must be a string")
    age = _age(value.get("age"))
    if isinstance(age, str):
        return RowError(0, "INVALID_ARGUMENT", "age", age)
    return NewUser(value.get("name", ""), value.get("email", ""), age)


def count_rows(stream: IO[str], fmt: Format) -> int:
    """About how many rows a file has (its non-blank lines, less a CSV header), for the total
    of the progress bar."""
    count = sum(1 for text in stream if text.strip())
    return max(0, count - 1) if fmt is Format.CSV else count


@dataclass
class ImportReport:
    """The outcome of an import: counts, and every failed row by its line in the file."""

    created: int
    failed: int
    errors: list[RowError] = field(default_factory=list)
    unlisted: int = 0
    """Failed rows the server counted but did not list (it lists the first 1000)."""

    @classmethod
    def build(cls, reply: user_pb2.ImportUsersResponse, reader: RowReader) -> ImportReport:
        refused = [
            RowError(_line_of(reader.lines, e.index), e.code, e.field, e.message)
            for e in reply.errors
        ]
        errors = sorted(reader.errors + refused, key=lambda error: error.line)
        failed = reply.failed_count + len(reader.errors)
        return cls(reply.created_count, failed, errors, max(0, failed - len(errors)))

    def as_json(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "failed": self.failed,
            "errors": [error.as_json() for error in self.errors],
        }


def _line_of(lines: list[int], index: int) -> int:
    return lines[index] if 0 <= index < len(lines) else 0
