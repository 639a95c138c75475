"""Names that more than one module, and more than one replica, must spell the same way.

Secret kinds name what a sealed value is: the keyring derives one key per kind,
and the secrets table files rows under it. Events are the messages replicas
send each other on the token store's channel; `parse_event` is the one reader.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class SecretKind(StrEnum):
    """Rows of the secrets table, sealed under a key of their own kind."""

    API_KEY = "api_key"
    # A static OAuth client an operator stored: id, secret, authentication method.
    STATIC_CLIENT = "client_secret"
    # A client the proxy registered itself (RFC 7591), per server, issuer and redirect URI.
    CLIENT_REGISTRATION = "client_registration"
    # An inbound caller token: only the hash of its secret.
    CALLER_TOKEN = "proxy_token"


# The user a client_credentials server's one token is stored under, in the
# token store like a person's connection. It cannot be a person's: user ids
# start with a letter or digit and have no '~' (settings.ID_PATTERN), so no
# path, link or API call can name it; like every id it has no ':', which
# separates the parts of token store keys and events.
SERVICE_USER = "~service"

# Sealed values kept elsewhere than the secrets table.
OAUTH_TOKEN = "oauth_token"  # a user's token set, in the token store
PENDING_STATE = "state"  # an authorization in progress, under its `state`
LINK = "link"  # signing key of links and CSRF tokens, never encrypting
SESSION = "session"  # a browser session: its cookie and its record in the token store

KEY_PURPOSES: tuple[str, ...] = (*SecretKind, OAUTH_TOKEN, PENDING_STATE, LINK, SESSION)

# The secrets that belong to a server and go with it when it is deleted. Caller
# tokens have names of their own, which may equal a server id.
SERVER_SECRET_KINDS: tuple[SecretKind, ...] = (
    SecretKind.API_KEY,
    SecretKind.STATIC_CLIENT,
    SecretKind.CLIENT_REGISTRATION,
)


def secret_owned_by(name: str, server_id: str) -> bool:
    """Server-bound secrets are named `<server>` or `<server>|…`."""
    return name == server_id or name.startswith(server_id + "|")


# -- events --------------------------------------------------------------------------

SERVERS_CHANGED = "servers"  # server definitions or stored secrets changed: reload them
RESYNC = "resync"  # the channel was down and events may have been lost: forget what was cached
ALL_USERS = "*"


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # SERVERS_CHANGED, RESYNC or "connection"
    server: str | None = None
    user: str | None = None  # ALL_USERS for every user of `server`

    def touches(self, user: str, server: str) -> bool:
        """Does this event make what is cached for (user, server) stale?"""
        if self.kind == RESYNC:
            return True
        return self.kind == "connection" and self.server == server and self.user in (user, ALL_USERS)


def connection_changed(server_id: str, user: str = ALL_USERS) -> str:
    """The event every replica gets when a user's tokens for a server changed.
    Ids cannot contain ':' (settings.ID_PATTERN), so the event splits cleanly."""
    return f"connection:{server_id}:{user}"


def parse_event(text: str) -> Event | None:
    """The event a message names, or None for one this version does not know."""
    if text in (SERVERS_CHANGED, RESYNC):
        return Event(text)
    kind, _, rest = text.partition(":")
    server, _, user = rest.partition(":")
    if kind == "connection" and server and user:
        return Event(kind, server, user)
    return None
