"""The servers Keybearer knows, and their API keys, held in memory for the hot path.

Config-file servers are declarative and win over stored ones with the same
id. Stored servers and sealed API keys are loaded at start and again on every
SERVERS_CHANGED event (events.ChangeFeed), so resolving a request never waits
on the store. Writes are management.py's; this module only reads.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from proxy import logs
from proxy.bounded import BoundedMap
from proxy.names import RESYNC, SERVERS_CHANGED, Event, SecretKind
from proxy.sealed import SealedSecrets
from proxy.settings import ServerConfig
from proxy.stores import Store

# Key files whose contents are kept (by path, re-read when they change).
MAX_KEY_FILES = 4096

log = structlog.get_logger("keybearer.registry")


@dataclass(frozen=True)
class KeyInfo:
    """What may be shown about an API key: never the key."""

    set: bool
    source: str | None = None
    last4: str | None = None
    length: int | None = None


class Registry:
    def __init__(
        self, config_servers: Mapping[str, ServerConfig], store: Store, secrets: SealedSecrets
    ) -> None:
        self.config_servers = dict(config_servers)
        self.store = store
        self.secrets = secrets
        self.servers: dict[str, ServerConfig] = dict(config_servers)
        self._stored_keys: dict[str, str] = {}
        self._file_keys: BoundedMap[str, tuple[float, str]] = BoundedMap(MAX_KEY_FILES)
        # Loads are serialized: the last one to finish read after the last write.
        self._loading = asyncio.Lock()

    async def load(self) -> None:
        async with self._loading:
            servers = dict(self.config_servers)
            for server in await self.store.list_servers():
                if server.id in self.config_servers:
                    log.warning("stored server shadowed by config file", server=server.id)
                    continue
                servers[server.id] = server
            keys = await self.secrets.all(SecretKind.API_KEY)
            logs.register_secrets(keys.values())
            self.servers, self._stored_keys = servers, keys

    async def on_event(self, event: Event) -> None:
        if event.kind in (SERVERS_CHANGED, RESYNC):
            await self.load()

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

    def client_private_key(self, server: ServerConfig) -> str | None:
        """The PEM private key of a client_credentials server's private_key_jwt client."""
        return self._read_key_file(server.client_private_key_file) if server.client_private_key_file else None

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


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    if value:
        logs.register_secret(value)
    return value
