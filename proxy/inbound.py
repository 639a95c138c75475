"""Inbound caller authentication: who may act as `/<user>/…` on a shared proxy.

    none    anyone who can reach the proxy acts as any user (sidecars on loopback)
    tokens  proxy tokens `kbp_<id>.<secret>`, each bound to the user ids it may
            act for; stored sealed with only a hash of the secret
    jwt     bearer JWTs checked against a JWKS; a claim must equal the path's user

The caller's `Authorization` carries this credential; like every agent
credential it stops at the proxy and is never forwarded.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import structlog
from joserfc import jwt
from joserfc.errors import JoseError

from proxy.errors import KeybearerError
from proxy.names import RESYNC, SERVERS_CHANGED, Event, SecretKind
from proxy.oauth.fetch import Fetcher
from proxy.oauth.jwks import KeySetCache, KeysUnavailable
from proxy.sealed import SealedSecrets
from proxy.settings import ID_PATTERN, Settings

log = structlog.get_logger("keybearer.inbound")

PREFIX = "kbp_"


class Refused(KeybearerError):
    """The caller may not act as the path's user."""

    status = 401
    code = "caller_unauthenticated"


@dataclass(frozen=True)
class ProxyToken:
    id: str
    digest: str
    users: tuple[str, ...]
    label: str
    created: float

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "users": list(self.users), "label": self.label, "created": self.created}


def new_token(users: list[str], label: str) -> tuple[str, ProxyToken]:
    """A fresh token: (the value to hand out once, the record to store)."""
    if not users or not all(isinstance(u, str) and ID_PATTERN.fullmatch(u) for u in users):
        raise ValueError("users must be a non-empty list of valid user ids")
    if not isinstance(label, str) or len(label) > 200:
        raise ValueError("label must be a string of at most 200 characters")
    token_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    record = ProxyToken(token_id, _digest(secret), tuple(dict.fromkeys(users)), label, time.time())
    return f"{PREFIX}{token_id}.{secret}", record


def _digest(secret: str) -> str:
    # The secret is 256 random bits: a plain hash cannot be brute-forced.
    return hashlib.sha256(secret.encode()).hexdigest()


def record_json(token: ProxyToken) -> str:
    return json.dumps({**token.public(), "digest": token.digest})


def record_from_json(raw: str) -> ProxyToken:
    data = json.loads(raw)
    return ProxyToken(
        data["id"], data["digest"], tuple(data["users"]), data.get("label", ""), data["created"]
    )


class InboundAuth:
    def __init__(self, settings: Settings, secrets: SealedSecrets, fetcher: Fetcher) -> None:
        self.settings = settings
        self.mode = settings.inbound_auth
        self.secrets = secrets
        self.fetcher = fetcher
        # Caller tokens by id, hashes only; reloaded on SERVERS_CHANGED.
        self.tokens: dict[str, ProxyToken] = {}
        self.keys = KeySetCache(fetcher, self._jwks_url)
        self._claims = jwt.JWTClaimsRegistry(
            leeway=30, iss={"essential": True, "value": settings.jwt_issuer or ""}, exp={"essential": True}
        )
        if settings.jwt_audience:
            self._claims.options["aud"] = {"essential": True, "value": settings.jwt_audience}

    async def _jwks_url(self) -> str:
        return self.settings.jwt_jwks_url or ""

    async def load(self) -> None:
        if self.mode == "tokens":
            stored = await self.secrets.all(SecretKind.CALLER_TOKEN)
            self.tokens = {name: record_from_json(raw) for name, raw in stored.items()}

    async def on_event(self, event: Event) -> None:
        if event.kind in (SERVERS_CHANGED, RESYNC):
            await self.load()

    async def check(self, headers: list[tuple[bytes, bytes]], user: str) -> str | None:
        """Refused unless the caller may act as `user`. Returns the caller's JWT
        (`inbound_auth: jwt`), which a credential source may use as the person's
        identity (identity_assertion); else None."""
        if self.mode == "none":
            return None
        presented = _bearer(headers)
        if presented is None:
            raise Refused("this proxy requires a caller credential: send `Authorization: Bearer <token>`")
        if self.mode == "tokens":
            self._check_token(presented, user)
            return None
        await self._check_jwt(presented, user)
        return presented

    def check_now(self, headers: list[tuple[bytes, bytes]], user: str) -> bool:
        """True when `check` would let the caller act as `user` without waiting and
        without a JWT to hand on; False sends the request the way that calls `check`."""
        if self.mode == "none":
            return True
        if self.mode != "tokens":
            return False  # a JWT's keys may have to be fetched
        presented = _bearer(headers)
        record = self._token(presented) if presented is not None else None
        return record is not None and user in record.users

    def _token(self, presented: str) -> ProxyToken | None:
        token_id, _, secret = presented.removeprefix(PREFIX).partition(".")
        record = self.tokens.get(token_id) if presented.startswith(PREFIX) else None
        if record is None or not hmac.compare_digest(record.digest, _digest(secret)):
            return None
        return record

    def _check_token(self, presented: str, user: str) -> None:
        record = self._token(presented)
        if record is None:
            raise Refused("the caller token is not valid; ask the operator for one")
        if user not in record.users:
            log.warning("proxy token used for another user", token=record.id, user=user)
            raise Refused(
                f"this caller token may not act for user {user!r}", status=403, code="caller_forbidden"
            )

    async def _check_jwt(self, presented: str, user: str) -> None:
        try:
            claims = await self.keys.decode(presented)
            self._claims.validate(claims)
        except KeysUnavailable:
            raise Refused(
                "the proxy cannot fetch the keys that verify caller JWTs; retry shortly, and tell the operator "
                "if it persists (the proxy's log names the reason)",
                status=503,
                code="jwks_unavailable",
                retry_after=5,
            ) from None
        except (JoseError, ValueError) as exc:
            raise Refused(f"the caller JWT was refused: {type(exc).__name__}") from None
        if claims.get(self.settings.jwt_user_claim) != user:
            raise Refused(
                f"the caller JWT does not belong to user {user!r}", status=403, code="caller_forbidden"
            )


def _bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None
