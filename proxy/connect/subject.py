"""The subject of a token exchange (`grant: identity_assertion`): the person's ID token.

Two sources, the first that serves:

- the agent's own bearer token, with `inbound_auth: jwt`, when it is an ID
  token from the sign-in's provider for Keybearer's sign-in client that names
  the path's user (login.RelyingParty.agent_id_token). It goes to the provider
  that issued it and nowhere else;
- the ID token of the person's last sign-in, kept sealed in the token store
  with the provider's refresh token beside it. When it has expired, or is
  about to (`refresh_skew`, at most a quarter of its lifetime), it is renewed
  by the refresh token grant: by one request per process and one replica at a
  time (a lock per person in the token store); the others wait for its write
  and use it. A rotated refresh token replaces the old one. A refusal
  (`invalid_grant`: the person's session at the provider is over, or the
  refresh token was revoked) drops both: the person must sign in again.

A sign-in serves for `session_lifetime` at most, however often it is renewed:
after that nothing is exchanged in the person's name until they sign in again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import asdict, dataclass, field

import structlog

from proxy.connect.lifecycle import LIFETIME_FRACTION, TemporarilyUnavailable
from proxy.connect.single_flight import SingleFlight
from proxy.crypto import DecryptError, Keyring
from proxy.login import Identity, RelyingParty
from proxy.names import SESSION
from proxy.oauth.client import AuthServerUnavailable, OAuthError
from proxy.stores import StoreUnavailable, TokenStore

log = structlog.get_logger("keybearer.login")

# Answers to a renewal that mean the person's session at the provider is over.
SIGNED_OUT = ("invalid_grant", "invalid_token")
# While another replica renews, look for its write this often, and give up
# (503, retry) after this long: a renewal is one call to the provider.
WAIT_POLL = 0.1
RENEW_WAIT = 5.0


@dataclass(frozen=True)
class KeptSignIn:
    id_token: str = field(repr=False)
    issued: float
    expires: float
    refresh_token: str | None = field(repr=False)
    until: float  # the sign-in's end, whatever renewals come


class SubjectTokens:
    def __init__(
        self,
        party: RelyingParty,
        keyring: Keyring,
        tokens: TokenStore,
        skew: float,
        lifetime: float,
        lock_ttl: float,
    ) -> None:
        self.party = party
        self.keyring = keyring
        self.tokens = tokens
        self.skew = skew
        self.lifetime = lifetime
        # Held across one call to the provider: longer than the fetcher's deadline.
        self.lock_ttl = lock_ttl + party.fetcher.timeout
        self._renewals: SingleFlight[str, str | None] = SingleFlight()

    # -- sign-in and sign-out (login.KeepsSignIns) ----------------------------------------

    async def keep(self, identity: Identity) -> None:
        """The person's newest sign-in, sealed: the subject of every exchange for
        them, whichever browser or agent asks."""
        token = identity.id_token
        until = time.time() + self.lifetime if identity.refresh_token else token.expires
        await self._write(identity.user, KeptSignIn(token.value, token.issued, token.expires,
                                                    identity.refresh_token, until))  # fmt: skip

    async def forget(self, user: str) -> None:
        """Signed out: nothing more is exchanged in their name. Taken under the
        renewal lock, so that a renewal running elsewhere cannot write it back."""
        lock = await self._wait_for_lock(user)
        try:
            await self.tokens.cache_delete_prefix(_key(user))
        finally:
            if lock is not None:
                await self._release(user, lock)

    async def holds(self, user: str) -> bool:
        """Whether a sign-in of the person is kept that can still be exchanged:
        its ID token unexpired, or renewable."""
        kept = await self._read(user)
        return kept is not None and (kept.refresh_token is not None or kept.expires > time.time())

    # -- the subject ----------------------------------------------------------------------

    async def subject(self, user: str, presented: str | None) -> str | None:
        """An ID token to exchange for `user`, or None: they must sign in.
        OAuthError when the provider fails a renewal in a way the operator must fix."""
        if presented is not None:
            own = await self.party.agent_id_token(presented, user)
            if own is not None:
                return own.value
        kept = await self._read(user)
        if kept is None:
            return None
        if not self._due(kept):
            return kept.id_token
        if kept.refresh_token is None:
            return kept.id_token if kept.expires > time.time() else None
        return await self._renewals.run(user, lambda: self._renew_across_replicas(user, kept))

    def _due(self, kept: KeptSignIn) -> bool:
        ahead = min(self.skew, max(0.0, kept.expires - kept.issued) * LIFETIME_FRACTION)
        return kept.expires - ahead <= time.time()

    async def _renew_across_replicas(self, user: str, seen: KeptSignIn) -> str | None:
        deadline = time.monotonic() + RENEW_WAIT
        while True:
            lock = await self._acquire(user)
            if lock is not None:
                try:
                    return await self._renew(user, seen)
                finally:
                    await self._release(user, lock)
            await asyncio.sleep(WAIT_POLL)
            current = await self._read(user)
            if current is None or current.id_token != seen.id_token:
                return current.id_token if current is not None else None  # another replica renewed
            if time.monotonic() > deadline:
                raise TemporarilyUnavailable(
                    "another replica is renewing your sign-in with your organisation and has not finished; "
                    "retry shortly",
                    2,
                )

    async def _renew(self, user: str, seen: KeptSignIn) -> str | None:
        current = await self._read(user)
        if current is None or current.id_token != seen.id_token:
            return current.id_token if current is not None else None  # renewed (or signed out) meanwhile
        assert current.refresh_token is not None
        try:
            id_token, rotated = await self.party.renew(current.refresh_token, user)
        except OAuthError as exc:
            if exc.error not in SIGNED_OUT:
                if current.expires > time.time():
                    log.warning("sign-in not renewed; its ID token is used until it expires",
                                user=user, reason=str(exc))  # fmt: skip
                    return current.id_token
                raise
            log.info("the provider refused to renew a sign-in; the person must sign in again",
                     user=user, error=exc.error)  # fmt: skip
            await self.tokens.cache_delete_prefix(_key(user))
            return None
        except AuthServerUnavailable:
            if current.expires > time.time():
                return current.id_token  # still valid: used while the provider recovers
            raise
        renewed = KeptSignIn(id_token.value, id_token.issued, id_token.expires,
                             rotated or current.refresh_token, current.until)  # fmt: skip
        await self._write(user, renewed)
        log.info("sign-in renewed at the provider", user=user)
        return renewed.id_token

    # -- the store ------------------------------------------------------------------------

    async def _read(self, user: str) -> KeptSignIn | None:
        try:
            sealed = await self.tokens.cache_get(_key(user))
        except StoreUnavailable as exc:
            raise TemporarilyUnavailable(f"token storage is unavailable ({exc}); retry shortly", 5) from None
        if not sealed:
            return None
        try:
            return KeptSignIn(**json.loads(self.keyring.decrypt(SESSION, sealed, _key(user))))
        except (DecryptError, ValueError, TypeError):
            return None

    async def _write(self, user: str, kept: KeptSignIn) -> None:
        ttl = kept.until - time.time()
        if ttl > 0:
            sealed = self.keyring.encrypt(SESSION, json.dumps(asdict(kept)).encode(), _key(user))
            await self.tokens.cache_set(_key(user), sealed, ttl)

    async def _acquire(self, user: str) -> str | None:
        try:
            return await self.tokens.acquire_lock(_key(user), self.lock_ttl)
        except StoreUnavailable as exc:
            raise TemporarilyUnavailable(f"token storage is unavailable ({exc}); retry shortly", 5) from None

    async def _wait_for_lock(self, user: str) -> str | None:
        for _ in range(round(RENEW_WAIT / WAIT_POLL)):
            lock = await self._acquire(user)
            if lock is not None:
                return lock
            await asyncio.sleep(WAIT_POLL)
        return None  # a holder that died: its lock expires by itself

    async def _release(self, user: str, lock: str) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self.tokens.release_lock(_key(user), lock)


def _key(user: str) -> str:
    # User ids never hold ':' (ID_PATTERN): the trailing one makes the key its own prefix.
    return f"login:id_token:{user}:"
