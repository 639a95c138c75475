"""Credentials: what a request for (user, server) carries upstream.

One source per auth type, each behind the same two questions:

- `credential(server, user, caller_jwt)`: the header to add, None for nothing,
  or a `KeybearerError` whose answer the agent gets instead (not connected, key
  missing, storage down). `caller_jwt` is the agent's own bearer token when
  inbound auth verified it as a JWT (`inbound_auth: jwt`), else None: only
  identity_assertion uses it (as the subject of its exchange), nobody sends it on;
- `at_hand(server, user)`: the same answer when the source has it without
  waiting (a configured key, a token this process remembers), else `WAIT`:
  what lets the forwarder's lane (forwarding.py) forward without a task;
- `rejected(server, user, refusal)`: the upstream answered 401 or 403 to what
  was sent. A `Credential` means "send the request again with this", an
  `Answer` is what the agent gets, None relays the upstream's own answer.

The forwarder asks the source of the server's `credential_kind` (its auth type,
or `client_credentials` for an oauth server with that grant) and knows nothing more.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from proxy.errors import Answer
from proxy.settings import ServerConfig


@dataclass(frozen=True, slots=True)
class Credential:
    header: bytes  # lower-case header name
    value: bytes


class Wait(enum.Enum):
    """The type of WAIT."""

    WAIT = "wait"


# `at_hand`'s answer when only `credential` can tell: a store read, a refresh, an exchange.
WAIT = Wait.WAIT


def bearer(token: str) -> Credential:
    return Credential(b"authorization", f"Bearer {token}".encode())


@dataclass(frozen=True, slots=True)
class Refusal:
    """An upstream's 401 or 403 to a request that carried `sent`."""

    status: int
    challenges: Sequence[str]  # its WWW-Authenticate values
    sent: Credential | None
    # The request body can be sent again (it was read whole).
    replayable: bool
    # This was already the request sent again, with what `rejected` returned.
    retried: bool = False


class CredentialSource(Protocol):
    async def credential(
        self, server: ServerConfig, user: str, caller_jwt: str | None
    ) -> Credential | None: ...

    def at_hand(self, server: ServerConfig, user: str) -> Credential | Wait | None: ...

    async def rejected(
        self, server: ServerConfig, user: str, refusal: Refusal
    ) -> Credential | Answer | None: ...


def unauthorized(server: ServerConfig, fix: str) -> Answer:
    """The upstream refused a request the proxy could not have made better: the operator must act."""
    return Answer(
        502,
        "upstream_unauthorized",
        f"server {server.id!r} refused the proxy's request as unauthorized (HTTP 401)",
        f"the operator must {fix}",
        data={"server": server.id},
    )
