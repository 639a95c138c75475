"""`auth: oauth`: each user's own access token, and what to do when it is refused.

The token comes from connect/lifecycle.py, which refreshes it when due. When
the user has no usable connection, or the server wants more scopes, the agent
gets a consent answer: a signed connect link, as the -32042 URL elicitation of
a JSON-RPC request (errors.py renders it).
"""

from __future__ import annotations

from proxy import links, metrics
from proxy.connect.lifecycle import NeedsConsent, TokenLifecycle
from proxy.credentials import WAIT, Credential, Refusal, Wait, bearer
from proxy.crypto import Keyring
from proxy.errors import Answer, KeybearerError
from proxy.oauth.discovery import parse_www_authenticate
from proxy.settings import ServerConfig, Settings

# A server still asking for more scopes after this many reconnects in an hour
# is refused rather than sending the person round again.
MAX_STEP_UPS = 3


class OAuthTokens:
    def __init__(self, lifecycle: TokenLifecycle, settings: Settings, keyring: Keyring) -> None:
        self.lifecycle = lifecycle
        self.settings = settings
        self.keyring = keyring
        self.links = links.Links(settings, keyring)

    async def credential(self, server: ServerConfig, user: str, caller_jwt: str | None) -> Credential | None:
        try:
            return bearer(await self.lifecycle.access_token(server, user))
        except NeedsConsent as exc:
            raise ConsentRequired(self.consent(server, user, exc.scopes, exc.reason)) from None

    def at_hand(self, server: ServerConfig, user: str) -> Credential | Wait | None:
        token = self.lifecycle.remembered(server, user)
        return WAIT if token is None else bearer(token)

    async def rejected(self, server: ServerConfig, user: str, refusal: Refusal) -> Credential | Answer | None:
        challenge = parse_www_authenticate(refusal.challenges)
        if refusal.status == 403:
            if challenge is None or challenge.error != "insufficient_scope":
                return Answer(403, "forbidden", f"server {server.id!r} refused this request (HTTP 403)",
                              data={"server": server.id})  # fmt: skip
            return await self._step_up(server, user, challenge.scope)
        # 401: the token was revoked or expired early. One refresh and one
        # replay, when the body can be sent again.
        try:
            if refusal.replayable and refusal.sent is not None:
                used = refusal.sent.value.decode("latin-1").removeprefix("Bearer ")
                return bearer(await self.lifecycle.refresh_rejected(server, user, used))
            await self.lifecycle.mark_rejected(server, user)
            return self.consent(server, user, (), "the server rejected the stored token")
        except NeedsConsent as exc:
            return self.consent(server, user, (), exc.reason)
        except KeybearerError as exc:
            return exc.answer()

    async def _step_up(self, server: ServerConfig, user: str, challenged: tuple[str, ...]) -> Answer:
        attempts = await self.lifecycle.count_step_up(server, user)
        if attempts > MAX_STEP_UPS:
            return Answer(
                403,
                "insufficient_scope",
                f"server {server.id!r} still wants more permissions ({' '.join(challenged)}) after "
                f"{MAX_STEP_UPS} reconnects",
                "the account may not be allowed them: ask its administrator",
                data={"server": server.id},
            )
        granted = await self.lifecycle.granted_scopes(server, user)
        scopes = tuple(dict.fromkeys((*granted, *challenged)))
        return self.consent(server, user, scopes, "the server needs more permissions")

    def consent(self, server: ServerConfig, user: str, scopes: tuple[str, ...], reason: str) -> Answer:
        """A signed connect link, in the error data and in its text. 403 when the
        request cannot carry a JSON-RPC answer, never 401: a 401 would start the
        client's own OAuth discovery against the proxy."""
        url = self.links.connect(user, server.id, scopes)
        connections = self.links.connections(user)
        metrics.CONSENT_REQUIRED.labels(server.id).inc()
        return Answer(
            403,
            "connection_required",
            f"{server.id} needs you to connect your account ({reason}). "
            f"Open this link in your browser, then retry: {url} — all your connections: {connections}",
            data={"connect_url": url, "connections_url": connections, "server": server.id},
            elicitation_url=url,
        )


class ConsentRequired(KeybearerError):
    """Carries a consent answer out of `credential`."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer.message, status=answer.status, code=answer.code)
        self._answer = answer

    def answer(self) -> Answer:
        return self._answer
