"""Credential resolution: what a request for (user, server) carries upstream.

`none` adds nothing; `api_key` adds the server's key in the configured
header; `oauth` uses the user's stored tokens, through oauth/lifecycle.py,
which refreshes them when due.
A missing credential is an error that tells the agent which server and what
has to happen next.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.registry import Registry
from proxy.settings import ServerConfig


class CredentialUnavailable(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Credential:
    header: bytes  # lower-case header name
    value: bytes


def resolve(server: ServerConfig, user: str, registry: Registry) -> Credential | None:
    if server.auth == "none":
        return None
    if server.auth == "api_key":
        return api_key_credential(server, registry)
    # OAuth servers are resolved per request by oauth.lifecycle (forwarding calls it).
    raise ValueError(f"server {server.id!r} uses OAuth: its credential comes from oauth.lifecycle")


def bearer(token: str) -> Credential:
    return Credential(b"authorization", f"Bearer {token}".encode())


def api_key_credential(server: ServerConfig, registry: Registry) -> Credential:
    key = registry.api_key(server)
    if not key:
        where = f"set the environment variable {server.api_key_env}" if server.api_key_env else ""
        if server.api_key_file:
            where = f"put the key in {server.api_key_file}"
        hint = f"{where}, or run" if where else "run"
        raise CredentialUnavailable(
            503,
            "api_key_missing",
            f"server {server.id!r} needs an API key and none is configured; "
            f"the operator must {hint} `keybearer api-key set {server.id}`",
        )
    value = f"{server.api_key_scheme} {key}" if server.api_key_scheme else key
    return Credential(server.api_key_header.lower().encode(), value.encode())
