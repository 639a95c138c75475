"""`auth: none`: nothing is added."""

from __future__ import annotations

from proxy.credentials import Credential, Refusal, Wait, unauthorized
from proxy.errors import Answer
from proxy.settings import ServerConfig


class NoCredential:
    async def credential(self, server: ServerConfig, user: str, caller_jwt: str | None) -> Credential | None:
        return None

    def at_hand(self, server: ServerConfig, user: str) -> Credential | Wait | None:
        return None

    async def rejected(self, server: ServerConfig, user: str, refusal: Refusal) -> Credential | Answer | None:
        if refusal.status == 401:
            return unauthorized(
                server, "configure the server with auth: api_key or oauth, since it wants credentials"
            )
        return None
