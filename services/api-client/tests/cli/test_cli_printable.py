"""`printable`, `safe_text` and `json_line`: what the command line does to text from servers
before a terminal sees it, and the displays built on them. No server needed."""

from __future__ import annotations

import io
import json
import re
import unicodedata
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console
from rich.errors import MarkupError
from rich.table import Table

from parley.client import Unauthenticated
from parley.client.cli.context import Output, Settings
from parley.client.cli.errors import describe
from parley.client.cli.health import Check, health_table
from parley.client.cli.importing import ImportReport, RowError
from parley.client.cli.output import (
    json_line,
    message_line,
    printable,
    safe_text,
    users_table,
)
from parley.client.cli.users import _print_report
from parley.proto import chat_pb2, user_pb2

BIDI_CONTROLS = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
HOSTILE = "a\x1b[2J\x1b]52;c;aGVsbG8=\x07\x9b31m\r\x08\n#2 Bob: [bold]x[/] [/oops] :smile:\u202e"
SHOWN = r"a\x1b[2J\x1b]52;c;aGVsbG8=\x07\x9b31m\r\x08\n#2 Bob: [bold]x[/] [/oops] :smile:\u202e"


def drives_the_terminal(ch: str) -> bool:
    """C0, DEL and C1 (Cc), lone surrogates, bidi controls, line and paragraph separators."""
    category = unicodedata.category(ch)
    return category in ("Cc", "Cs", "Zl", "Zp") or ch in BIDI_CONTROLS


_ESCAPE = re.compile(r"\\(?:x([0-9a-f]{2})|u([0-9a-f]{4})|([ntr]))")


def unescape(text: str) -> str:
    """Read `printable`'s escapes back, as a person would."""

    def one(match: re.Match[str]) -> str:
        hex_code = match[1] or match[2]
        return chr(int(hex_code, 16)) if hex_code else {"n": "\n", "t": "\t", "r": "\r"}[match[3]]

    return _ESCAPE.sub(one, text)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("clear\x1b[2J", r"clear\x1b[2J"),
        ("\x1b]52;c;aGVsbG8=\x07", r"\x1b]52;c;aGVsbG8=\x07"),
        ("\x9b31m", r"\x9b31m"),
        ("a\nb\tc\rd", r"a\nb\tc\rd"),
        ("\x00\x08\x7f\x85\x9f", r"\x00\x08\x7f\x85\x9f"),
        ("Eve\u202eexe.txt\u2066", r"Eve\u202eexe.txt\u2066"),
        ("one\u2028two", r"one\u2028two"),
        ("\ud800", r"\ud800"),
    ],
)
def test_printable_escapes(text: str, shown: str) -> None:
    assert printable(text) == shown


@pytest.mark.parametrize(
    "text",
    [
        "hello, world",
        "Ada Lovelace <ada@example.com>",
        "héllo ÿ ß",  # Latin-1 letters above the C1 block
        "👨\u200d👩\u200d👧 family, a\u00adb soft hyphen",  # joiners and soft hyphens are text
        "עברית \u200f mark, العربية, 中文, русский",
        r"C:\Users\ada and a spelled-out \x1b",
        "[bold]markup[/] is only text here",
    ],
)
def test_printable_leaves_text_alone(text: str) -> None:
    assert printable(text) == text


# Every code point, lone surrogates included, with the interesting ones often.
any_text = st.text(
    st.one_of(
        st.characters(exclude_categories=()),
        st.sampled_from("\x1b\x9b\x07\x08\r\n\t\x7f\x85\u2028\u2029" + BIDI_CONTROLS),
    )
)


@given(any_text)
def test_printable_output_drives_nothing(text: str) -> None:
    shown = printable(text)
    assert not any(drives_the_terminal(ch) for ch in shown)
    shown.encode("utf-8")  # every character can be written to a UTF-8 terminal
    assert printable(shown) == shown


@given(any_text.filter(lambda text: "\\" not in text))
def test_printable_reads_back(text: str) -> None:
    """Each escape names exactly the character it replaced."""
    assert unescape(printable(text)) == text
    if not any(drives_the_terminal(ch) for ch in text):
        assert printable(text) == text


@given(st.dictionaries(any_text, st.one_of(any_text, st.integers(), st.none()), max_size=5))
def test_json_line_keeps_values_and_escapes_controls(value: dict[str, Any]) -> None:
    line = json_line(value)
    assert not any(drives_the_terminal(ch) for ch in line)
    assert json.loads(line) == value


def render(renderable: Any) -> str:
    """What rich writes for `renderable` to a colour terminal."""
    out = io.StringIO()
    Console(file=out, force_terminal=True, color_system="standard", width=400).print(renderable)
    return out.getvalue()


def assert_shown_safely(output: str, shown: str) -> None:
    without_colours = re.sub(r"\x1b\[[0-9;]*m", "", output)
    assert not any(drives_the_terminal(ch) for ch in without_colours.replace("\n", ""))
    assert shown in without_colours


def test_safe_text_is_not_markup() -> None:
    assert_shown_safely(render(safe_text(HOSTILE)), SHOWN)


def test_chat_line() -> None:
    message = chat_pb2.ChatMessage(sequence=7, user_id=3, user="Mal\x1b[31m", text=HOSTILE)
    assert_shown_safely(render(message_line(message)), rf"#7 Mal\x1b[31m: {SHOWN}")


def test_users_table() -> None:
    user = user_pb2.User(id=3, name=HOSTILE, email="e\x9b@example.com", age=30)
    output = render(users_table([user]))
    assert_shown_safely(output, SHOWN)
    assert_shown_safely(output, r"e\x9b@example.com")


def test_health_table() -> None:
    check = Check("UserService", "127.0.0.1:1", "", "UNAVAILABLE", HOSTILE)
    assert_shown_safely(render(health_table([check])), SHOWN)


def test_import_report(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # no cell folds
    report = ImportReport(0, 1, [RowError(2, "ALREADY_EXISTS", "email\x1b[2J", HOSTILE)])
    _print_report(Settings(), report)
    output = capsys.readouterr().out
    assert_shown_safely(output, SHOWN)
    assert_shown_safely(output, r"email\x1b[2J")
    _print_report(Settings(output=Output.JSON), report)
    line = capsys.readouterr().out
    assert_shown_safely(line, r"\u001b[2J")
    assert json.loads(line)["errors"][0]["message"] == HOSTILE


def test_error_line() -> None:
    error = Unauthenticated(
        f"invalid token: {HOSTILE}", target="u:1", method="/user.UserService/ListUsers"
    )
    line = describe(error, timeout=10, token_given=True)
    assert line.startswith(f"parley: UNAUTHENTICATED: invalid token: {SHOWN} - try: ")
    assert not any(drives_the_terminal(ch) for ch in line)


def test_table_cells_are_not_read_as_markup() -> None:
    """Why `safe_text`: rich reads a `str` cell as markup, and a stray closing tag fails."""
    table = Table()
    table.add_column("Text")
    table.add_row("[/oops]")
    with pytest.raises(MarkupError, match="closing tag"):
        render(table)
