"""The servers Keybearer knows, and their API keys, cached for the hot path.

Config-file servers are declarative and win over stored ones with the same
id. Stored servers and sealed API keys are loaded into memory at start and
reloaded when the store reports a change, so resolving a request never waits
on the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from proxy import logs
from proxy.crypto import DecryptError, Keyring
from proxy.settings import ServerConfig
from proxy.stores import Store, StoreUnavailable

log = structlog.get_logger("keybearer.registry")

API_KEY = "api_key"


class RegistryError(ValueError):
    """A change was refused; the message says why."""


@dataclass(frozen=True)
class KeyInfo:
    """What may be shown about an API key: never the key."""

    set: bool
    source: str | None = None
    last4: str | None = None
    length: int | None = None


class Registry:
    def __init__(self, config_servers: Mapping[str, ServerConfig], store: Store, keyring: Keyring) -> None:
        self.config_servers = dict(config_servers)
        self.store = store
        self.keyring = keyring
        self.servers: dict[str, ServerConfig] = dict(config_servers)
        self._stored_keys: dict[str, str] = {}
        # Inbound caller tokens by id (proxy.inbound.ProxyToken), hashes only.
        self.proxy_tokens: dict[str, Any] = {}
        self._file_keys: dict[str, tuple[float, str]] = {}
        # Legacy SSE message endpoints each server has announced.
        self.announced: dict[str, frozenset[str]] = {}
        self._seen_changes: int | None = None
        self._watchers: list[asyncio.Task[None]] = []
        # Called with every token store event, before the registry's own handling.
        self.listeners: list[Callable[[str], None]] = []
        # Loads are serialized, and a load that overlapped a write made here is
        # redone: otherwise what it read before the write would replace it.
        self._loading = asyncio.Lock()
        self._local_writes = 0

    # -- loading -------------------------------------------------------------

    async def load(self) -> None:
        async with self._loading:
            while True:
                writes = self._local_writes
                servers, keys, tokens = await self._read()
                if writes == self._local_writes:
                    break
            self.servers, self._stored_keys, self.proxy_tokens = servers, keys, tokens

    def touched(self) -> None:
        """A write made here was applied to memory: loads in flight read again."""
        self._local_writes += 1

    async def _read(self) -> tuple[dict[str, ServerConfig], dict[str, str], dict[str, Any]]:
        servers = dict(self.config_servers)
        for server in await self.store.list_servers():
            if server.id in self.config_servers:
                log.warning("stored server shadowed by config file", server=server.id)
                continue
            servers[server.id] = server
        from proxy.inbound import KIND as PROXY_TOKEN
        from proxy.inbound import record_from_json

        keys: dict[str, str] = {}
        tokens: dict[str, Any] = {}
        for kind, name, ciphertext in await self.store.list_secrets():
            if kind not in (API_KEY, PROXY_TOKEN):
                continue
            try:
                plain = self.keyring.decrypt(kind, ciphertext, f"{kind}:{name}").decode()
            except DecryptError as exc:
                log.error("stored secret cannot be decrypted", kind=kind, name=name, reason=str(exc))
                continue
            if kind == API_KEY:
                keys[name] = plain
                logs.register_secret(plain)
            else:
                tokens[name] = record_from_json(plain)
        return servers, keys, tokens

    async def start(self, poll_interval: float = 1.0, events: AsyncIterator[str] | None = None) -> None:
        """Load, then follow changes: `events` (pub/sub from other replicas) for
        speed, polling `Store.changes()` as the backstop that cannot miss one."""
        self._seen_changes = await self.store.changes()
        await self.load()
        self._watchers = [asyncio.create_task(self._poll(poll_interval))]
        if events is not None:
            self._watchers.append(asyncio.create_task(self._follow(events)))

    async def stop(self) -> None:
        for task in self._watchers:
            task.cancel()
        for task in self._watchers:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _poll(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                changes = await self.store.changes()
                if changes != self._seen_changes:
                    await self.load()
                    # Only now: a load that failed is retried at the next poll.
                    self._seen_changes = changes
            except StoreUnavailable as exc:
                # Serving goes on from what is cached.
                log.warning("store unavailable; serving from cache", reason=str(exc))
            except Exception as exc:
                # A watcher that died would leave this replica deaf for good.
                log.error("reload failed; serving from cache", error=type(exc).__name__, reason=str(exc))

    async def _follow(self, events: AsyncIterator[str]) -> None:
        async for event in events:
            for listener in self.listeners:
                try:
                    listener(event)
                except Exception as exc:
                    log.error("event listener failed", event=event, error=type(exc).__name__)
            # "resync": the event channel was down and events may have been lost.
            if event not in ("servers", "resync"):
                continue
            try:
                await self.load()
            except StoreUnavailable as exc:
                log.warning("store unavailable; serving from cache", reason=str(exc))
            except Exception as exc:
                log.error("reload failed; serving from cache", error=type(exc).__name__, reason=str(exc))

    # -- reading (hot path) ----------------------------------------------------

    def get(self, server_id: str) -> ServerConfig | None:
        return self.servers.get(server_id)

    def api_key(self, server: ServerConfig) -> str | None:
        """The key to present upstream: env, then file, then the stored one."""
        if server.api_key_env:
            value = _env(server.api_key_env)
            if value:
                return value
        if server.api_key_file:
            value = self._read_key_file(server.api_key_file)
            if value:
                return value
        return self._stored_keys.get(server.id)

    def key_info(self, server: ServerConfig) -> KeyInfo:
        key = self.api_key(server)
        if not key:
            return KeyInfo(set=False)
        source = "stored"
        if server.api_key_env and _env(server.api_key_env):
            source = "env"
        elif server.api_key_file and self._read_key_file(server.api_key_file):
            source = "file"
        return KeyInfo(set=True, source=source, last4=key[-4:] if len(key) >= 12 else None, length=len(key))

    def client_secret(self, server: ServerConfig) -> str | None:
        """A static OAuth client's secret from the config's env or file."""
        if server.client_secret_env:
            return _env(server.client_secret_env)
        if server.client_secret_file:
            return self._read_key_file(server.client_secret_file)
        return None

    def _read_key_file(self, path: str) -> str | None:
        # Kubernetes rewrites mounted Secrets in place: re-read on change.
        try:
            mtime = Path(path).stat().st_mtime
        except OSError:
            return None
        cached = self._file_keys.get(path)
        if cached and cached[0] == mtime:
            return cached[1]
        value = Path(path).read_text().strip()
        logs.register_secret(value)
        self._file_keys[path] = (mtime, value)
        return value

    def note_announced(self, server_id: str, path: str) -> None:
        known = self.announced.get(server_id, frozenset())
        if path not in known:
            self.announced[server_id] = known | {path}

    # -- writing -----------------------------------------------------------------

    async def put_server(self, server: ServerConfig) -> None:
        if server.id in self.config_servers:
            raise RegistryError(
                f"server {server.id!r} is defined in the config file and is read-only at run time"
            )
        await self.store.put_server(server)
        self.servers = {**self.servers, server.id: server}
        self.touched()

    async def delete_server(self, server_id: str) -> bool:
        if server_id in self.config_servers:
            raise RegistryError(
                f"server {server_id!r} is defined in the config file and is read-only at run time"
            )
        deleted = await self.store.delete_server(server_id)
        self.servers = {k: v for k, v in self.servers.items() if k != server_id}
        self._stored_keys = {k: v for k, v in self._stored_keys.items() if k != server_id}
        self.touched()
        return deleted

    async def set_api_key(self, server_id: str, key: str) -> None:
        server = self.servers.get(server_id)
        if server is None:
            raise RegistryError(
                f"no server {server_id!r}; add it to the config file or with `keybearer servers add`"
            )
        if server.auth != "api_key":
            raise RegistryError(f"server {server_id!r} uses auth: {server.auth}, not api_key")
        key = key.strip()
        if not key or any(c in key for c in "\r\n\0") or len(key) > 4096:
            raise RegistryError("the API key must be one line of 1-4096 characters")
        logs.register_secret(key)
        ciphertext = self.keyring.encrypt(API_KEY, key.encode(), f"{API_KEY}:{server_id}")
        await self.store.set_secret(API_KEY, server_id, ciphertext)
        self._stored_keys = {**self._stored_keys, server_id: key}
        self.touched()

    # -- other sealed secrets (OAuth clients), read on the OAuth path only -----------

    async def set_secret(self, kind: str, name: str, plaintext: str) -> None:
        logs.register_secret(plaintext)
        await self.store.set_secret(
            kind, name, self.keyring.encrypt(kind, plaintext.encode(), f"{kind}:{name}")
        )

    async def get_secret(self, kind: str, name: str) -> str | None:
        sealed = await self.store.get_secret(kind, name)
        if sealed is None:
            return None
        return self.keyring.decrypt(kind, sealed, f"{kind}:{name}").decode()

    async def delete_secret(self, kind: str, name: str) -> bool:
        return await self.store.delete_secret(kind, name)

    async def delete_secrets_of(self, kind: str, server_id: str) -> int:
        """Every `kind` secret recorded for the server (`<id>` or `<id>|…`)."""
        names = [n for k, n, _ in await self.store.list_secrets() if k == kind and owned_by(n, server_id)]
        for name in names:
            await self.store.delete_secret(kind, name)
        return len(names)

    async def clear_api_key(self, server_id: str) -> bool:
        if server_id not in self.servers:
            raise RegistryError(f"no server {server_id!r}")
        # The store first: when it fails, the key in use stays in use.
        deleted = await self.store.delete_secret(API_KEY, server_id)
        self._stored_keys = {k: v for k, v in self._stored_keys.items() if k != server_id}
        self.touched()
        return deleted


def owned_by(secret_name: str, server_id: str) -> bool:
    return secret_name == server_id or secret_name.startswith(server_id + "|")


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    if value:
        logs.register_secret(value)
    return value
