"""Bearer-token authentication: JWT verification and the server interceptor that requires it."""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jwt

from parley.chassis._handlers import CallScope, WrappingInterceptor, wrap_handler
from parley.chassis.config import ConfigError, Env
from parley.chassis.errors import PermissionDenied, Unauthenticated
from parley.chassis.sample_secrets import SAMPLE_SECRET_PROBLEM, is_sample_secret

__all__ = [
    "PUBLIC_SERVICES",
    "AuthInterceptor",
    "DEFAULT_CACHE_SIZE",
    "AuthSettings",
    "Identity",
    "TokenVerifier",
    "current_identity",
    "require_scope",
]

# Probes and tooling must work without a token.
PUBLIC_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)


@dataclass(frozen=True)
class Identity:
    """Who is calling: the token's subject (a user id) and its scopes; and the token itself,
    with the time it stops being accepted, for what outlives the call's start (a stream)."""

    subject: str
    scopes: frozenset[str]
    token: str = field(default="", repr=False, compare=False)
    """The bearer token, for calls made on the caller's behalf (never logged)."""
    valid_until: float = 0.0
    """Seconds since the epoch from which the token is refused: its exp plus the clock-skew
    leeway (0: not known)."""

    @property
    def user_id(self) -> int | None:
        subject = self.subject
        return int(subject) if subject.isascii() and subject.isdigit() else None


_identity_var: ContextVar[Identity | None] = ContextVar("parley_identity", default=None)


def current_identity() -> Identity:
    """The caller of the RPC being handled; only valid inside an authenticated handler."""
    identity = _identity_var.get()
    if identity is None:
        raise Unauthenticated("no authenticated caller for this call")
    return identity


def require_scope(scope: str) -> Identity:
    """The caller's identity, or PERMISSION_DENIED when the token lacks `scope`."""
    identity = current_identity()
    if scope not in identity.scopes:
        raise PermissionDenied(
            f"this call needs the {scope!r} scope, which the token does not grant",
            reason="MISSING_SCOPE",
            metadata={"scope": scope},
        )
    return identity


@dataclass(frozen=True)
class AuthSettings:
    """How tokens are checked: HS256 with a shared secret, or RS256 with a public key or JWKS."""

    algorithm: str
    issuer: str
    audience: str
    leeway: float
    secret: str | None = None
    public_key: str | None = None
    jwks: jwt.PyJWKSet | None = None

    @classmethod
    def from_env(cls, env: Env) -> AuthSettings:
        algorithm = env.choice("PARLEY_JWT_ALGORITHM", "HS256", ("HS256", "RS256"))
        common: dict[str, Any] = {
            "algorithm": algorithm,
            "issuer": env.string("PARLEY_JWT_ISSUER", "parley"),
            "audience": env.string("PARLEY_JWT_AUDIENCE", "parley"),
            "leeway": env.seconds("PARLEY_JWT_LEEWAY", 30.0, maximum=600),
        }
        if algorithm == "HS256":
            secret = env.string("PARLEY_JWT_SECRET")
            if len(secret.encode()) < 32:
                raise ConfigError("PARLEY_JWT_SECRET", "must be at least 32 bytes long for HS256")
            if is_sample_secret(secret):
                raise ConfigError("PARLEY_JWT_SECRET", SAMPLE_SECRET_PROBLEM)
            return cls(secret=secret, **common)
        key_file = env.optional("PARLEY_JWT_PUBLIC_KEY_FILE")
        jwks_file = env.optional("PARLEY_JWT_JWKS_FILE")
        if (key_file is None) == (jwks_file is None):
            raise ConfigError(
                "PARLEY_JWT_PUBLIC_KEY_FILE",
                "RS256 needs exactly one of PARLEY_JWT_PUBLIC_KEY_FILE or PARLEY_JWT_JWKS_FILE",
            )
        if key_file is not None:
            text = _read("PARLEY_JWT_PUBLIC_KEY_FILE", key_file)
            if "PUBLIC KEY" not in text:
                raise ConfigError(
                    "PARLEY_JWT_PUBLIC_KEY_FILE", f"{key_file} is not a PEM public key"
                )
            try:
                jwt.algorithms.RSAAlgorithm(jwt.algorithms.RSAAlgorithm.SHA256).prepare_key(text)
            except jwt.InvalidKeyError:
                raise ConfigError(
                    "PARLEY_JWT_PUBLIC_KEY_FILE", f"{key_file} is not a usable RSA public key"
                ) from None
            return cls(public_key=text, **common)
        assert jwks_file is not None
        text = _read("PARLEY_JWT_JWKS_FILE", jwks_file)
        try:
            document = json.loads(text)
            if not isinstance(document, dict):
                raise ValueError("expected a JSON object with a keys list")
            jwks = jwt.PyJWKSet.from_dict(document)
        except (jwt.PyJWKSetError, ValueError) as exc:
            raise ConfigError("PARLEY_JWT_JWKS_FILE", f"{jwks_file} is not a JWKS: {exc}") from None
        return cls(jwks=jwks, **common)


