"""The proxy as an OAuth client at each server's authorization server.

For a server: its authorization metadata (discovered, cached in process and in
the token store), the client the proxy is there (a static client the operator
set, the proxy's Client ID Metadata Document, or a dynamic registration,
stored sealed and reused), and the token endpoint calls made as that client.
Both the connect flow (flow.py) and the token lifecycle (lifecycle.py) use it;
it uses neither.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, replace

import structlog

from proxy.crypto import DecryptError
from proxy.names import ALL_USERS, RESYNC, Event, SecretKind
from proxy.oauth import client as oauth_client
from proxy.oauth.client import AuthServerUnavailable, ClientRegistration, OAuthError, TokenResponse
from proxy.oauth.discovery import AuthServer, Discovery, DiscoveryError, discover, probe_challenge
from proxy.oauth.fetch import Fetcher, FetchError, UnsafeURL
from proxy.registry import Registry
from proxy.sealed import SealedSecrets
from proxy.settings import ServerConfig, Settings
from proxy.stores import Connection, TokenStore

log = structlog.get_logger("keybearer.oauth")

CLIENT_METADATA_PATH = "/oauth/client-metadata.json"
CLIENT_NAME = "Keybearer MCP proxy"
# A stored registration whose secret expires sooner than this is registered
# again: longer than a sign-in may take (flow.STATE_TTL), so that one begun
# with a registration can finish with it.
RENEW_BEFORE_EXPIRY = 900.0


def discovery_cache_key(server: ServerConfig) -> str:
    """Bound to the server's url: what was found for one address is never used for another."""
    return f"oauth:{server.id}:discovery:{hashlib.sha256(server.url.encode()).hexdigest()[:16]}"


def server_cache_prefix(server_id: str) -> str:
    """Every token-store cache entry that belongs to a server."""
    return f"oauth:{server_id}:"


