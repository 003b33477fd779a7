"""Who may do what to a room: the expected status of every (visibility, call, role).

One table for the in-process suite (services/chat/tests/test_room_access.py) and the
end-to-end one (tests/e2e/test_rooms.py), which each run every cell against a fresh room of
their own. A call is named by its RPC, with what it does in brackets where one RPC is tried
two ways. The roles: a caller who is not a member, a member, the room's owner, and a
`chat:admin` caller who is not a member.
"""

from __future__ import annotations

import grpc

__all__ = ["CALL_NAMES", "MATRIX", "ROLES", "VISIBILITIES", "uncovered_rpcs"]

OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION

ROLES = ("stranger", "member", "owner", "admin")
VISIBILITIES = ("public", "private")
READS = (
    "StreamChat",
    "ListRooms (sees it)",
    "ListMessages",
    "ListPresence",
    "ListMembers",
    "GetRoom",
)
CALL_NAMES = (
    *READS,
    "UpdateRoom",
    "DeleteRoom",
    "AddMember",
    "RemoveMember (the member)",
    "RemoveMember (leave)",
)
# Not in the table: CreateRoom (no room yet) and OpenDirectRoom (no owner); each suite tests
# them on their own.
ELSEWHERE = ("CreateRoom", "OpenDirectRoom")

_READ = {"stranger": OK, "member": OK, "owner": OK, "admin": OK}
_READ_PRIVATE = {"stranger": DENIED, "member": OK, "owner": OK, "admin": DENIED}
_OWNER_ONLY = {"stranger": DENIED, "member": DENIED, "owner": OK, "admin": DENIED}
_MANAGE = {"stranger": DENIED, "member": DENIED, "owner": OK, "admin": OK}

# Leaving: the owner cannot (it deletes the room instead); a non-member of a public room
# leaves nothing, which is fine; a non-member of a private room learns nothing about it.
MATRIX: dict[tuple[str, str], dict[str, grpc.StatusCode]] = {
    **{("public", call): _READ for call in READS},
    **{("private", call): _READ_PRIVATE for call in READS},
    **{(v, "UpdateRoom"): _OWNER_ONLY for v in VISIBILITIES},
    **{(v, "DeleteRoom"): _OWNER_ONLY for v in VISIBILITIES},
    **{(v, "AddMember"): _MANAGE for v in VISIBILITIES},
    # The member removing the member is the member leaving.
    **{(v, "RemoveMember (the member)"): {**_MANAGE, "member": OK} for v in VISIBILITIES},
    ("public", "RemoveMember (leave)"): {
        "stranger": OK,
        "member": OK,
        "owner": PRECONDITION,
        "admin": OK,
    },
    ("private", "RemoveMember (leave)"): {
        "stranger": DENIED,
        "member": OK,
        "owner": PRECONDITION,
        "admin": OK,
    },
}


def uncovered_rpcs(service_methods: set[str]) -> set[str]:
    """The RPCs of ChatService that neither the table nor ELSEWHERE covers, and names in
    either that ChatService does not have (empty when the table is complete)."""
    covered = {name.split()[0] for name in CALL_NAMES} | set(ELSEWHERE)
    return service_methods ^ covered
