"""Which request goes where: `/<user>/<server>[/<path>]` and its upstream URL.

The raw path is read, never the decoded one, so that `%2F` or `%2e%2e` can
not smuggle a second segment or a dot segment past validation.

`/<user>/<server>/mcp` is the MCP endpoint too, for clients that insist on a
URL ending in `/mcp` (the MCP Inspector's CLI replaces any other path with
`/mcp`). It is that and nothing else: a server cannot open an upstream `/mcp`
in its `paths` (settings.py refuses it), and a legacy SSE server that announces
`/mcp` as its message endpoint is refused (legacy_sse.py), so the form never
means two things.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.errors import InvalidInput
from proxy.settings import ID_PATTERN, MCP_ALIAS, SERVER_ID_PATTERN, ServerConfig

# First path segments the proxy answers itself; refused as user ids so that no
# user's traffic can ever be confused with them.
RESERVED = frozenset(
    {
        "admin", "api", "callback", "connect", "connections", "health", "healthz", "login",
        "logout", "metrics", "oauth", "oauth2", "ping", "ready", "static", "well-known",
        "favicon.ico", "robots.txt", "keybearer", "client-metadata.json",
    }
)  # fmt: skip


class RouteError(InvalidInput):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message, status=status, code=code)


# Not frozen: a frozen dataclass sets each field through object.__setattr__, which made
# building one the costliest step of parsing a route.
@dataclass(slots=True)
class Route:
    user: str
    server_id: str
    # The upstream path below the server's origin, or "" for the MCP endpoint.
    subpath: str


# An agent's usual path, a valid user and server and the endpoint, in one match; every
# other path takes the checks of _parse one at a time, each with its own error.
_ENDPOINT = re.compile(rf"/({ID_PATTERN.pattern})/({SERVER_ID_PATTERN.pattern})(?:/|{re.escape(MCP_ALIAS)})?")


def parse(raw_path: bytes) -> Route:
    """Split and validate `/<user>/<server>[/<subpath>]`; `/mcp` is the endpoint."""
    try:
        path = raw_path.decode("ascii")
    except UnicodeDecodeError:
        raise RouteError(400, "invalid_path", "the path must be ASCII") from None
    endpoint = _ENDPOINT.fullmatch(path)
    if endpoint is not None and endpoint[1].lower() not in RESERVED:
        return Route(endpoint[1], endpoint[2], "")
    return _parse(path)


def _parse(path: str) -> Route:
    parts = path.split("/", 3)
    if len(parts) < 3 or parts[0] != "":
        raise RouteError(404, "not_found", "use /<user>/<server> to reach an MCP server")
    user, server_id = parts[1], parts[2]
    if "%" in user or "%" in server_id:
        raise RouteError(
            400,
            "invalid_path",
            "percent-encoded characters (such as %2F) are not allowed in /<user>/<server>",
        )
    if not ID_PATTERN.fullmatch(user):
        raise RouteError(
            400,
            "invalid_user",
            "the user id must be 1-128 characters of letters, digits, '.', '_', '@' and '-', "
            "starting with a letter or digit",
        )
    if user.lower() in RESERVED:
        raise RouteError(400, "reserved_user", f"{user!r} is reserved by the proxy and cannot be a user id")
    if not SERVER_ID_PATTERN.fullmatch(server_id):
        raise RouteError(
            400,
            "invalid_server",
            "the server id must be 1-64 characters of a-z, 0-9, '-' and '_', starting with a letter or digit",
        )
    subpath = "/" + parts[3] if len(parts) == 4 else ""
    if subpath in ("/", MCP_ALIAS):
        subpath = ""
    if subpath:
        segments = subpath.split("/")
        if "%" in subpath or "\\" in subpath or any(s in (".", "..") for s in segments):
            raise RouteError(
                400, "invalid_path", "encoded characters and dot segments are not allowed in the path"
            )
    return Route(user, server_id, subpath)


def upstream_url(server: ServerConfig, subpath: str, query: bytes, announced: frozenset[str]) -> str:
    """The URL to forward to, or RouteError 404 when the path is not reachable."""
    if not subpath:
        base = server.url
    elif subpath in announced or subpath in server.paths:
        base = server.origin + subpath
    else:
        raise RouteError(
            404,
            "path_not_allowed",
            f"{subpath} is not a reachable path of server {server.id!r}; only its MCP endpoint "
            "(and, for legacy SSE servers, the message endpoint it announced) are forwarded",
        )
    if not query:
        return base
    return base + ("&" if "?" in base else "?") + query.decode("latin-1")
