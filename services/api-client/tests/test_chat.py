"""ChatClient and AsyncChatClient against the real ChatService: history, presence, posting."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from parley.client import AsyncChatClient, ChatClient, HealthStatus, Unavailable
from parley.client.chat import check_text
from parley.testing import wait_until

if TYPE_CHECKING:
    from conftest import Person, RunningStack


def test_post_and_read_history(
    stack: RunningStack, person: Callable[[str], Person], room: str
) -> None:
    ada = person("Ada")
    with ChatClient(stack.chat, token=ada.token) as chat:
        posted = chat.post(room, *(f"m{i}" for i in range(12)))
        assert [m.sequence for m in posted] == list(range(1, 13))
        assert {(m.user_id, m.user, m.room) for m in posted} == {(ada.id, "Ada", room)}

        everything = list(chat.list_messages(room, page_size=5))
        assert [m.text for m in everything] == [f"m{i}" for i in range(12)]
        assert [m.sequence for m in chat.list_messages(room, after=9)] == [10, 11, 12]

        page = chat.list_messages_page(room, after=0, page_size=5)
        assert [m.sequence for m in page.messages] == [1, 2, 3, 4, 5]
        assert page.has_more and page.last_sequence == 12
        older = chat.list_messages_page(room, before=6, page_size=3)
        assert [m.sequence for m in older.messages] == [3, 4, 5] and older.has_more

        assert [m.sequence for m in chat.recent_messages(room, 3)] == [10, 11, 12]
        assert len(chat.recent_messages(room, 100)) == 12
        assert chat.post(room) == []


async def test_async_history_and_presence(
    stack: RunningStack, person: Callable[[str], Person], room: str
) -> None:
    grace = person("Grace")
    async with AsyncChatClient(stack.chat2, token=grace.token) as chat:
        posted = await chat.post(room, "one", "two", "three")
        assert [m.text for m in posted] == ["one", "two", "three"]
        assert [m.sequence async for m in chat.list_messages(room, page_size=2)] == [1, 2, 3]
        assert [m.text for m in await chat.recent_messages(room, 2)] == ["two", "three"]
        assert await chat.last_sequence(room) == 3
        assert await chat.last_sequence(f"{room}-empty") == 0
        newest = await chat.list_messages_page(room, before=4, page_size=1)
        assert [m.text for m in newest.messages] == ["three"] and newest.has_more
        assert await chat.health() is HealthStatus.SERVING

        assert await chat.presence(room) == []
        async with chat.session(room):
            # The stream is listed once the server has checked it into the room, which can
            # come a moment after the session is open.
            async def listed() -> list[tuple[int, str, int]]:
                members = await chat.presence(room)
                return [(m.user_id, m.user, m.stream_count) for m in members]

            await wait_until(listed, 10, "the session's stream in presence")
            assert await listed() == [(grace.id, "Grace", 1)]


def test_sync_presence_of_an_empty_room(
    stack: RunningStack, person: Callable[[str], Person], room: str
) -> None:
    ada = person("Ada")
    with ChatClient(stack.chat, token=ada.token) as chat:
        assert chat.presence(room) == []


def test_chat_health(stack: RunningStack) -> None:
    with ChatClient(stack.chat) as chat:
        assert chat.health() is HealthStatus.SERVING
        assert chat.health("dependency/user-service") is HealthStatus.SERVING


def test_several_targets_are_tried_in_turn(
    stack: RunningStack, person: Callable[[str], Person], room: str, unused_port: int
) -> None:
    ada = person("Ada")
    dead = f"127.0.0.1:{unused_port}"
    with ChatClient(f"{dead},{stack.chat}", token=ada.token) as chat:
        assert chat.target == f"{dead},{stack.chat}"
        # The first target refuses the connection; the call goes on to the second.
        assert chat.presence(room) == []
        # Not idempotent, but it never left the client, so it may go elsewhere as well.
        assert [m.text for m in chat.post(room, "hi")] == ["hi"]
    with ChatClient([dead, dead], token=ada.token) as chat, pytest.raises(Unavailable) as caught:
        chat.presence(room)
    assert dead in caught.value.hint


async def test_a_static_ipv4_list_is_one_round_robin_target(
    stack: RunningStack, person: Callable[[str], Person], room: str, unused_port: int
) -> None:
    ada = person("Ada")
    address = f"ipv4:127.0.0.1:{unused_port},{stack.chat.replace('ipv4:', '')}"
    async with AsyncChatClient(address, token=ada.token) as chat:
        # round_robin skips the address that refuses connections.
        for _ in range(5):
            assert await chat.presence(room) == []
        assert [m.text for m in await chat.post(room, "via round_robin")] == ["via round_robin"]


def test_bad_arguments_fail_early(stack: RunningStack) -> None:
    with pytest.raises(ValueError):
        ChatClient("no-port-here")
    with pytest.raises(ValueError):
        ChatClient(stack.chat, timeout=0)
    with ChatClient(stack.chat) as chat:
        with pytest.raises(ValueError):
            chat.list_messages_page("general", page_size=0)
        with pytest.raises(ValueError):
            chat.post("general", "x" * 5000)


@pytest.mark.parametrize(
    "text", ["ESC \x1b[2J", "OSC 52 \x1b]52;c;aGk=\x07", "CSI \x9b2J", "DEL \x7f", "CR \r"]
)
def test_texts_the_server_refuses_are_refused_before_sending(text: str) -> None:
    """The server ends a stream over a text with control characters; the SDK says so first,
    so a session is not lost to one bad line."""
    with pytest.raises(ValueError, match="control characters other than tab and newline"):
        check_text(text)
    check_text("tabs\tand\nnewlines are fine")
