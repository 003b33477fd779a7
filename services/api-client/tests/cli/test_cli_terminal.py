"""The interactive `parley chat` (and Ctrl-C, and the import progress bar) in real
pseudo-terminals (parley.testing.cli.Terminal) against real chat replicas."""

from __future__ import annotations

import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from parley.client import ChatClient

if TYPE_CHECKING:
    from conftest import ExtraReplica, Person, RunningStack

    from parley.testing.cli import Terminal

Start = Callable[..., "Terminal"]
MESSAGE = r"#(\d+) \d\d:\d\d:\d\d (\S+): ([^\r\n]*?)\s*(?=[\r\n])"


def shown(text: str) -> list[tuple[int, str, str]]:
    """Every message line a terminal printed: (sequence, user, text), in order."""
    return [(int(seq), user, body) for seq, user, body in re.findall(MESSAGE, text)]


def said(message: str, user: str = r"\S+") -> str:
    return rf"#\d+ \d\d:\d\d:\d\d {user}: {re.escape(message)}"


def test_two_terminals_on_two_replicas(
    terminal: Start, stack: RunningStack, person: Callable[[str], Person], room: str
) -> None:
    ada, bob = person("Ada"), person("Bob")
    with ChatClient(stack.chat, token=ada.token) as chat:
        chat.post(room, "from before")
    a = terminal("chat", "--room", room, token=ada.token, chat_addr=stack.chat)
    b = terminal("chat", "-r", room, token=bob.token, chat_addr=stack.chat2)
    a.expect(rf"joined #{room} on {re.escape(stack.chat)}")
    b.expect(rf"joined #{room} on {re.escape(stack.chat2)}")
    a.expect(said("from before", "Ada"))  # history on joining
    b.expect(said("from before", "Ada"))

    a.type("hello from Ada")
    b.expect(said("hello from Ada", "Ada"))
    a.expect(said("hello from Ada", "Ada"))
    b.type("hi Ada, Bob here")
    a.expect(said("hi Ada, Bob here", "Bob"))
    b.expect(said("hi Ada, Bob here", "Bob"))

    a.type("/who")
    a.expect(rf"in #{room}: Ada \({ada.id}\), Bob \({bob.id}\)")
    a.prompt(room)
    b.prompt(room)

    expected = [(1, "Ada", "from before"), (2, "Ada", "hello from Ada"),
                (3, "Bob", "hi Ada, Bob here")]  # fmt: skip
    assert shown(a.text) == expected
    assert shown(b.text) == expected

    a.sendcontrol("d")  # Ctrl-D leaves
    assert a.wait_exit() == 0
    b.sendintr()  # Ctrl-C: quiet, 130
    assert b.wait_exit() == 130
    assert "Traceback" not in a.text + b.text


def test_chat_carries_on_when_its_replica_is_killed(
    terminal: Start,
    stack: RunningStack,
    extra_chat: ExtraReplica,
    person: Callable[[str], Person],
    room: str,
) -> None:
    ada, bob = person("Ada"), person("Bob")
    # Ada's first address is the replica about to die; she goes on with the next one.
    a = terminal("chat", "--room", room, token=ada.token,
                 chat_addr=f"{extra_chat.address},{stack.chat}")  # fmt: skip
    b = terminal("chat", "--room", room, token=bob.token, chat_addr=stack.chat2)
    a.expect(rf"joined #{room} on {re.escape(extra_chat.address)}")
    b.expect(rf"joined #{room} on {re.escape(stack.chat2)}")
    b.type("before the kill")
    a.expect(said("before the kill", "Bob"))
    a.prompt(room)

    # Frozen first, so that what follows certainly happens while Ada's replica is away: her
    # own line goes into a connection that never answers, the others' messages are stored
    # without reaching her.
    extra_chat.process.send(signal.SIGSTOP)
    a.type("typed around the kill")
    a.expect(rf"{re.escape(room)} \(1 sending\)>")
    with ChatClient(stack.chat2, token=bob.token) as chat:
        chat.post(room, "while away 1", "while away 2", "while away 3")
    b.expect(said("while away 3", "Bob"))
    assert "while away" not in a.text

    extra_chat.kill()
    a.expect(rf"connection to {re.escape(extra_chat.address)} lost \(UNAVAILABLE\); reconnecting")
    a.expect(rf"reconnected to {re.escape(stack.chat)}")
    b.expect(said("typed around the kill", "Ada"))
    b.prompt(room)
    b.type("after the kill")
    a.expect(said("after the kill", "Bob"))
    b.expect(said("after the kill", "Bob"))

    messages = shown(a.text)
    assert messages == [
        (1, "Bob", "before the kill"),
        (2, "Bob", "while away 1"),
        (3, "Bob", "while away 2"),
        (4, "Bob", "while away 3"),
        (5, "Ada", "typed around the kill"),
        (6, "Bob", "after the kill"),
    ], "no gap, no duplicate, in order; her own line once"
    assert shown(b.text) == messages, "both saw the same room"
    notices = re.findall(r"· (connection to .*|reconnected .*)", a.text)
    assert len(notices) == 2, notices  # one line each way, however many attempts
    assert "Traceback" not in a.text

    a.prompt(room)
    a.sendcontrol("d")
    assert a.wait_exit() == 0


def test_ctrl_c_stops_tail_quietly(
    terminal: Start, stack: RunningStack, person: Callable[[str], Person], room: str
) -> None:
    ada = person("Ada")
    with ChatClient(stack.chat, token=ada.token) as chat:
        chat.post(room, "one")
    tail = terminal("chat", "tail", "--room", room, "--after", "0", token=ada.token)
    tail.expect(said("one", "Ada"))
    tail.sendintr()
    assert tail.wait_exit() == 130
    assert "Traceback" not in tail.text and "Aborted" not in tail.text


def test_import_shows_progress_on_a_terminal(
    terminal: Start, stack: RunningStack, tmp_path: Path, email: Callable[[str], str]
) -> None:
    rows = "\n".join(f"Row {i},{email('progress')},{i}" for i in range(50))
    path = tmp_path / "people.csv"
    path.write_text(f"name,email,age\n{rows}\n")
    run = terminal("users", "import", str(path), token=stack.admin_token)
    run.expect(r"importing")
    run.expect(r"created 50 users, 0 rows failed")
    assert run.wait_exit() == 0


def test_chat_needs_a_terminal(parley: Any, person: Callable[[str], Person]) -> None:
    ran = parley("chat", token=person("Ada").token)
    assert ran.code == 2, ran
    assert "the interactive chat needs a terminal" in ran.stderr
