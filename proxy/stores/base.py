"""The store interface every backend implements.

Stores hold ciphertext only: sealing and opening happen in the layer above
(proxy.registry), so a backend never sees a secret in the clear.
"""

from __future__ import annotations

import abc
from importlib import resources

from proxy.settings import ServerConfig


class StoreUnavailable(RuntimeError):
    """The backing service cannot be reached; callers answer 503, not 500."""


class Store(abc.ABC):
    """Servers added at run time and sealed secrets."""

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StoreUnavailable when the backend does not answer."""

    @abc.abstractmethod
    async def migrate(self) -> list[str]:
        """Apply pending migrations; return the names applied."""

    @abc.abstractmethod
    async def changes(self) -> int:
        """A number that changes whenever another process wrote to the store."""

    @abc.abstractmethod
    async def list_servers(self) -> list[ServerConfig]: ...

    @abc.abstractmethod
    async def put_server(self, server: ServerConfig) -> None: ...

    @abc.abstractmethod
    async def delete_server(self, server_id: str) -> bool:
        """Delete the server and every secret recorded under its id."""

    @abc.abstractmethod
    async def get_secret(self, kind: str, name: str) -> str | None: ...

    @abc.abstractmethod
    async def set_secret(self, kind: str, name: str, ciphertext: str) -> None: ...

    @abc.abstractmethod
    async def delete_secret(self, kind: str, name: str) -> bool: ...

    @abc.abstractmethod
    async def list_secrets(self) -> list[tuple[str, str, str]]:
        """Every (kind, name, ciphertext): what key rotation walks."""


def migrations(backend: str) -> list[tuple[str, str]]:
    """The versioned SQL files for a backend, in order."""
    folder = resources.files("proxy") / "migrations" / backend
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    return [(f.name.removesuffix(".sql"), f.read_text()) for f in files]


def open_store(database_url: str) -> Store:
    if database_url.startswith("sqlite:"):
        from proxy.stores.sqlite import SQLiteStore

        return SQLiteStore.from_url(database_url)
    raise ValueError(
        f"database_url must start with sqlite:/// (got scheme {database_url.split(':', 1)[0]!r})"
    )
