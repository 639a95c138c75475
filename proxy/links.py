"""Signed, expiring links handed to people: connect a server, see one's
connections, open the operator console.

A link is only an invitation: it names the user and server and proves the
proxy made it recently. What binds the flow to one browser is the cookie set
when the link is opened (see connect/routes.py). Where people sign in
(`login_*`), their connections are their home page, `/`, and a link's user
must be the person signed in.
"""

from __future__ import annotations

import re
import time
from urllib.parse import quote, urlencode

from proxy.crypto import Keyring
from proxy.errors import Forbidden
from proxy.names import LINK
from proxy.settings import Settings

# Seconds since 1970, in ASCII digits (str.isdigit also takes "²", which int() refuses).
_EXPIRES = re.compile(r"[0-9]{1,16}")
CONSOLE_PATH = "/admin/console"
# A console link is a credential for every server's settings: it lives minutes, not an hour.
CONSOLE_LINK_TTL = 600.0


class LinkError(Forbidden):
    code = "link_not_usable"
    title = "Link not usable"

    def __init__(self, message: str, next_step: str = "Ask your agent for a fresh link.") -> None:
        super().__init__(message, next_step=next_step)


def _message(kind: str, user: str, server: str, expires: int, scope: str) -> bytes:
    return "\n".join((kind, user, server, str(expires), scope)).encode()


def connect_path(user: str, server: str) -> str:
    return f"/connect/{quote(user, safe='@')}/{server}"


def connections_path(user: str) -> str:
    return f"/connections/{quote(user, safe='@')}"


def connect_url(
    public_url: str, keyring: Keyring, user: str, server: str, ttl: float, scopes: tuple[str, ...] = ()
) -> str:
    expires = int(time.time() + ttl)
    scope = " ".join(scopes)
    query = {"expires": str(expires), **({"scope": scope} if scope else {})}
    query["sig"] = keyring.sign(LINK, _message("connect", user, server, expires, scope))
    return f"{public_url}{connect_path(user, server)}?{urlencode(query)}"


def connections_url(public_url: str, keyring: Keyring, user: str, ttl: float) -> str:
    expires = int(time.time() + ttl)
    sig = keyring.sign(LINK, _message("connections", user, "", expires, ""))
    return f"{public_url}{connections_path(user)}?{urlencode({'expires': expires, 'sig': sig})}"


def console_url(public_url: str, keyring: Keyring, ttl: float = CONSOLE_LINK_TTL) -> str:
    expires = int(time.time() + ttl)
    sig = keyring.sign(LINK, _message("console", "", "", expires, ""))
    return f"{public_url}{CONSOLE_PATH}?{urlencode({'expires': expires, 'sig': sig})}"


class Links:
    """The links this deployment hands out, with its settings and keyring."""

    def __init__(self, settings: Settings, keyring: Keyring) -> None:
        self.settings = settings
        self.keyring = keyring

    def connect(self, user: str, server: str, scopes: tuple[str, ...] = ()) -> str:
        s = self.settings
        return connect_url(s.public_url, self.keyring, user, server, s.connect_link_ttl, scopes)

    def connections(self, user: str) -> str:
        """Where `user` sees their connections: the home page when people sign in, else a signed link."""
        s = self.settings
        if s.signs_in:
            return f"{s.public_url}/"
        return connections_url(s.public_url, self.keyring, user, s.connect_link_ttl)

    def console(self) -> str:
        return console_url(self.settings.public_url, self.keyring)


def verify(keyring: Keyring, kind: str, user: str, server: str, params: dict[str, str]) -> tuple[str, ...]:
    """Check a link's signature and expiry; return the scopes it asks for."""
    expires_raw, sig, scope = params.get("expires", ""), params.get("sig", ""), params.get("scope", "")
    if not _EXPIRES.fullmatch(expires_raw) or not sig:
        raise LinkError("This link is incomplete. Ask your agent for a fresh one.")
    if not keyring.verify(LINK, _message(kind, user, server, int(expires_raw), scope), sig):
        raise LinkError("This link is not valid: it was changed or was not made by this proxy.")
    if int(expires_raw) < time.time():
        raise LinkError(
            "This link has expired. Go back to your agent and retry; it will give you a fresh link."
        )
    return tuple(scope.split())
