"""`grant: identity_assertion`: each person's token, as their organisation allows.

The MCP enterprise-managed authorization extension (the Identity Assertion
JWT Authorization Grant, ID-JAG): the person's ID token from the sign-in
(login.py) is exchanged at the organisation's identity provider for an ID-JAG
naming the server's authorization server (RFC 8693), which that authorization
server takes in a JWT bearer grant from Keybearer's static client there
(RFC 7523). No consent page: the provider's policy decides.

An ID-JAG lives minutes and brings no refresh token, so a token is renewed by
the whole exchange again, per (user, server), through ServiceTokens' single
flight across replicas. Three answers stay apart: no ID token (the person must
sign in, once for every such server), the provider's refusal (the organisation
does not allow this person this server), and the authorization server's refusal
(the operator's to fix, recorded and answered 503 like a service token's).
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import replace
from urllib.parse import urlencode

import structlog

from proxy import metrics
from proxy.connect.clients import OAuthClients, ServiceClientUnusable, ServiceGrant
from proxy.connect.lifecycle import TokenSet
from proxy.connect.service import ServiceTokens, refusal_message
from proxy.connect.subject import SubjectTokens
from proxy.errors import Answer, Forbidden, KeybearerError, Unavailable
from proxy.login import RelyingParty
from proxy.oauth import client as oauth_client
from proxy.oauth.client import AuthServerUnavailable, OAuthError
from proxy.oauth.discovery import DiscoveryError
from proxy.oauth.fetch import FetchError, UnsafeURL
from proxy.settings import ServerConfig
from proxy.stores import Connection

log = structlog.get_logger("keybearer.oauth")

# The provider's answers that mean "its policy says no" (RFC 8693 §2.2.2, RFC 6749 §5.2).
POLICY_REFUSALS = ("invalid_grant", "access_denied", "invalid_target", "invalid_scope", "unauthorized_client")
# A person's connection to a managed server, besides connected and refused (service.py):
NOT_ALLOWED = "not_allowed"  # the provider's policy refused the exchange; obtained_at is when
SIGN_IN_REQUIRED = "sign_in_required"  # the token ran out and Keybearer holds no current sign-in

# The agent's own bearer token on this request (inbound_auth: jwt), set by the
# identity_assertion credential source for its request's task: the exchange
# happens deep in the token's single flight, which knows nothing of requests.
PRESENTED: ContextVar[str | None] = ContextVar("keybearer_presented", default=None)


class SignInNeeded(KeybearerError):
    """No usable ID token for the person: the sign-in page, as a -32042 link."""

    status = 403
    code = "sign_in_required"
    title = "Sign in"

    def __init__(self, server: ServerConfig, sign_in_url: str) -> None:
        super().__init__(
            f"{server.id} is authorized by your organisation's sign-in, and Keybearer holds no current "
            f"sign-in of yours. Open this link in your browser, sign in, then retry: {sign_in_url}",
            next_step="one sign-in serves every server your organisation manages",
            server=server.id,
        )
        self.sign_in_url = sign_in_url

    def answer(self) -> Answer:
        metrics.CONSENT_REQUIRED.labels(str(self.data.get("server", ""))).inc()
        return replace(
            super().answer(),
            data={**self.data, "sign_in_url": self.sign_in_url},
            elicitation_url=self.sign_in_url,
        )


class NotAllowedByOrganisation(Forbidden):
    code = "not_allowed_by_organisation"
    title = "Not allowed by your organisation"


def not_allowed(server: ServerConfig, message: str) -> NotAllowedByOrganisation:
    return NotAllowedByOrganisation(
        message, next_step="if you need it, ask whoever manages access at your organisation", server=server.id
    )


class IdentityProviderFailed(Unavailable):
    """The provider failed the exchange in a way only the operator can fix."""

    code = "identity_provider_failed"


class IdentityAssertions:
    """The grant call for a (server, user): exchange, then JWT bearer grant."""

    def __init__(
        self,
        clients: OAuthClients,
        party: RelyingParty | None,
        subjects: SubjectTokens | None,
        public_url: str,
    ) -> None:
        self.clients = clients
        self.party = party
        self.subjects = subjects
        self.sign_in_url = public_url + "/login?" + urlencode({"next": "/"})

    async def __call__(self, server: ServerConfig, user: str) -> ServiceGrant:
        if self.party is None or self.subjects is None:
            raise IdentityProviderFailed(
                f"server {server.id!r} uses grant identity_assertion but people do not sign in on this proxy; "
                "the operator must set login_issuer and login_client_id",
                server=server.id,
            )
        try:
            found = await self.clients.discovery(server)
        except (DiscoveryError, UnsafeURL, FetchError) as exc:
            raise AuthServerUnavailable(str(exc)) from None
        registration = await self.clients.service_client(server, found.auth_server)
        try:
            id_token = await self.subjects.subject(user, PRESENTED.get())
        except OAuthError as exc:
            log.warning("identity provider failed to renew a sign-in", server=server.id, reason=str(exc))
            raise IdentityProviderFailed(
                f"the organisation's identity provider failed to renew your sign-in for server {server.id!r} "
                f"({exc}); the operator must allow Keybearer's sign-in client the refresh_token grant there "
                "(docs/enterprise.md)",
                retry_after=15,
                server=server.id,
            ) from None
        if id_token is None:
            raise SignInNeeded(server, self.sign_in_url)
        scopes = found.scopes or server.scopes
        resource = found.resource if server.resource else None
        try:
            assertion = await self.party.exchange(id_token, found.auth_server.issuer, resource, scopes)
        except OAuthError as exc:
            raise self._exchange_refused(server, user, exc) from None
        issued = await oauth_client.jwt_bearer(
            self.clients.fetcher, found.auth_server, registration, assertion, scopes
        )
        return ServiceGrant(issued, found.auth_server.issuer, registration.client_id, scopes)

    def _exchange_refused(self, server: ServerConfig, user: str, exc: OAuthError) -> KeybearerError:
        if exc.error in POLICY_REFUSALS:
            log.info("identity provider refused the exchange", server=server.id, user=user, error=exc.error)
            return not_allowed(
                server,
                f"your organisation does not allow you to use {server.id} (its identity provider refused: "
                f"{exc.error})",
            )
        log.warning("identity provider failed the exchange", server=server.id, reason=str(exc))
        return IdentityProviderFailed(
            f"the organisation's identity provider failed the token exchange for server {server.id!r} ({exc}); "
            "the operator must allow Keybearer's sign-in client the token exchange for ID-JAGs there "
            "(docs/enterprise.md)",
            retry_after=15,
            server=server.id,
        )


class AssertionTokens(ServiceTokens):
    """ServiceTokens per person: the same single flight, refusals and cooldown.

    The provider's policy refusal is recorded too (NOT_ALLOWED), for the pages
    and for every replica: for `cooldown` seconds it is answered from the record,
    so that an agent refused again and again does not send the provider a token
    exchange per request; then the provider is asked again, as policies change.
    A stored token that ran out with no sign-in to renew it becomes
    SIGN_IN_REQUIRED (nothing is stored for people who never had one here: an
    agent may name any user id)."""

    async def _obtain(self, server: ServerConfig, current: Connection) -> ServiceGrant:
        try:
            return await super()._obtain(server, current)
        except NotAllowedByOrganisation as exc:
            recorded = await self._record(server, current, NOT_ALLOWED, exc.message)
            raise self._not_allowed(server, recorded) from None
        except SignInNeeded as exc:
            expired = current.expires_at is None or current.expires_at <= time.time()
            if current.version and current.state != SIGN_IN_REQUIRED and expired:
                await self._record(server, current, SIGN_IN_REQUIRED, exc.message)
            raise

    def _open(self, conn: Connection, server: ServerConfig) -> TokenSet:
        if conn.state == SIGN_IN_REQUIRED and isinstance(self.obtain, IdentityAssertions):
            # What another request or replica just recorded while this one waited:
            # the same answer, not a 503 "changed meanwhile".
            raise SignInNeeded(server, self.obtain.sign_in_url)
        return super()._open(conn, server)

    def _usable(self, conn: Connection, server: ServerConfig) -> TokenSet | None:
        if conn.state == NOT_ALLOWED:
            if conn.obtained_at + self.cooldown > time.time():
                raise self._not_allowed(server, conn)
            return None
        return super()._usable(conn, server)

    def _not_allowed(self, server: ServerConfig, conn: Connection) -> NotAllowedByOrganisation:
        return not_allowed(
            server, conn.last_error or f"your organisation does not allow you to use {server.id}"
        )

    def refusal_message(self, server: ServerConfig, exc: OAuthError | ServiceClientUnusable) -> str:
        if isinstance(exc, ServiceClientUnusable) or exc.error == "invalid_client":
            return refusal_message(server, exc)
        return (
            f"the authorization server of server {server.id!r} refused the ID-JAG from the organisation's "
            f"identity provider ({exc}); the operator must let Keybearer's client there use the JWT bearer "
            "grant and trust that provider's ID-JAGs for this client (docs/enterprise.md)"
        )
