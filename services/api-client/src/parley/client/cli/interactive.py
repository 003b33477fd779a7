"""The interactive `parley chat`: a prompt at the bottom, the room's messages above it.

prompt_toolkit draws the prompt; `patch_stdout` and `print_formatted_text` print messages and
notices above it without mangling what is being typed. The `ChatSession` of the SDK does the
hard part: it reconnects, resumes after the last message shown (nothing missed or shown twice)
and resends what the server had not acknowledged. A typed line is sent at once; it shows up
when the server's echo comes back with its sequence number, and until then the prompt counts
it as sending.
"""

from __future__ import annotations

import asyncio
import contextlib

from prompt_toolkit import PromptSession
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.patch_stdout import patch_stdout
from prompt_toolkit.shortcuts import print_formatted_text
from prompt_toolkit.styles import Style

from parley.client import ChatSession, ParleyError
from parley.client.chat import AsyncChatClient, check_text
from parley.client.cli.chat_connection import async_chat_client, gap_notices, reconnect_notices
from parley.client.cli.context import Settings
from parley.client.cli.output import message_parts, printable
from parley.proto import chat_pb2

__all__ = ["run_chat"]

_STYLE = Style.from_dict(
    {
        "seq": "ansibrightblack",
        "time": "ansibrightblack",
        "user": "bold",
        "text": "",
        "notice": "ansibrightblack italic",
        "prompt": "bold",
    }
)

_HELP = "type a message and press Enter; /who lists who is here; /quit or Ctrl-D leaves"


def _print_notice(text: str) -> None:
    # FormattedText is never read as HTML or ANSI, but only its ESC would not reach the
    # terminal (prompt_toolkit writes "?"): C1, CR, BS would. message_parts escapes messages.
    print_formatted_text(FormattedText([("class:notice", f"· {printable(text)}")]), style=_STYLE)


def _print_message(message: chat_pb2.ChatMessage) -> None:
    parts = [(f"class:{style}", text) for style, text in message_parts(message) if text]
    print_formatted_text(FormattedText(parts), style=_STYLE)


class _Room:
    """The running chat: the session, the prompt, and what each typed line does."""

    def __init__(
        self, client: AsyncChatClient, session: ChatSession, prompt: PromptSession[str]
    ) -> None:
        self.client = client
        self.session = session
        self.prompt = prompt
        self.failure: ParleyError | None = None

    def prompt_text(self) -> FormattedText:
        sending = len(self.session.pending)
        waiting = f" ({sending} sending)" if sending else ""
        return FormattedText([("class:prompt", f"{self.session.room}{waiting}> ")])

    async def receive(self) -> None:
        """Print every message of the room; on the session's failure, stop the prompt."""
        try:
            async for message in self.session:
                _print_message(message)
                self.prompt.app.invalidate()  # the prompt's count of messages sending
        except ParleyError as error:
            # The session ended for good (e.g. PERMISSION_DENIED: our membership of a private
            # room was removed): stop the prompt, and `run` raises the error. The prompt may be
            # between two lines (a line being handled, or the next prompt starting), so keep
            # trying until it runs; `run_chat` cancels this task once `run` has returned.
            self.failure = error
            while True:
                app = self.prompt.app
                if app.is_running and app.future is not None and not app.future.done():
                    app.exit(exception=error)
                    return
                await asyncio.sleep(0.05)

    async def handle(self, line: str) -> bool:
        """Act on one typed line; False to leave."""
        text = line.strip()
        if not text:
            return True
        if text in ("/quit", "/exit"):
            return False
        if text == "/who":
            try:
                members = await self.client.presence(self.session.room)
            except ParleyError as error:  # presence is an extra: the chat goes on without it
                _print_notice(f"/who failed: {error.code.name}: {error.message}")
                return True
            names = ", ".join(f"{m.user} ({m.user_id})" for m in members) or "nobody"
            _print_notice(f"in #{self.session.room}: {names}")
            return True
        if text in ("/help", "/?"):
            _print_notice(_HELP)
            return True
        try:
            check_text(line)
        except ValueError as exc:
            _print_notice(f"not sent: {exc}")
            return True
        await self.session.send(line)
        return True

    async def run(self) -> None:
        while self.failure is None:
            try:
                line = await self.prompt.prompt_async(self.prompt_text)
            except EOFError:  # Ctrl-D
                return
            if self.failure is not None:
                break
            if not await self.handle(line):
                return
        raise self.failure


async def run_chat(settings: Settings, room: str, history: int) -> None:
    """Join `room` showing its last `history` messages, and chat until Ctrl-D or /quit.

    Raises the session's error when it ends (a refused token, a room name the server does not
    accept, no replica reachable for the policy's give-up time); Ctrl-C raises
    KeyboardInterrupt.
    """
    on_state = reconnect_notices(_print_notice)
    async with (
        async_chat_client(settings) as client,
        client.session(
            room, history=history, on_state=on_state, on_gap=gap_notices(_print_notice)
        ) as session,
    ):
        _print_notice(f"joined #{room} on {session.target}: {_HELP}")
        with patch_stdout(raw=True):
            prompt: PromptSession[str] = PromptSession(erase_when_done=True, style=_STYLE)
            chat = _Room(client, session, prompt)
            receiver = asyncio.create_task(chat.receive(), name="parley-chat-receive")
            try:
                await chat.run()
            finally:
                receiver.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await receiver
