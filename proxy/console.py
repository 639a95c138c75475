"""The operator console: every server at a glance, and per server its
connections, reset, API key and static OAuth client.

    GET  /admin/console?expires&sig                        a console link: an operator session, then the console
    GET  /admin/console                                    every server: auth, host, connected users, recent errors
    GET  /admin/console/servers/<id>                       its connections and settings
    POST /admin/console/servers/<id>/reset
    POST /admin/console/servers/<id>/api-key               set (write-only: never shown again)
    POST /admin/console/servers/<id>/api-key/clear
    POST /admin/console/servers/<id>/oauth-client          set (the secret write-only)
    POST /admin/console/servers/<id>/oauth-client/clear
    POST /admin/console/servers/<id>/connections/<user>/delete

Who may open it: a signed-in person whose admin claim matches
(`login_admin_claim`, `login_admin_values`), or whoever holds the admin token
or the config, through a short-lived link (`keybearer link --admin`,
`POST /admin/links {"console": true}`) that starts an operator session. Every
form carries the session's CSRF token. Every action is a call to
management.py, as the admin API and the CLI make.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any
from urllib.parse import urlencode, urlsplit

import structlog
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from proxy import errors, links, pages
from proxy.connect.assertion import NOT_ALLOWED, SIGN_IN_REQUIRED
from proxy.crypto import Keyring
from proxy.errors import Forbidden, KeybearerError
from proxy.links import CONSOLE_PATH, LinkError
from proxy.login import Session, Sessions, SignInRequired, read_form
from proxy.management import MANAGED_BY, Management
from proxy.settings import ID_PATTERN, ServerConfig

log = structlog.get_logger("keybearer.console")

# An operator session from a link lasts an hour at most, however long people's sessions are.
LINK_SESSION_LIFETIME = 3600.0
RECENT_ERRORS = 3
HOLDS_TOKEN = ("connected", "must_reconnect")  # else obtained_at is when the state began
PERSONS_OWN = (NOT_ALLOWED, SIGN_IN_REQUIRED)
DONE = {
    "reset": "Reset: {n} connection(s) deleted. Every user must connect again.",
    "key-set": "API key saved, encrypted.",
    "key-cleared": "The stored API key was deleted.",
    "key-none": "There was no stored API key.",
    "client-set": "Static OAuth client saved.",
    "client-cleared": "The static OAuth client was deleted.",
    "client-none": "There was no stored static OAuth client.",
    "removed": "Connection removed.",
    "not-connected": "That user had no connection.",
}


class Console:
    def __init__(self, keyring: Keyring, sessions: Sessions, management: Callable[[], Management]) -> None:
        self.keyring = keyring
        self.sessions = sessions
        self.management = management

    # -- pages -------------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        if "sig" in request.query_params:
            return await self._enter(request)
        session = await self._operator(request)
        m = self.management()
        summaries = [
            await self._summary(m, s) for s in sorted(m.registry.servers.values(), key=lambda s: s.id)
        ]
        return pages.console(summaries, self.sessions.person(session), _done(request))

    async def server(self, request: Request) -> Response:
        session = await self._operator(request)
        m = self.management()
        server = m.server(str(request.path_params["server"]))
        connections = [
            pages.ConsoleConnection(
                c["user"],
                c["state"].replace("_", " "),
                c["expires_at"],
                c["last_error"],
                None if c["state"] in HOLDS_TOKEN else c["obtained_at"],
            )
            for c in (await m.connections(server.id) if server.auth == "oauth" else [])
        ]
        return pages.console_server(
            await self._summary(m, server), server.url, connections,
            _key_text(m.describe(server)) if server.auth == "api_key" else None,
            _client_text(server, await m.oauth_client(server.id)) if server.auth == "oauth" else None,
            self.sessions.csrf(session), self.sessions.person(session), _done(request),
        )  # fmt: skip

    async def _summary(self, m: Management, server: ServerConfig) -> pages.ConsoleServer:
        problems: list[str] = []
        connected = 0
        if server.auth == "oauth":
            rows = await m.connections(server.id)
            connected = len(rows)
            # A person's own states (refused by the organisation, to sign in again) are not the operator's.
            failing = sorted((r for r in rows if (r["last_error"] or r["state"] != "connected")
                              and r["state"] not in PERSONS_OWN),
                             key=lambda r: r["obtained_at"], reverse=True)  # fmt: skip
            problems = [f"{r['user']}: {r['last_error'] or r['state'].replace('_', ' ')}" for r in failing]
        elif server.auth == "api_key" and not m.describe(server)["api_key"]["set"]:
            problems = ["no API key is set: every call fails"]
        return pages.ConsoleServer(
            server.id, server.auth, urlsplit(server.url).netloc, f"{server.source} file" if server.source == "config"
            else "store", connected, tuple(problems[:RECENT_ERRORS]), MANAGED_BY.get(server.credential_kind),
        )  # fmt: skip

    # -- actions -----------------------------------------------------------------------

    async def reset(self, request: Request) -> Response:
        server_id, _ = await self._form(request)
        deleted = await self.management().reset(server_id)
        log.info("server reset from the console", server=server_id)
        return _back(server_id, "reset", n=deleted["connections"])

    async def set_api_key(self, request: Request) -> Response:
        server_id, form = await self._form(request)
        await self.management().set_api_key(server_id, str(form.get("api_key", "")))
        return _back(server_id, "key-set")

    async def clear_api_key(self, request: Request) -> Response:
        server_id, _ = await self._form(request)
        return _back(
            server_id, "key-cleared" if await self.management().clear_api_key(server_id) else "key-none"
        )

    async def set_oauth_client(self, request: Request) -> Response:
        server_id, form = await self._form(request)
        secret = str(form.get("client_secret", ""))
        body = {"client_id": str(form.get("client_id", "")).strip(), "client_secret": secret or None}
        await self.management().set_oauth_client(server_id, body)
        return _back(server_id, "client-set")

    async def clear_oauth_client(self, request: Request) -> Response:
        server_id, _ = await self._form(request)
        cleared = await self.management().clear_oauth_client(server_id)
        return _back(server_id, "client-cleared" if cleared else "client-none")

    async def delete_connection(self, request: Request) -> Response:
        server_id, _ = await self._form(request)
        user = str(request.path_params["user"])
        if not ID_PATTERN.fullmatch(user):
            raise KeybearerError(f"{user[:100]!r} is not a user id.", status=400, title="Bad request")
        deleted = await self.management().delete_connection(server_id, user)
        return _back(server_id, "removed" if deleted else "not-connected")

    # -- who may -----------------------------------------------------------------------

    async def _enter(self, request: Request) -> Response:
        """A console link: a fresh operator session, and the link out of the address bar."""
        try:
            links.verify(self.keyring, "console", "", "", dict(request.query_params))
        except LinkError as exc:
            raise LinkError(
                exc.message,
                next_step="Run `keybearer link --admin` for a fresh one: console links last minutes.",
            ) from None
        response = RedirectResponse(CONSOLE_PATH, status_code=303, headers=pages.SECURITY_HEADERS)
        await self.sessions.forget(request)
        await self.sessions.start(response, None, True, "operator (console link)", LINK_SESSION_LIFETIME)
        log.info("operator session started from a console link")
        return response

    async def _operator(self, request: Request) -> Session:
        session = await self.sessions.current(request)
        if session is None and self.sessions.signs_in:
            raise SignInRequired(CONSOLE_PATH if request.method != "GET" else request.url.path)
        if session is None:
            raise Forbidden(
                "The operator console opens with an operator link.",
                next_step='Run `keybearer link --admin` (or POST /admin/links {"console": true} with the admin '
                "token) and open the link it prints, in this browser.",
                status=401, title="Operator console", code="console_link_needed",
            )  # fmt: skip
        if not session.admin:
            log.warning("console refused: not an operator", user=session.user)
            raise Forbidden(
                f"You are signed in as {session.user}, who is not an operator of this proxy.",
                next_step="Operators are the people the proxy's login_admin_claim and login_admin_values name. "
                "Ask one to add you, or sign out and sign in with an operator's account.",
                title="Not an operator", code="not_an_operator", action=("Your connections", "/"),
            )  # fmt: skip
        return session

    async def _form(self, request: Request) -> tuple[str, FormData]:
        """The server an action is for, and its form, once the operator and the CSRF token are checked."""
        session = await self._operator(request)
        form = await read_form(request)
        self.sessions.check_csrf(session, str(form.get("csrf", "")))
        server_id = str(request.path_params["server"])
        self.management().server(server_id)
        return server_id, form


def _back(server_id: str, done: str, **values: Any) -> Response:
    query = urlencode({"done": done, **values})
    return RedirectResponse(f"{CONSOLE_PATH}/servers/{server_id}?{query}", status_code=303)


def _done(request: Request) -> str:
    template = DONE.get(request.query_params.get("done", ""), "")
    n = request.query_params.get("n", "0")
    return template.format(n=int(n) if n.isdigit() and len(n) < 9 else 0)


def _key_text(described: dict[str, Any]) -> str:
    info = described.get("api_key") or {}
    if not info.get("set"):
        return "No API key is set."
    where = {"stored": "stored, encrypted", "env": "from an environment variable", "file": "from a file"}
    source = str(info.get("source"))
    return f"Set ({where.get(source, source)}, {info.get('length')} characters)."


def _client_text(server: ServerConfig, stored: dict[str, Any]) -> str:
    if stored.get("set"):
        secret = "with a secret" if stored.get("client_secret_set") else "public, no secret"
        return f"Client {stored['client_id']} ({stored['auth_method']}, {secret})."
    if server.client_id:
        return f"Client {server.client_id}, from the config file."
    return "None: the proxy registers itself at the provider, or uses its Client ID Metadata Document."


def _endpoint(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Errors as pages, each with a way back into the console."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except KeybearerError as exc:
            answer = exc.answer()
            if answer.action is None and exc.status not in (401, 303):
                server = request.path_params.get("server")
                back = f"{CONSOLE_PATH}/servers/{server}" if server and exc.status != 404 else CONSOLE_PATH
                answer = replace(answer, action=("Back to the console", back))
            return errors.page_response(answer)

    return endpoint


def routes(console: Console) -> list[Route]:
    base = CONSOLE_PATH + "/servers/{server}"
    posts = {
        "/reset": console.reset,
        "/api-key": console.set_api_key,
        "/api-key/clear": console.clear_api_key,
        "/oauth-client": console.set_oauth_client,
        "/oauth-client/clear": console.clear_oauth_client,
        "/connections/{user}/delete": console.delete_connection,
    }
    return [
        Route(CONSOLE_PATH, _endpoint(console.index), methods=["GET"]),
        Route(base, _endpoint(console.server), methods=["GET"]),
        *(Route(base + path, _endpoint(handler), methods=["POST"]) for path, handler in posts.items()),
    ]