def _read(variable: str, path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError(variable, f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(variable, f"cannot read {path}: not a text file") from None


# How many verified tokens a TokenVerifier remembers (least recently used ones go first).
DEFAULT_CACHE_SIZE = 10_000


class _Verified:
    """A token that passed every check once: who it names and the times bounding its validity."""

    __slots__ = ("expires", "identity", "not_before")

    def __init__(self, identity: Identity, expires: float, not_before: float) -> None:
        self.identity = identity
        self.expires = expires
        self.not_before = not_before


class TokenVerifier:
    """Checks a JWT's signature, exp, nbf, iss and aud, and returns the caller's identity.

    A token that passes is remembered (keyed by its exact text, at most `cache_size` of them,
    least recently used evicted first) with its exp and nbf, so that the next call with the
    same token skips parsing and signature verification, the costly part, while its time
    claims are still checked against the clock on every call: a remembered token is rejected
    from its exp on, with the same leeway as a fresh one. Only tokens that passed are
    remembered; any other is checked in full every time. `cache_size=0` turns this off.
    """

    def __init__(
        self,
        settings: AuthSettings,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if cache_size < 0:
            raise ValueError("cache_size must not be negative")
        self._settings = settings
        self._cache_size = cache_size
        self._clock = clock
        self._cache: OrderedDict[str, _Verified] = OrderedDict()

    def _key(self, token: str) -> Any:
        settings = self._settings
        if settings.secret is not None:
            return settings.secret
        if settings.public_key is not None:
            return settings.public_key
        assert settings.jwks is not None
        kid = jwt.get_unverified_header(token).get("kid")
        if kid is None:
            if len(settings.jwks.keys) != 1:
                raise Unauthenticated("token has no key id (kid) and the JWKS has several keys")
            return settings.jwks.keys[0]
        try:
            return settings.jwks[kid]
        except KeyError:
            raise Unauthenticated(f"token key id {kid!r} is not in the JWKS") from None

    def verify(self, token: str) -> Identity:
        verified = self._cache.get(token)
        if verified is None:
            return self._verify_and_remember(token)
        # The checks PyJWT makes of exp, nbf and iat, against the current time.
        leeway = self._settings.leeway
        now = self._clock()
        if verified.expires <= now - leeway:
            self._cache.pop(token, None)
            raise Unauthenticated("token has expired", reason="TOKEN_EXPIRED")
        if verified.not_before > now + leeway:
            # Only when the clock went back since the token was verified.
            raise Unauthenticated("token is not valid yet (nbf)", reason="TOKEN_NOT_YET_VALID")
        try:
            self._cache.move_to_end(token)
        except KeyError:  # evicted meanwhile by another thread; still verified
            pass
        return verified.identity

    def _verify_and_remember(self, token: str) -> Identity:
        settings = self._settings
        try:
            claims = jwt.decode(
                token,
                self._key(token),
                algorithms=[settings.algorithm],
                audience=settings.audience,
                issuer=settings.issuer,
                leeway=settings.leeway,
                options={"require": ["exp", "sub", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token has expired", reason="TOKEN_EXPIRED") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated(
                "token is not valid yet (nbf)", reason="TOKEN_NOT_YET_VALID"
            ) from None
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"invalid token: {exc}", reason="TOKEN_INVALID") from None
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject:
            raise Unauthenticated(
                "invalid token: sub must be a non-empty string", reason="TOKEN_INVALID"
            )
        # jwt.decode checked that exp, and nbf and iat where present, are integers.
        expires = float(int(claims["exp"]))
        identity = Identity(
            subject=subject,
            scopes=_scopes(claims),
            token=token,
            valid_until=expires + settings.leeway,
        )
        if self._cache_size > 0:
            not_before = max(int(claims.get("nbf", 0)), int(claims.get("iat", 0)))
            self._cache[token] = _Verified(identity, expires, not_before)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return identity


def _scopes(claims: dict[str, Any]) -> frozenset[str]:
    """Scopes from the `scope` claim (space-separated, RFC 8693) or a `scp` list."""
    scope = claims.get("scope", "")
    scp = claims.get("scp", [])
    found: set[str] = set(scope.split()) if isinstance(scope, str) else set()
    if isinstance(scp, list):
        found.update(s for s in scp if isinstance(s, str))
    return frozenset(found)


def _bearer_token(metadata: Collection[tuple[str, str | bytes]] | None) -> str:
    values = [v for k, v in metadata or () if k == "authorization"]
    if not values:
        raise Unauthenticated(
            "missing authorization metadata; send 'authorization: Bearer <token>'",
            reason="TOKEN_MISSING",
        )
    if len(values) > 1:
        # Each part of a server may read another one: the call carries one token or none.
        raise Unauthenticated(
            f"{len(values)} authorization metadata entries; send exactly one",
            reason="TOKEN_MALFORMED",
        )
    value = values[0]
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    scheme, _, token = text.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated(
            "malformed authorization metadata; expected 'Bearer <token>'", reason="TOKEN_MALFORMED"
        )
    return token.strip()


class _AuthScope(CallScope):
    __slots__ = ("_context", "_verifier")

    def __init__(
        self, verifier: TokenVerifier, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        self._verifier = verifier
        self._context = context

    async def __aenter__(self) -> None:
        metadata = self._context.invocation_metadata()
        identity = self._verifier.verify(_bearer_token(metadata))
        _identity_var.set(identity)


class AuthInterceptor(WrappingInterceptor):
    """Requires a valid bearer token on every RPC except health and reflection."""

    def __init__(self, verifier: TokenVerifier, public_services: Collection[str] = PUBLIC_SERVICES):
        super().__init__()
        self._verifier = verifier
        self._public = frozenset(public_services)

    def wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        if method.lstrip("/").partition("/")[0] in self._public:
            return handler
        verifier = self._verifier
        return wrap_handler(handler, lambda context: _AuthScope(verifier, context))
