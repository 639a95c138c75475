"""The proxy as an OAuth client at each server's authorization server.

For a server: its authorization metadata (discovered, cached in process and in
the token store), the client the proxy is there (a static client the operator
set, the proxy's Client ID Metadata Document, or a dynamic registration,
stored sealed and reused), and the token endpoint calls made as that client.
Both the connect flow (flow.py) and the token lifecycle (lifecycle.py) use it;
it uses neither.

Static clients and registrations are few and change rarely: every replica
holds them all in memory (loaded at start, reloaded on `servers` and `resync`
events, which a registration made here announces), so that refreshes go on
while the database is down.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace

import structlog

from proxy.bounded import BoundedMap
from proxy.crypto import DecryptError
from proxy.errors import Unavailable
from proxy.events import ChangeFeed
from proxy.names import ALL_USERS, RESYNC, SERVERS_CHANGED, Event, SecretKind, secret_owned_by
from proxy.oauth import client as oauth_client
from proxy.oauth.client import (
    AssertionKey,
    AuthServerUnavailable,
    ClientRegistration,
    OAuthError,
    TokenResponse,
)
from proxy.oauth.discovery import AuthServer, Discovery, DiscoveryError, discover, probe_challenge
from proxy.oauth.fetch import Fetcher, FetchError, UnsafeURL
from proxy.registry import Registry
from proxy.sealed import SealedSecrets
from proxy.settings import ServerConfig, Settings
from proxy.stores import Connection, TokenStore

log = structlog.get_logger("keybearer.oauth")

CLIENT_METADATA_PATH = "/oauth/client-metadata.json"
CLIENT_NAME = "Keybearer MCP proxy"
# How long a replica waits for another one's dynamic registration.
REGISTRATION_WAIT = 15.0
# A stored registration whose secret expires sooner than this is registered
# again: longer than a sign-in may take (flow.STATE_TTL), so that one begun
# with a registration can finish with it.
RENEW_BEFORE_EXPIRY = 900.0
# The secrets every replica keeps in memory: what a refresh needs from the database.
CLIENT_KINDS = (SecretKind.STATIC_CLIENT, SecretKind.CLIENT_REGISTRATION)
# Servers whose discovered metadata is kept in memory; past that it is read from the token store.
MAX_DISCOVERIES = 4096


def discovery_cache_key(server: ServerConfig) -> str:
    """Bound to the server's url: what was found for one address is never used for another."""
    return f"oauth:{server.id}:discovery:{hashlib.sha256(server.url.encode()).hexdigest()[:16]}"


def server_cache_prefix(server_id: str) -> str:
    """Every token-store cache entry that belongs to a server."""
    return f"oauth:{server_id}:"


class ServiceClientUnusable(Unavailable):
    """A client_credentials server's client has no usable secret or key: the operator must act."""

    code = "service_client_unusable"


@dataclass(frozen=True)
class ServiceGrant:
    """A token issued to a client_credentials server's own client."""

    issued: TokenResponse
    issuer: str
    client_id: str
    scopes: tuple[str, ...]  # asked for


