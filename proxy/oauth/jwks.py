"""Verifying JWTs against an issuer's key set (JWKS), fetched through the guarded fetcher.

The set is cached for JWKS_TTL. A token naming a key the cached set lacks (the
issuer rotated its keys) makes it be fetched again, at most every
JWKS_MIN_REFETCH seconds, so that tokens with made-up key ids cannot make the
proxy fetch on every request. When a fetch fails, the keys already held go on
being used; with none held, `KeysUnavailable`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet

from .fetch import Fetcher, FetchError, OAuthProtocolError, UnsafeURL

log = structlog.get_logger("keybearer.oauth")

# Asymmetric only: a caller must not be able to sign with a key the proxy also holds.
JWT_ALGORITHMS = ["RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "EdDSA"]
JWKS_TTL = 600.0
JWKS_MIN_REFETCH = 5.0


class KeysUnavailable(OAuthProtocolError):
    """No key set could be fetched, and none is held."""


class KeySetCache:
    def __init__(self, fetcher: Fetcher, url: Callable[[], Awaitable[str]]) -> None:
        self.fetcher = fetcher
        self.url = url  # where the set is: the operator's setting, or the provider's metadata
        self._keys: tuple[float, KeySet] | None = None
        self._tried = 0.0
        self._lock = asyncio.Lock()

    async def decode(self, token: str) -> dict[str, Any]:
        """The claims of a token signed by a key of the set; JoseError or ValueError
        when it is not (the claims themselves are the caller's to validate)."""
        try:
            return jwt.decode(token, await self._keyset(), algorithms=JWT_ALGORITHMS).claims
        except InvalidKeyIdError:
            return jwt.decode(token, await self._keyset(refetch=True), algorithms=JWT_ALGORITHMS).claims

    async def _keyset(self, refetch: bool = False) -> KeySet:
        if self._keys and self._keys[0] > time.monotonic() and not refetch:
            return self._keys[1]
        async with self._lock:
            if self._keys and time.monotonic() - self._tried < JWKS_MIN_REFETCH:
                return self._keys[1]  # fetched (or tried) a moment ago
            self._tried = time.monotonic()
            url = await self.url()
            try:
                keys = KeySet.import_key_set(await self.fetcher.get_json(url))  # type: ignore[arg-type]
            except (FetchError, UnsafeURL, ValueError, JoseError) as exc:
                log.error("key set unavailable", url=url, reason=str(exc))
                if self._keys:  # keep verifying with the keys we have
                    return self._keys[1]
                raise KeysUnavailable(f"the key set at {url} could not be fetched") from None
            self._keys = (time.monotonic() + JWKS_TTL, keys)
            return keys