class OAuthClients:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        secrets: SealedSecrets,
        tokens: TokenStore,
        fetcher: Fetcher,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.secrets = secrets
        self.tokens = tokens
        self.fetcher = fetcher
        self.redirect_uri = settings.public_url + settings.callback_path
        # The document's URL is its client id: the proxy's own path, unless the
        # operator hosts the document elsewhere.
        self.client_id_url = settings.client_metadata_url or settings.public_url + CLIENT_METADATA_PATH
        # server id -> (until, the url it was found for, what was found)
        self._discoveries: dict[str, tuple[float, str, Discovery]] = {}

    # -- discovery -------------------------------------------------------------------

    async def discovery(self, server: ServerConfig, *, fresh: bool = False) -> Discovery:
        """The server's authorization metadata, cached in-process and in the token store."""
        now = time.time()
        cached = self._discoveries.get(server.id)
        if cached and cached[0] > now and cached[1] == server.url and not fresh:
            return cached[2]
        key = discovery_cache_key(server)
        found: Discovery | None = None
        if not fresh:
            raw = await self.tokens.cache_get(key)
            found = _discovery_from_json(raw) if raw else None
        if found is None:
            challenge = await probe_challenge(self.fetcher, server.url)
            found = await discover(self.fetcher, server.url, challenge)
            await self.tokens.cache_set(key, _discovery_to_json(found), self.settings.metadata_cache_ttl)
        self._discoveries[server.id] = (now + min(60.0, self.settings.metadata_cache_ttl), server.url, found)
        return found

    def on_event(self, event: Event) -> None:
        """A reset or a changed definition ends what was discovered for the server."""
        if event.kind == RESYNC:
            self._discoveries.clear()
        elif event.kind == "connection" and event.user == ALL_USERS and event.server:
            self._discoveries.pop(event.server, None)

    # -- the client ------------------------------------------------------------------

    async def client_for(self, server: ServerConfig, auth_server: AuthServer) -> ClientRegistration:
        static = await self._static_client(server)
        if static is not None:
            client_id, secret, method = static
            registration = oauth_client.static_registration(auth_server, client_id, secret, self.redirect_uri)
            # A method the operator set wins, with the secret they gave.
            return (
                registration
                if method is None
                else replace(registration, auth_method=method, client_secret=secret)
            )
        loopback_ok = self.settings.oauth_allow_http_loopback
        if auth_server.client_id_metadata_document_supported and oauth_client.cimd_usable(
            self.client_id_url, loopback_ok
        ):
            return oauth_client.cimd_registration(
                self.client_id_url, auth_server, self.redirect_uri, loopback_ok
            )
        name = self._registration_name(server, auth_server)
        stored = await self.secrets.get(SecretKind.CLIENT_REGISTRATION, name)
        if stored:
            kept = ClientRegistration(**{**json.loads(stored), "raw": {}})
            if kept.secret_expires_at is None or kept.secret_expires_at - RENEW_BEFORE_EXPIRY > time.time():
                return kept
            log.info(
                "client secret expires soon; registering again", server=server.id, issuer=auth_server.issuer
            )
        registration = await oauth_client.register_client(
            self.fetcher, auth_server, self.redirect_uri, CLIENT_NAME, server.scopes
        )
        record = {k: v for k, v in asdict(registration).items() if k != "raw"}
        await self.secrets.put(SecretKind.CLIENT_REGISTRATION, name, json.dumps(record))
        log.info("registered OAuth client", server=server.id, issuer=auth_server.issuer)
        return registration

    async def forget_registration(self, server: ServerConfig, auth_server: AuthServer) -> None:
        await self.secrets.delete(
            SecretKind.CLIENT_REGISTRATION, self._registration_name(server, auth_server)
        )

    def _registration_name(self, server: ServerConfig, auth_server: AuthServer) -> str:
        return f"{server.id}|{auth_server.issuer}|{self.redirect_uri}"

    async def _static_client(self, server: ServerConfig) -> tuple[str, str | None, str | None] | None:
        stored = await self.secrets.get(SecretKind.STATIC_CLIENT, server.id)
        if stored:
            record = json.loads(stored)
            return record["client_id"], record.get("client_secret"), record.get("auth_method")
        if server.client_id:
            return server.client_id, self.registry.client_secret(server), None
        return None

    # -- token endpoint calls as that client -------------------------------------------

    async def refresh(self, server: ServerConfig, conn: Connection, refresh_token: str) -> TokenResponse:
        """The refresh call for a stored connection (the lifecycle's refresher)."""
        try:
            found = await self.discovery(server)
            registration = await self.client_for(server, found.auth_server)
        except (DiscoveryError, UnsafeURL, FetchError) as exc:
            raise AuthServerUnavailable(str(exc)) from None
        if conn.issuer and found.auth_server.issuer != conn.issuer:
            raise OAuthError("invalid_grant", "the server's authorization server changed")
        try:
            return await oauth_client.refresh(
                self.fetcher, found.auth_server, registration, refresh_token,
                found.resource if server.resource else None,
            )  # fmt: skip
        except OAuthError as exc:
            if exc.error == "invalid_client" and registration.source == "dcr":
                await self.forget_registration(server, found.auth_server)
            raise

    async def revoke(self, server: ServerConfig, token: str, hint: str) -> None:
        """RFC 7009, where the authorization server offers it. A failure is logged:
        forgetting the tokens still protects the user."""
        try:
            found = await self.discovery(server)
            registration = await self.client_for(server, found.auth_server)
            await oauth_client.revoke(self.fetcher, found.auth_server, registration, token, hint)
        except (
            DecryptError,
            DiscoveryError,
            UnsafeURL,
            FetchError,
            OAuthError,
            AuthServerUnavailable,
        ) as exc:
            log.warning("revocation failed; tokens deleted anyway", server=server.id, reason=str(exc))


def _discovery_to_json(found: Discovery) -> str:
    data = asdict(found)
    data["auth_server"]["raw"] = dict(found.auth_server.raw)
    return json.dumps(data)


def _discovery_from_json(raw: str) -> Discovery | None:
    try:
        data = json.loads(raw)
        server = data.pop("auth_server")
        for key in (
            "scopes_supported",
            "token_endpoint_auth_methods_supported",
            "code_challenge_methods_supported",
        ):
            if server.get(key) is not None:
                server[key] = tuple(server[key])
        return Discovery(**{**data, "scopes": tuple(data["scopes"]), "auth_server": AuthServer(**server)})
    except (ValueError, TypeError, KeyError):
        return None
