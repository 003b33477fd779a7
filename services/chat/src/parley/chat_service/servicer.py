"""ChatService: StreamChat is served from its own release; until then it says so clearly."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from parley.proto import chat_pb2, chat_pb2_grpc

__all__ = ["ChatServicer"]


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    async def StreamChat(
        self,
        request_iterator: AsyncIterator[chat_pb2.ChatMessage],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[chat_pb2.ChatMessage]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "StreamChat is not implemented yet")
        yield chat_pb2.ChatMessage()  # never reached; makes this a server-streaming generator
