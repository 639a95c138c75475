"""`auth: oauth` with `grant: client_credentials`: the server's one token, for every user.

The token comes from connect/service.py. Nobody can be sent to a browser to
fix anything here: when no token can be had, the agent gets a 503 naming the
server and what the operator must check, never a connect link or -32042.
"""

from __future__ import annotations

from proxy.connect.service import ServiceTokens
from proxy.credentials import WAIT, Credential, Refusal, Wait, bearer
from proxy.errors import Answer, KeybearerError
from proxy.names import SERVICE_USER
from proxy.oauth.discovery import parse_www_authenticate
from proxy.settings import ServerConfig


class ClientCredentials:
    def __init__(self, tokens: ServiceTokens) -> None:
        self.tokens = tokens

    async def credential(self, server: ServerConfig, user: str, caller_jwt: str | None) -> Credential | None:
        return bearer(await self.tokens.token(server))

    def at_hand(self, server: ServerConfig, user: str) -> Credential | Wait | None:
        return WAIT

    async def rejected(self, server: ServerConfig, user: str, refusal: Refusal) -> Credential | Answer | None:
        if refusal.status == 403:
            challenge = parse_www_authenticate(refusal.challenges)
            if challenge is None or challenge.error != "insufficient_scope":
                return None  # the server's own answer
            wanted = " ".join(challenge.scope) or "more scopes"
            return Answer(
                403,
                "insufficient_scope",
                f"server {server.id!r} wants {wanted}, which its service token does not carry",
                "the operator must list them in the server's scopes and allow them for its client at the "
                "authorization server",
                data={"server": server.id},
            )
        used = refusal.sent.value.decode("latin-1").removeprefix("Bearer ") if refusal.sent else ""
        try:
            if refusal.retried:
                return (await self.tokens.refused_upstream(server, used)).answer()
            # Revoked or expired early: one new token (unless another request got
            # one already), and the request again when its body can be sent again.
            fresh = await self.tokens.refresh_rejected(server, SERVICE_USER, used)
        except KeybearerError as exc:
            return exc.answer()
        if refusal.replayable:
            return bearer(fresh)
        return Answer(
            503,
            "service_token_renewed",
            f"server {server.id!r} refused its service token; a new one was obtained",
            "send the request again",
            headers=(("retry-after", "1"),),
            data={"server": server.id},
        )
