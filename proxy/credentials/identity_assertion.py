"""`auth: oauth` with `grant: identity_assertion`: each person's token, as their organisation allows.

The token comes from connect/assertion.py, the subject of its exchange from
connect/subject.py: the agent's own JWT when it is the person's ID token, else
their kept sign-in. What the agent may get instead:
the sign-in link (-32042) when Keybearer holds no current sign-in of the
person, the organisation's refusal, or a 503 naming the server when its
authorization server refuses Keybearer's grant.
"""

from __future__ import annotations

from proxy.connect.assertion import PRESENTED, AssertionTokens
from proxy.credentials import WAIT, Credential, Refusal, Wait, bearer
from proxy.errors import Answer, KeybearerError
from proxy.settings import ServerConfig


class IdentityAssertion:
    def __init__(self, tokens: AssertionTokens) -> None:
        self.tokens = tokens

    async def credential(self, server: ServerConfig, user: str, caller_jwt: str | None) -> Credential | None:
        # Kept for the rest of this request's task (rejected() below too): the
        # subject of an exchange, should one be needed.
        PRESENTED.set(caller_jwt)
        return bearer(await self.tokens.access_token(server, user))

    def at_hand(self, server: ServerConfig, user: str) -> Credential | Wait | None:
        return WAIT

    async def rejected(self, server: ServerConfig, user: str, refusal: Refusal) -> Credential | Answer | None:
        if refusal.status == 403:
            return None  # the server's own answer: scopes are the organisation's to grant
        used = refusal.sent.value.decode("latin-1").removeprefix("Bearer ") if refusal.sent else ""
        try:
            if refusal.retried or not refusal.replayable:
                # A token issued a moment ago, refused: another would fare no better now.
                self.tokens.forget(user, server.id)
                return None
            # Revoked or expired early: one new exchange (unless another request made it).
            return bearer(await self.tokens.refresh_rejected(server, user, used))
        except KeybearerError as exc:
            return exc.answer()