class OAuthClients:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        secrets: SealedSecrets,
        tokens: TokenStore,
        fetcher: Fetcher,
        feed: ChangeFeed,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.secrets = secrets
        self.tokens = tokens
        self.fetcher = fetcher
        self.feed = feed
        self.redirect_uri = settings.public_url + settings.callback_path
        # The document's URL is its client id: the proxy's own path, unless the
        # operator hosts the document elsewhere.
        self.client_id_url = settings.client_metadata_url or settings.public_url + CLIENT_METADATA_PATH
        # server id -> (until, the url it was found for, what was found)
        self._discoveries: BoundedMap[str, tuple[float, str, Discovery]] = BoundedMap(MAX_DISCOVERIES)
        # One discovery at a time per server and url: a refresh storm of many users
        # would otherwise probe the server and fetch its metadata once per user.
        self._discovering: dict[tuple[str, str], asyncio.Task[Discovery]] = {}
        # kind -> name -> value: every static client and registration (see load)
        self._known: dict[SecretKind, dict[str, str]] | None = None

    async def load(self) -> None:
        """Read every static client and registration. On failure what was known stays."""
        self._known = {kind: await self.secrets.all(kind) for kind in CLIENT_KINDS}

    async def _clients(self, kind: SecretKind) -> dict[str, str]:
        if self._known is None:
            await self.load()
        assert self._known is not None
        return self._known[kind]

    # -- discovery -------------------------------------------------------------------

    async def discovery(self, server: ServerConfig, *, fresh: bool = False) -> Discovery:
        """The server's authorization metadata, cached in-process and in the token store."""
        now = time.time()
        cached = self._discoveries.get(server.id)
        if cached and cached[0] > now and cached[1] == server.url and not fresh:
            return cached[2]
        key = (server.id, server.url)
        running = self._discovering.get(key)
        if running is None or fresh:
            # A task, so that a caller that gives up does not end it for the others.
            running = asyncio.ensure_future(self._discover(server, fresh, now))
            self._discovering[key] = running
            running.add_done_callback(functools.partial(self._discovered, key))
        return await asyncio.shield(running)

    def _discovered(self, key: tuple[str, str], task: asyncio.Task[Discovery]) -> None:
        if self._discovering.get(key) is task:
            del self._discovering[key]
        if not task.cancelled():
            task.exception()  # its callers have it; retrieved here when all of them gave up

    async def _discover(self, server: ServerConfig, fresh: bool, now: float) -> Discovery:
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

    async def on_event(self, event: Event) -> None:
        """A reset or a changed definition ends what was discovered for the server;
        stored secrets that changed are read again."""
        if event.kind == RESYNC:
            self._discoveries.clear()
        elif event.kind == "connection" and event.user == ALL_USERS and event.server:
            self._discoveries.pop(event.server, None)
        if event.kind in (SERVERS_CHANGED, RESYNC):
            await self.load()

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
        return await self._registered(server, auth_server)

    async def _registered(self, server: ServerConfig, auth_server: AuthServer) -> ClientRegistration:
        """The stored dynamic registration, made once: replicas that start at once wait
        for the one that registers instead of each registering a client of its own
        (the connections made with a client overwritten in the store could not refresh)."""
        name = self._registration_name(server, auth_server)
        known = await self._clients(SecretKind.CLIENT_REGISTRATION)
        kept = self._unexpired(server, auth_server, known.get(name))
        if kept is not None:
            return kept
        deadline = time.monotonic() + REGISTRATION_WAIT
        while True:
            # Not known here yet, or expiring: another replica may have registered moments ago.
            stored = await self.secrets.get(SecretKind.CLIENT_REGISTRATION, name)
            kept = self._unexpired(server, auth_server, stored)
            if stored and kept is not None:
                known[name] = stored
                return kept
            lock = await self.tokens.acquire_lock(f"register:{name}", REGISTRATION_WAIT)
            if lock is not None:
                break
            if time.monotonic() > deadline:
                raise AuthServerUnavailable(
                    f"another replica is registering with {auth_server.issuer}; retry"
                )
            await asyncio.sleep(0.2)
        try:
            stored = await self.secrets.get(SecretKind.CLIENT_REGISTRATION, name)
            kept = self._unexpired(server, auth_server, stored)
            if stored and kept is not None:
                known[name] = stored
                return kept
            registration = await oauth_client.register_client(
                self.fetcher, auth_server, self.redirect_uri, CLIENT_NAME, server.scopes
            )
            record = json.dumps({k: v for k, v in asdict(registration).items() if k != "raw"})
            await self.secrets.put(SecretKind.CLIENT_REGISTRATION, name, record)
            known[name] = record
            await self.feed.announce(SERVERS_CHANGED)
            log.info("registered OAuth client", server=server.id, issuer=auth_server.issuer)
            return registration
        finally:
            await self.tokens.release_lock(f"register:{name}", lock)

    @staticmethod
    def _unexpired(
        server: ServerConfig, auth_server: AuthServer, stored: str | None
    ) -> ClientRegistration | None:
        """A stored registration, unless its secret expires soon."""
        if not stored:
            return None
        kept = _registration_from_json(stored)
        if kept.secret_expires_at is None or kept.secret_expires_at - RENEW_BEFORE_EXPIRY > time.time():
            return kept
        log.info("client secret expires soon; registering again", server=server.id, issuer=auth_server.issuer)
        return None

    async def client_for_connection(
        self, server: ServerConfig, auth_server: AuthServer, conn: Connection
    ) -> ClientRegistration:
        """The client the connection's tokens were issued to. A refresh by any other
        client fails (`invalid_grant`): after a new public_url (a new redirect URI,
        so a new registration) or a re-registration, earlier connections refresh
        with the registration they were made with, while it is still stored."""
        current = await self.client_for(server, auth_server)
        if not conn.client_id or current.client_id == conn.client_id:
            return current
        for name, raw in (await self._clients(SecretKind.CLIENT_REGISTRATION)).items():
            if secret_owned_by(name, server.id):
                earlier = _registration_from_json(raw)
                if earlier.client_id == conn.client_id and earlier.issuer == auth_server.issuer:
                    return earlier
        return current  # the authorization server decides

    async def forget_registration(self, server: ServerConfig, auth_server: AuthServer) -> None:
        name = self._registration_name(server, auth_server)
        await self.secrets.delete(SecretKind.CLIENT_REGISTRATION, name)
        (await self._clients(SecretKind.CLIENT_REGISTRATION)).pop(name, None)
        await self.feed.announce(SERVERS_CHANGED)

    def _registration_name(self, server: ServerConfig, auth_server: AuthServer) -> str:
        return f"{server.id}|{auth_server.issuer}|{self.redirect_uri}"

    async def _static_client(self, server: ServerConfig) -> tuple[str, str | None, str | None] | None:
        stored = await self._stored_client(server)
        if stored is not None:
            return stored
        if server.client_id:
            return server.client_id, self.registry.client_secret(server), None
        return None

    async def _stored_client(self, server: ServerConfig) -> tuple[str, str | None, str | None] | None:
        """The static client set by `keybearer oauth-client set`: id, secret, auth method."""
        stored = (await self._clients(SecretKind.STATIC_CLIENT)).get(server.id)
        if not stored:
            return None
        record = json.loads(stored)
        return record["client_id"], record.get("client_secret"), record.get("auth_method")

    async def service_client_id(self, server: ServerConfig) -> str:
        """The id of the client service_client asks as: a token obtained as any other is not used."""
        stored = await self._stored_client(server)
        return stored[0] if stored is not None else server.client_id or ""

    async def service_client(self, server: ServerConfig, auth_server: AuthServer) -> ClientRegistration:
        """The client a client_credentials server's token is asked for as: the one
        stored with `oauth-client set`, else the config's client_id with its
        private key or secret. ServiceClientUnusable when it has neither."""
        stored = await self._stored_client(server)
        if stored is None and server.client_private_key_file:
            return oauth_client.key_registration(
                auth_server, server.client_id or "", self._assertion_key(server)
            )
        if stored is not None:
            client_id, secret, method = stored
        else:
            client_id, secret, method = server.client_id or "", self._config_secret(server), None
        if not secret:
            raise ServiceClientUnusable(_no_secret(server), server=server.id)
        registration = oauth_client.static_registration(auth_server, client_id, secret, self.redirect_uri)
        return registration if method is None else replace(registration, auth_method=method)

    def _config_secret(self, server: ServerConfig) -> str | None:
        try:
            return self.registry.client_secret(server)
        except OSError as exc:
            raise ServiceClientUnusable(
                f"the client secret file {server.client_secret_file} of server {server.id!r} cannot be "
                f"read ({exc.strerror}); the operator must fix it",
                server=server.id,
            ) from None

    def _assertion_key(self, server: ServerConfig) -> AssertionKey:
        try:
            pem = self.registry.client_private_key(server)
        except OSError as exc:
            raise _key_problem(server, f"cannot be read ({exc.strerror})") from None
        if not pem:
            raise _key_problem(server, "is missing or empty")
        try:
            return AssertionKey.from_pem(pem, server.client_key_id, server.client_assertion_audience)
        except ValueError as exc:
            raise _key_problem(server, f"holds no usable key: {exc}") from None

    # -- token endpoint calls as that client -------------------------------------------

    async def refresh(
        self,
        server: ServerConfig,
        conn: Connection,
        refresh_token: str,
        before_call: Callable[[], Awaitable[None]],
    ) -> TokenResponse:
        """The refresh call for a stored connection (the lifecycle's refresher).
        `before_call` runs right before the token request and may stop it by raising."""
        try:
            found = await self.discovery(server)
            registration = await self.client_for_connection(server, found.auth_server, conn)
        except (DiscoveryError, UnsafeURL, FetchError) as exc:
            raise AuthServerUnavailable(str(exc)) from None
        if conn.issuer and found.auth_server.issuer != conn.issuer:
            raise OAuthError("invalid_grant", "the server's authorization server changed")
        await before_call()
        try:
            return await oauth_client.refresh(
                self.fetcher, found.auth_server, registration, refresh_token,
                found.resource if server.resource else None,
            )  # fmt: skip
        except OAuthError as exc:
            if exc.error == "invalid_client" and registration.source == "dcr":
                await self.forget_registration(server, found.auth_server)
            raise

    async def client_credentials(self, server: ServerConfig) -> ServiceGrant:
        """A token for a client_credentials server, asked for as its own client
        with the scopes and resource the code flow would ask for."""
        try:
            found = await self.discovery(server)
        except (DiscoveryError, UnsafeURL, FetchError) as exc:
            raise AuthServerUnavailable(str(exc)) from None
        registration = await self.service_client(server, found.auth_server)
        scopes = found.scopes or server.scopes
        issued = await oauth_client.client_credentials(
            self.fetcher, found.auth_server, registration, scopes, found.resource if server.resource else None
        )
        return ServiceGrant(issued, found.auth_server.issuer, registration.client_id, scopes)

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


def _registration_from_json(raw: str) -> ClientRegistration:
    return ClientRegistration(**{**json.loads(raw), "raw": {}})


def _key_problem(server: ServerConfig, why: str) -> ServiceClientUnusable:
    return ServiceClientUnusable(
        f"the private key file {server.client_private_key_file} of server {server.id!r} {why}; "
        "the operator must fix it",
        server=server.id,
    )


def _no_secret(server: ServerConfig) -> str:
    if server.client_secret_env:
        where = f"set the environment variable {server.client_secret_env}"
    elif server.client_secret_file:
        where = f"put the secret in {server.client_secret_file}"
    else:
        where = "set client_secret_env, client_secret_file or client_private_key_file in its config"
    return (
        f"server {server.id!r} uses the {server.grant} grant and its client has no secret; "
        f"the operator must {where}, or run `keybearer oauth-client set {server.id}`"
    )


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
