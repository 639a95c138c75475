"""`keybearer keys rotate`: re-seal every stored secret and token with the current salt.

The procedure (docs/operations.md): give every replica the new
`KEYBEARER_SALT` with the old one in `KEYBEARER_SALT_PREVIOUS`, run this, then
drop the old salt. Each value is swapped only if it is still the one that was
read (compare-and-set), so a write made meanwhile by a replica is never
overwritten; such a value is already sealed with the current salt anyway.
Running it again resumes: what is already current is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import structlog

from proxy.connect.lifecycle import record as token_record
from proxy.crypto import DecryptError
from proxy.names import OAUTH_TOKEN as TOKENS
from proxy.registry import Registry
from proxy.stores import Store, TokenStore

log = structlog.get_logger("keybearer.rotation")


@dataclass
class RotationReport:
    secrets_resealed: int = 0
    tokens_resealed: int = 0
    already_current: int = 0
    changed_meanwhile: int = 0
    failed: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (
            f"re-encrypted {self.secrets_resealed} secret(s) and {self.tokens_resealed} token set(s); "
            f"{self.already_current} already current, {self.changed_meanwhile} rewritten meanwhile by a replica"
        )
        if self.failed:
            text += f"; {len(self.failed)} could not be decrypted: {', '.join(self.failed)}"
        return text


async def rotate(registry: Registry, store: Store, tokens: TokenStore) -> RotationReport:
    report = RotationReport()
    keyring = registry.secrets.keyring
    for kind, name, sealed in await store.list_secrets():
        if keyring.is_current(kind, sealed):
            report.already_current += 1
            continue
        try:
            plain = keyring.decrypt(kind, sealed, f"{kind}:{name}")
        except DecryptError:
            report.failed.append(f"{kind}:{name}")
            continue
        resealed = keyring.encrypt(kind, plain, f"{kind}:{name}")
        if await store.replace_secret(kind, name, sealed, resealed):
            report.secrets_resealed += 1
        else:
            report.changed_meanwhile += 1

    servers = set(registry.servers)
    for server in sorted(servers):
        for conn in await tokens.list_connections(server):
            if conn.sealed is None or keyring.is_current(TOKENS, conn.sealed):
                report.already_current += 1
                continue
            record = token_record(conn.user, conn.server)
            try:
                plain = keyring.decrypt(TOKENS, conn.sealed, record)
            except DecryptError:
                report.failed.append(record)
                continue
            fresh = replace(conn, sealed=keyring.encrypt(TOKENS, plain, record), version=conn.version + 1)
            if await tokens.put_connection(fresh, expected_version=conn.version):
                report.tokens_resealed += 1
            else:
                report.changed_meanwhile += 1
    log.info("key rotation", **report.__dict__)
    return report
