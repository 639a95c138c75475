"""What operators can do, in one place: the admin API and the CLI both call this.

Every method validates its input before touching a store, so a refused
request changes nothing, and tells every replica about what it changed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any

import structlog

from proxy import inbound, logs
from proxy.connect.clients import server_cache_prefix
from proxy.errors import Conflict, NotFound
from proxy.events import ChangeFeed
from proxy.links import CONSOLE_LINK_TTL, Links
from proxy.names import SERVERS_CHANGED, SERVICE_USER, SecretKind, connection_changed
from proxy.registry import Registry
from proxy.routing import RESERVED
from proxy.sealed import SealedSecrets
from proxy.settings import ID_PATTERN, STATIC_CLIENT_GRANTS, ConfigError, ServerConfig, parse_server
from proxy.stores import Connection, Store, TokenStore
from proxy.upstream_policy import UpstreamPolicy

log = structlog.get_logger("keybearer.management")

# Servers whose tokens no person connects: by grant, who decides instead.
MANAGED_BY = {"identity_assertion": "organisation", "client_credentials": "operator"}


class Management:
    def __init__(
        self,
        registry: Registry,
        store: Store,
        secrets: SealedSecrets,
        tokens: TokenStore,
        feed: ChangeFeed,
        policy: UpstreamPolicy,
        links: Links,
    ) -> None:
        self.registry = registry
        self.store = store
        self.secrets = secrets
        self.tokens = tokens
        self.feed = feed
        self.policy = policy
        self.links = links

    # -- servers -----------------------------------------------------------------

    def describe(self, server: ServerConfig) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": server.id,
            "source": server.source,
            "read_only": server.source == "config",
        }
        out.update(server.to_dict())
        if server.credential_kind in MANAGED_BY:
            # Nobody connects it in a browser: its tokens come as the organisation or the operator allows.
            out["managed_by"] = MANAGED_BY[server.credential_kind]
        if server.auth == "api_key":
            out["api_key"] = asdict(self.registry.key_info(server))
        return out

    def list_servers(self) -> list[dict[str, Any]]:
        return [self.describe(s) for s in sorted(self.registry.servers.values(), key=lambda s: s.id)]

    def server(self, server_id: str) -> ServerConfig:
        server = self.registry.get(server_id)
        if server is None:
            raise NotFound(
                f"no server {server_id!r}",
                next_step="add it to the config file or with `keybearer servers add`",
            )
        return server

    def stored_server(self, server_id: str) -> ServerConfig:
        """A server that may be changed at run time: not one of the config file's."""
        server = self.server(server_id)
        if server.source == "config":
            raise Conflict(f"server {server_id!r} is defined in the config file and is read-only at run time")
        return server

    async def create_server(self, server_id: str, definition: Any) -> ServerConfig:
        server = self._parse(server_id, definition)
        existing = self.registry.get(server_id)
        if existing is not None and existing.source == "config":
            raise Conflict(f"server {server_id!r} is defined in the config file and is read-only at run time")
        if existing is not None:
            raise Conflict(f"server {server_id!r} exists; update it with PUT instead")
        await self.policy.check(server.url, key="server.url")
        await self.store.put_server(server)
        await self._changed()
        return server

    async def update_server(self, server_id: str, definition: Any) -> ServerConfig:
        current = self.stored_server(server_id)
        server = self._parse(server_id, definition)
        await self.policy.check(server.url, key="server.url")
        # A managed server's tokens are bound to its client too (service.py).
        client_changed = server.client_id != current.client_id and server.grant in STATIC_CLIENT_GRANTS
        if server.url != current.url or server.credential_kind != current.credential_kind or client_changed:
            # Tokens were issued for the old resource: they must not reach the new
            # one, so they go first; a failure then leaves the old definition.
            await self.store.ping()
            await self.tokens.delete_server_connections(server_id)
            await self.tokens.cache_delete_prefix(server_cache_prefix(server_id))
        await self.store.put_server(server)
        # Token memory forgets before the new definition is loaded.
        await self._changed(connection_changed(server_id), SERVERS_CHANGED)
        return server

    def _parse(self, server_id: str, definition: Any) -> ServerConfig:
        server = parse_server(server_id, definition, key="server", source="store")
        if server.credential_kind == "identity_assertion" and not self.links.settings.signs_in:
            raise ConfigError(
                "server.grant",
                "identity_assertion exchanges the person's sign-in at the organisation's identity provider, "
                "and people do not sign in on this proxy: set login_issuer and login_client_id first "
                "(docs/enterprise.md)",
            )
        return server

    async def delete_server(self, server_id: str) -> None:
        self.stored_server(server_id)
        # Tokens first: if the server went first and the token store failed, its
        # users' tokens would outlive it and serve a later server of the same id.
        await self.store.ping()
        await self.tokens.delete_server_connections(server_id)
        await self.tokens.cache_delete_prefix(server_cache_prefix(server_id))
        await self.store.delete_server(server_id)
        await self._changed(connection_changed(server_id), SERVERS_CHANGED)

    # -- API keys ------------------------------------------------------------------

    async def set_api_key(self, server_id: str, key: Any) -> None:
        server = self.server(server_id)
        if server.auth != "api_key":
            raise ConfigError("api_key", f"server {server_id!r} uses auth: {server.auth}, not api_key")
        if not isinstance(key, str):
            raise ConfigError("api_key", "must be a string")
        key = key.strip()
        if not key or any(c in key for c in "\r\n\0") or len(key) > 4096:
            raise ConfigError("api_key", "the API key must be one line of 1-4096 characters")
        logs.register_secret(key)
        await self.secrets.put(SecretKind.API_KEY, server_id, key)
        await self._changed()

    async def clear_api_key(self, server_id: str) -> bool:
        self.server(server_id)
        # The store first: when it fails, the key in use stays in use.
        cleared = await self.secrets.delete(SecretKind.API_KEY, server_id)
        await self._changed()
        return cleared

    # -- static OAuth clients ----------------------------------------------------

    async def set_oauth_client(self, server_id: str, body: Any) -> dict[str, Any]:
        server = self.server(server_id)
        if server.auth != "oauth":
            raise ConfigError("auth", f"server {server_id!r} uses auth: {server.auth}, not oauth")
        if not isinstance(body, dict):
            raise ConfigError("body", "must be a JSON object with client_id and optionally client_secret")
        unknown = sorted(set(body) - {"client_id", "client_secret", "auth_method"})
        if unknown:
            raise ConfigError(unknown[0], "unknown field (known: auth_method, client_id, client_secret)")
        client_id = body.get("client_id")
        secret = body.get("client_secret")
        method = body.get("auth_method") or ("client_secret_basic" if secret else "none")
        if not isinstance(client_id, str) or not 0 < len(client_id) <= 512 or not client_id.isprintable():
            raise ConfigError("client_id", "must be a printable string of 1-512 characters")
        if secret is not None and (not isinstance(secret, str) or not 0 < len(secret) <= 4096):
            raise ConfigError("client_secret", "must be a string of 1-4096 characters")
        if method not in ("client_secret_basic", "client_secret_post", "none"):
            raise ConfigError("auth_method", "must be client_secret_basic, client_secret_post or none")
        if method != "none" and not secret:
            raise ConfigError("client_secret", f"is required with auth_method {method}")
        if method == "none" and server.grant in STATIC_CLIENT_GRANTS:
            raise ConfigError(
                "client_secret", f"is required: the {server.grant} grant needs a confidential client"
            )
        record = {"client_id": client_id, "client_secret": secret, "auth_method": method}
        await self.secrets.put(SecretKind.STATIC_CLIENT, server_id, json.dumps(record))
        # A new client makes earlier dynamic registrations irrelevant.
        await self.secrets.delete_owned_by(SecretKind.CLIENT_REGISTRATION, server_id)
        await self._client_changed(server)
        return self.oauth_client_info(server_id, record)

    async def oauth_client(self, server_id: str) -> dict[str, Any]:
        self.server(server_id)
        raw = await self.secrets.get(SecretKind.STATIC_CLIENT, server_id)
        return self.oauth_client_info(server_id, json.loads(raw) if raw else None)

    @staticmethod
    def oauth_client_info(server_id: str, record: dict[str, Any] | None) -> dict[str, Any]:
        if not record:
            return {"server": server_id, "set": False}
        return {
            "server": server_id,
            "set": True,
            "client_id": record["client_id"],
            "auth_method": record["auth_method"],
            "client_secret_set": bool(record.get("client_secret")),
        }

    async def clear_oauth_client(self, server_id: str) -> bool:
        server = self.server(server_id)
        cleared = await self.secrets.delete(SecretKind.STATIC_CLIENT, server_id)
        await self._client_changed(server)
        return cleared

    async def _client_changed(self, server: ServerConfig) -> None:
        """The tokens of a client_credentials or identity_assertion server (and
        recorded refusals) belonged to the old client: the next request asks as the
        new one, at once. (A token that survived this, a failed delete or a config
        restart with a new client_id, is dropped at its next use: service.py.)"""
        if server.credential_kind == "client_credentials":
            await self.tokens.delete_connection(SERVICE_USER, server.id)
            return await self._changed(SERVERS_CHANGED, connection_changed(server.id, SERVICE_USER))
        if server.credential_kind == "identity_assertion":
            await self.tokens.delete_server_connections(server.id)
            return await self._changed(SERVERS_CHANGED, connection_changed(server.id))
        await self._changed()

    # -- connections ---------------------------------------------------------------

    async def connections(self, server_id: str) -> list[dict[str, Any]]:
        self.server(server_id)
        return [
            connection_info(c)
            for c in sorted(await self.tokens.list_connections(server_id), key=lambda c: c.user)
        ]

    async def delete_connection(self, server_id: str, user: str) -> bool:
        self.server(server_id)
        deleted = await self.tokens.delete_connection(user, server_id)
        await self._changed(connection_changed(server_id, user))
        return deleted

    async def reset(self, server_id: str) -> dict[str, int]:
        """Wipe a server's whole OAuth state: tokens, registrations, cached metadata."""
        self.server(server_id)
        await self.store.ping()
        connections = await self.tokens.delete_server_connections(server_id)
        cached = await self.tokens.cache_delete_prefix(server_cache_prefix(server_id))
        registrations = await self.secrets.delete_owned_by(SecretKind.CLIENT_REGISTRATION, server_id)
        await self._changed(connection_changed(server_id), SERVERS_CHANGED)
        return {"connections": connections, "registrations": registrations, "cache_entries": cached}

    # -- links for people and operators ----------------------------------------------------

    def person_links(self, user: Any, server_id: Any = None) -> dict[str, Any]:
        """A person's connections link and, for an OAuth server, a connect link: for
        deployments where people do not sign in (with sign-in, connections are at `/`)."""
        if not isinstance(user, str) or not ID_PATTERN.fullmatch(user) or user.lower() in RESERVED:
            raise ConfigError(
                "user",
                "must be a user id: 1-128 letters, digits, '.', '_', '@' and '-', not a name the proxy uses",
            )
        out: dict[str, Any] = {"user": user, "connections_url": self.links.connections(user)}
        if server_id is not None:
            if not isinstance(server_id, str):
                raise ConfigError("server", "must be a server id")
            server = self.server(server_id)
            if server.auth != "oauth":
                raise ConfigError(
                    "server",
                    f"server {server_id!r} uses auth: {server.auth}; people connect only oauth servers",
                )
            out.update(server=server.id, connect_url=self.links.connect(user, server.id))
        out["expires_at"] = int(time.time() + self.links.settings.connect_link_ttl)
        return out

    def console_link(self) -> dict[str, Any]:
        """A short-lived link to the operator console, for whoever holds the admin token or the config."""
        return {"console_url": self.links.console(), "expires_at": int(time.time() + CONSOLE_LINK_TTL)}

    # -- inbound caller tokens -----------------------------------------------------------

    async def create_token(self, users: Any, label: Any = "") -> tuple[str, dict[str, Any]]:
        """A new caller token, shown this once; only its hash is kept."""
        if not isinstance(users, list):
            raise ConfigError("users", "must be a list of user ids")
        try:
            value, record = inbound.new_token(users, label if label is not None else "")
        except ValueError as exc:
            raise ConfigError("users", str(exc)) from None
        await self.secrets.put(SecretKind.CALLER_TOKEN, record.id, inbound.record_json(record))
        await self._changed()
        return value, record.public()

    async def list_tokens(self) -> list[dict[str, Any]]:
        stored = await self.secrets.all(SecretKind.CALLER_TOKEN)
        records = sorted((inbound.record_from_json(raw) for raw in stored.values()), key=lambda t: t.created)
        return [t.public() for t in records]

    async def revoke_token(self, token_id: str) -> None:
        if not await self.secrets.delete(SecretKind.CALLER_TOKEN, token_id):
            raise NotFound(f"no caller token {token_id!r}")
        await self._changed()

    async def _changed(self, *events: str) -> None:
        """Every replica, this one first, reloads what the write changed."""
        await self.feed.announce(*(events or (SERVERS_CHANGED,)))


def connection_info(c: Connection) -> dict[str, Any]:
    return {
        "user": c.user,
        "server": c.server,
        "state": c.state,
        "issuer": c.issuer,
        "scopes": list(c.scopes),
        "expires_at": c.expires_at,
        # False: the provider gave no refresh token; reconnect once expires_at passes.
        "refreshable": c.refreshable,
        "obtained_at": c.obtained_at,
        "last_error": c.last_error,
    }
