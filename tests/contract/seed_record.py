"""The seed tutorial's wire contract, written down by hand from its user.proto and chat.proto.

A client generated from the tutorial must keep working against Parley, so these facts may never
change: packages, services, methods with their message types and streaming, and every message's
fields with number, name and type. Parley may only add to them (new methods, new messages, new
fields numbered above the highest here). `test_seed_compatibility.py` checks proto/ against this
record on every clone, and checks the record against the seed itself where `../shared/seed`
sits next to the repository.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Rpc:
    """A method: its request and response messages by full name, and which side streams."""

    input: str
    output: str
    client_streaming: bool = False
    server_streaming: bool = False


@dataclass(frozen=True)
class Field:
    """A field: a scalar type (`int32`, `string`, ...) or a message's full name."""

    name: str
    type: str
    repeated: bool = False


@dataclass(frozen=True)
class ProtoFile:
    package: str
    services: dict[str, dict[str, Rpc]] = field(default_factory=dict)
    # Message name (nested ones as `Outer.Inner`) -> field number -> field.
    messages: dict[str, dict[int, Field]] = field(default_factory=dict)


Contract = dict[str, ProtoFile]

SEED: Contract = {
    "user.proto": ProtoFile(
        package="user",
        services={
            "UserService": {
                "GetUser": Rpc("user.GetUserRequest", "user.GetUserResponse"),
                "ListUsers": Rpc("user.ListUsersRequest", "user.User", server_streaming=True),
                "CreateUser": Rpc("user.CreateUserRequest", "user.CreateUserResponse"),
            }
        },
        messages={
            "GetUserRequest": {1: Field("id", "int32")},
            "GetUserResponse": {1: Field("user", "user.User")},
            "User": {
                1: Field("id", "int32"),
                2: Field("name", "string"),
                3: Field("email", "string"),
                4: Field("age", "int32"),
            },
            "ListUsersRequest": {1: Field("page", "int32"), 2: Field("page_size", "int32")},
            "CreateUserRequest": {
                1: Field("name", "string"),
                2: Field("email", "string"),
                3: Field("age", "int32"),
            },
            "CreateUserResponse": {1: Field("user", "user.User"), 2: Field("success", "bool")},
        },
    ),
    "chat.proto": ProtoFile(
        package="chat",
        services={
            "ChatService": {
                "StreamChat": Rpc(
                    "chat.ChatMessage",
                    "chat.ChatMessage",
                    client_streaming=True,
                    server_streaming=True,
                ),
            }
        },
        messages={"ChatMessage": {1: Field("user", "string"), 2: Field("text", "string")}},
    ),
}
