"""Who may see a user's email: the user, and callers with the users:read or users:write scope.

Everyone else gets the User with its `email` left empty and every other field unchanged.
Every RPC that returns users passes each one through the redactor of its caller, so the
rule lives here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable

from parley.chassis import Identity, current_identity
from parley.proto import user_pb2

__all__ = ["EMAIL_SCOPES", "READ_SCOPE", "WRITE_SCOPE", "Redactor", "redact_for_caller", "redactor"]

READ_SCOPE = "users:read"
WRITE_SCOPE = "users:write"
# A token with any of these scopes sees every user's email.
EMAIL_SCOPES = frozenset({READ_SCOPE, WRITE_SCOPE})

# Takes a User built for this response and returns it, its email cleared if the caller may
# not see it. The User is changed in place: pass only messages made for this one response.
Redactor = Callable[[user_pb2.User], user_pb2.User]


def _unchanged(user: user_pb2.User) -> user_pb2.User:
    return user


def _own_user_id(identity: Identity) -> int | None:
    """The user id the token's subject names, as chat reads it (Identity.user_id), or None."""
    try:
        return identity.user_id
    except ValueError:  # digits past Python's int-parsing limit: no user has that id
        return None


def redactor(identity: Identity) -> Redactor:
    """The redactor for one caller; decided once, so a streamed page costs a compare per user."""
    if not identity.scopes.isdisjoint(EMAIL_SCOPES):
        return _unchanged
    own_id = _own_user_id(identity)

    def redact(user: user_pb2.User) -> user_pb2.User:
        if user.id != own_id:
            user.ClearField("email")
        return user

    return redact


def redact_for_caller(user: user_pb2.User) -> user_pb2.User:
    """`user` as the caller of the RPC being handled may see it (see `redactor`)."""
    return redactor(current_identity())(user)
