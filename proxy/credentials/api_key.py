"""`auth: api_key`: the server's one key, in the configured header, for every user."""

from __future__ import annotations

from proxy.bounded import BoundedMap
from proxy.credentials import WAIT, Credential, Refusal, Wait, unauthorized
from proxy.errors import Answer, Unavailable
from proxy.registry import Registry
from proxy.settings import ServerConfig


class ApiKeyMissing(Unavailable):
    code = "api_key_missing"


# Servers whose credential is kept made, beside their key: more than any deployment has.
MAX_SERVERS = 4096


class ApiKeys:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        # server id -> (its config, its key, the credential made of them): rebuilt
        # only when the key or the server's settings change.
        self._made: BoundedMap[str, tuple[ServerConfig, str, Credential]] = BoundedMap(MAX_SERVERS)

    async def credential(self, server: ServerConfig, user: str, caller_jwt: str | None) -> Credential | None:
        credential = self._made_for(server)
        if credential is None:
            where = f"set the environment variable {server.api_key_env}" if server.api_key_env else ""
            if server.api_key_file:
                where = f"put the key in {server.api_key_file}"
            hint = f"{where}, or run" if where else "run"
            raise ApiKeyMissing(
                f"server {server.id!r} needs an API key and none is configured; "
                f"the operator must {hint} `keybearer api-key set {server.id}`",
                retry_after=60,
                server=server.id,
            )
        return credential

    def at_hand(self, server: ServerConfig, user: str) -> Credential | Wait | None:
        credential = self._made_for(server)
        return WAIT if credential is None else credential

    def _made_for(self, server: ServerConfig) -> Credential | None:
        """The credential of the server's key; None when it has none."""
        key = self.registry.api_key(server)
        if not key:
            return None
        made = self._made.get(server.id)
        if made is not None and made[0] is server and made[1] == key:
            return made[2]
        value = f"{server.api_key_scheme} {key}" if server.api_key_scheme else key
        credential = Credential(server.api_key_header.lower().encode(), value.encode())
        self._made[server.id] = (server, key, credential)
        return credential

    async def rejected(self, server: ServerConfig, user: str, refusal: Refusal) -> Credential | Answer | None:
        if refusal.status == 401:
            return unauthorized(server, f"check the key with `keybearer api-key set {server.id}`")
        return None
