"""TokenVerifier remembers verified tokens: no second signature check, exp still enforced."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from parley.chassis import AuthSettings, TokenVerifier
from parley.chassis.errors import Unauthenticated
from parley.testing import make_token

SECRET = "token-cache-test-secret-" + "s" * 32


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def settings(leeway: float = 0.0) -> AuthSettings:
    return AuthSettings(
        algorithm="HS256", issuer="parley", audience="parley", leeway=leeway, secret=SECRET
    )


def token(sub: str = "42", *, ttl: int = 600, key: str = SECRET, **claims: Any) -> str:
    scope = claims.pop("scope", "users:read")
    return make_token(key, sub, scope=scope, ttl=ttl, **claims)


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tokens jwt.decode (parsing and signature verification) was called with."""
    calls: list[str] = []
    real_decode = jwt.decode

    def counting(token: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(token)
        return real_decode(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    return calls


def test_a_cache_hit_skips_signature_verification(decodes: list[str]):
    verifier = TokenVerifier(settings())
    alice, bob = token("alice", scope="users:write"), token("bob")
    first = verifier.verify(alice)
    assert first.subject == "alice" and first.scopes == {"users:write"}
    assert verifier.verify(alice) == first
    assert verifier.verify(alice) == first
    assert verifier.verify(bob).subject == "bob"
    assert decodes == [alice, bob]


@pytest.mark.parametrize("leeway", [0.0, 30.0])
def test_a_cached_token_is_rejected_from_its_exp(decodes: list[str], leeway: float):
    clock = Clock()
    verifier = TokenVerifier(settings(leeway), clock=clock)
    cached = token(ttl=60)
    exp = jwt.decode(cached, options={"verify_signature": False})["exp"]
    decodes.clear()
    verifier.verify(cached)
    clock.now = exp + leeway - 0.5
    assert verifier.verify(cached).subject == "42"
    clock.now = exp + leeway
    with pytest.raises(Unauthenticated) as info:
        verifier.verify(cached)
    assert info.value.reason == "TOKEN_EXPIRED"
    assert decodes == [cached]  # both checks came from the cache
    # Dropped from the cache: the next call checks the token in full again (with PyJWT's
    # own clock, for which this token is still valid).
    verifier.verify(cached)
    assert decodes == [cached, cached]


def test_a_cached_token_is_rejected_before_its_nbf(decodes: list[str]):
    clock = Clock()
    verifier = TokenVerifier(settings(), clock=clock)
    now = int(clock.now)
    cached = token(nbf=now)
    verifier.verify(cached)
    clock.now = now - 1  # the clock went back
    with pytest.raises(Unauthenticated) as info:
        verifier.verify(cached)
    assert info.value.reason == "TOKEN_NOT_YET_VALID"
    clock.now = now
    assert verifier.verify(cached).subject == "42"
    assert decodes == [cached]


def test_rejected_tokens_are_never_cached(decodes: list[str]):
    verifier = TokenVerifier(settings())
    forged = token(key="another-secret-that-is-long-enough-0123")
    expired = token(ttl=-60)
    for bad in [forged, forged, expired, expired]:
        with pytest.raises(Unauthenticated):
            verifier.verify(bad)
    assert decodes == [forged, forged, expired, expired]


def test_the_cache_is_bounded_and_evicts_the_least_recently_used(decodes: list[str]):
    verifier = TokenVerifier(settings(), cache_size=2)
    a, b, c = token("a"), token("b"), token("c")
    verifier.verify(a)
    verifier.verify(b)
    verifier.verify(a)  # a is now the most recently used
    verifier.verify(c)  # evicts b
    assert decodes == [a, b, c]
    verifier.verify(a)
    verifier.verify(c)
    assert decodes == [a, b, c]
    verifier.verify(b)
    assert decodes == [a, b, c, b]


def test_cache_size_zero_verifies_every_time(decodes: list[str]):
    verifier = TokenVerifier(settings(), cache_size=0)
    same = token()
    verifier.verify(same)
    verifier.verify(same)
    assert decodes == [same, same]
    with pytest.raises(ValueError):
        TokenVerifier(settings(), cache_size=-1)


@pytest.mark.parametrize("leeway", [0.0, 30.0])
def test_the_identity_carries_its_token_and_when_it_stops_being_accepted(leeway: float):
    verifier = TokenVerifier(settings(leeway))
    issued = token(ttl=60)
    exp = jwt.decode(issued, options={"verify_signature": False})["exp"]
    identity = verifier.verify(issued)
    assert identity.token == issued and identity.valid_until == exp + leeway
    assert issued not in repr(identity)
    assert verifier.verify(issued).valid_until == exp + leeway  # the cached one too
