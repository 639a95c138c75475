"""Secrets by (kind, name), sealed before they reach the store.

The store only ever sees ciphertext; `kind:name` is bound in as associated
data, so a value moved to another row fails to open.
"""

from __future__ import annotations

import structlog

from proxy import logs
from proxy.crypto import DecryptError, Keyring
from proxy.names import SecretKind, secret_owned_by
from proxy.stores import Store

log = structlog.get_logger("keybearer.secrets")


class SealedSecrets:
    def __init__(self, store: Store, keyring: Keyring) -> None:
        self.store = store
        self.keyring = keyring

    async def get(self, kind: SecretKind, name: str) -> str | None:
        sealed = await self.store.get_secret(kind, name)
        if sealed is None:
            return None
        return self.keyring.decrypt(kind, sealed, f"{kind}:{name}").decode()

    async def put(self, kind: SecretKind, name: str, plaintext: str) -> None:
        logs.register_secret(plaintext)
        await self.store.set_secret(
            kind, name, self.keyring.encrypt(kind, plaintext.encode(), f"{kind}:{name}")
        )

    async def delete(self, kind: SecretKind, name: str) -> bool:
        return await self.store.delete_secret(kind, name)

    async def all(self, kind: SecretKind) -> dict[str, str]:
        """Every secret of `kind` by name; one that cannot be opened is logged and left out."""
        found: dict[str, str] = {}
        for row_kind, name, sealed in await self.store.list_secrets():
            if row_kind != kind:
                continue
            try:
                found[name] = self.keyring.decrypt(kind, sealed, f"{kind}:{name}").decode()
            except DecryptError as exc:
                log.error("stored secret cannot be decrypted", kind=kind, name=name, reason=str(exc))
        return found

    async def delete_owned_by(self, kind: SecretKind, server_id: str) -> int:
        """Every `kind` secret recorded for the server (`<id>` or `<id>|…`)."""
        names = [
            n for k, n, _ in await self.store.list_secrets() if k == kind and secret_owned_by(n, server_id)
        ]
        for name in names:
            await self.store.delete_secret(kind, name)
        return len(names)
