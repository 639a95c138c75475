"""The browser side of connecting: home, connect page, callback, connections page.

    GET  /                                              signed in: the person's connections (and the servers
                                                        their organisation manages); else how to get a link
    GET  /connect/<user>/<server>?expires&scope&sig   names who and what; sets the browser cookie
    POST /connect/<user>/<server>?…                    (CSRF) -> 303 to the authorization server
    GET  <callback_path>?code&state&iss                 one URL for every server
    GET  /connections/<user>?expires&sig                each server's state; Connect, Reconnect, Disconnect
    POST /connections/<user>/<server>/disconnect?…      (CSRF) revoke, delete, back to the list (for a
                                                        managed server: forget the token, obtained again on use)
    GET  /oauth/client-metadata.json                    the proxy's Client ID Metadata Document

The browser that opens the connect link gets a random cookie; the pending
authorization stores its hash, and the callback must come from the same
browser. Who the person is: where people sign in (`login_*`, login.py), the
session's user, who must be the path's user at every step (a link for someone
else is refused before anything is stored), and whose connections are the
home page; otherwise, with `browser_identity_header` set, the identity an SSO
proxy in front asserts; otherwise nobody, and the signed link is the invitation.
"""

from __future__ import annotations

import hmac
import secrets
import time
from typing import Any
from urllib.parse import urlencode, urlsplit

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from proxy import links, pages
from proxy.connect.assertion import NOT_ALLOWED
from proxy.connect.clients import CLIENT_METADATA_PATH, CLIENT_NAME
from proxy.connect.flow import ConnectFlow, FlowError, browser_hash, other_browser
from proxy.connect.lifecycle import CONNECTED, MUST_RECONNECT
from proxy.connect.service import REFUSED
from proxy.connect.subject import SubjectTokens
from proxy.crypto import Keyring
from proxy.errors import Forbidden, page_endpoint
from proxy.links import Links
from proxy.login import Session, Sessions, read_form
from proxy.names import LINK
from proxy.oauth import client as oauth_client
from proxy.routing import RESERVED
from proxy.settings import ID_PATTERN, SERVER_ID_PATTERN, ServerConfig, Settings
from proxy.stores import Connection

log = structlog.get_logger("keybearer.oauth")

COOKIE = "kb_browser"
COOKIE_MAX_AGE = 86400
# Servers on a person's page: those they connect, and those their organisation manages for them.
PERSONAL = ("oauth", "identity_assertion")
SIGN_IN_AGAIN = "/login?" + urlencode({"next": "/"})


def routes(
    settings: Settings,
    keyring: Keyring,
    flow: ConnectFlow,
    sessions: Sessions,
    links_: Links,
    sign_ins: SubjectTokens | None = None,
) -> list[Route]:
    pages_ = BrowserPages(settings, keyring, flow, sessions, links_, sign_ins)
    guard = page_endpoint
    return [
        Route("/", guard(pages_.home), methods=["GET"]),
        Route("/connect/{user}/{server}", guard(pages_.connect_page), methods=["GET"]),
        Route("/connect/{user}/{server}", guard(pages_.connect_continue), methods=["POST"]),
        Route(settings.callback_path, guard(pages_.callback), methods=["GET"]),
        Route("/connections/{user}", guard(pages_.connections_page), methods=["GET"]),
        Route("/connections/{user}/{server}/disconnect", guard(pages_.disconnect), methods=["POST"]),
        Route(CLIENT_METADATA_PATH, pages_.client_metadata, methods=["GET"]),
    ]


class BrowserPages:
    def __init__(
        self,
        settings: Settings,
        keyring: Keyring,
        flow: ConnectFlow,
        sessions: Sessions,
        links_: Links,
        sign_ins: SubjectTokens | None,
    ) -> None:
        self.settings = settings
        self.keyring = keyring
        self.flow = flow
        self.sessions = sessions
        self.links = links_
        self.sign_ins = sign_ins

    # -- home ----------------------------------------------------------------------------

    async def home(self, request: Request) -> Response:
        if not self.settings.signs_in:
            return pages.welcome(self.settings.public_url)
        session = await self.sessions.require(request)
        person = self.sessions.person(session)
        if session.user is None:
            return pages.operator_only(person)
        return await self._connections(request, session.user, "", person)

    # -- connect -------------------------------------------------------------------------

    async def connect_page(self, request: Request) -> Response:
        user, server = self._user(request), self._server(request)
        scopes = links.verify(self.keyring, "connect", user, server.id, dict(request.query_params))
        session = await self._check_identity(request, user)
        browser_id = request.cookies.get(COOKIE) or secrets.token_urlsafe(32)
        response = pages.connect(
            user,
            server.id,
            urlsplit(server.url).netloc,
            _self_url(request),
            self._csrf(browser_id, user),
            scopes,
            self._person(session),
        )
        self._set_cookie(response, browser_id)
        return response

    async def connect_continue(self, request: Request) -> Response:
        user, server = self._user(request), self._server(request)
        scopes = links.verify(self.keyring, "connect", user, server.id, dict(request.query_params))
        await self._check_identity(request, user)
        browser_id = self._browser(request)
        await self._check_csrf(request, browser_id, user)
        authorization_url = await self.flow.begin(user, server, browser_id, scopes)
        log.info("authorization started", user=user, server=server.id)
        return RedirectResponse(authorization_url, status_code=303, headers=pages.SECURITY_HEADERS)

    async def callback(self, request: Request) -> Response:
        params = request.query_params
        browser_id = request.cookies.get(COOKIE, "")
        # Refused before the state is spent when another browser brings it.
        pending = await self.flow.take_pending(params.get("state", ""), browser_id)
        # The state is spent from here on, whatever happens next.
        if not hmac.compare_digest(browser_hash(browser_id), pending.browser):
            raise other_browser()
        session = await self._check_identity(request, pending.user)
        if "error" in params:
            error = params.get("error", "")[:64]
            description = params.get("error_description", "")[:300]
            log.info("authorization refused at the provider", server=pending.server, error=error)
            raise FlowError(
                "Not connected",
                f"The provider of {pending.server} answered: {error}"
                + (f" ({description})" if description else ""),
                "Nothing was changed. Go back to your agent and retry if you want to connect.",
            )
        code = params.get("code", "")
        if not code or len(code) > 2048:
            raise FlowError(
                "Not connected",
                "The provider sent no authorization code.",
                "Go back to your agent and retry.",
            )
        await self.flow.finish(pending, code, params.get("iss"))
        return pages.connected(
            pending.user, pending.server, self.links.connections(pending.user), self._person(session)
        )

    # -- connections ---------------------------------------------------------------------

    async def connections_page(self, request: Request) -> Response:
        user = self._user(request)
        if self.settings.signs_in:
            # The signed-in person's connections are their home page.
            await self._check_identity(request, user)
            return RedirectResponse("/", status_code=303)
        links.verify(self.keyring, "connections", user, "", dict(request.query_params))
        self._check_header_identity(request, user)
        query = urlencode({k: request.query_params[k] for k in ("expires", "sig")})
        return await self._connections(request, user, f"?{query}", None)

    async def _connections(
        self, request: Request, user: str, query: str, person: pages.Person | None
    ) -> Response:
        browser_id = request.cookies.get(COOKIE) or secrets.token_urlsafe(32)
        stored = {c.server: c for c in await self.flow.tokens.list_user_connections(user)}
        servers = sorted(self.flow.registry.servers.values(), key=lambda s: s.id)
        signed_in = await self._holds_sign_in(user, servers)
        rows = []
        for server in servers:
            if server.credential_kind not in PERSONAL:
                continue
            conn = stored.get(server.id)
            disconnect = f"{links.connections_path(user)}/{server.id}/disconnect{query}"
            if server.credential_kind == "identity_assertion":
                rows.append(_managed_row(server, conn, signed_in, disconnect))
                continue
            rows.append(
                pages.ConnectionRow(
                    server=server.id,
                    host=urlsplit(server.url).netloc,
                    state=_state(conn),
                    expires_at=conn.expires_at if conn else None,
                    last_error=conn.last_error if conn else None,
                    refreshable=conn.refreshable if conn else True,
                    connect_url=self.links.connect(user, server.id),
                    disconnect_action=disconnect if conn else None,
                )
            )
        response = pages.connections(user, rows, self._csrf(browser_id, user), person)
        self._set_cookie(response, browser_id)
        return response

    async def _holds_sign_in(self, user: str, servers: list[ServerConfig]) -> bool:
        """Whether Keybearer holds an ID token of the person (asked only when a server needs one)."""
        if self.sign_ins is None or not any(s.credential_kind == "identity_assertion" for s in servers):
            return False
        return await self.sign_ins.holds(user)

    async def disconnect(self, request: Request) -> Response:
        user, server = self._user(request), self._server(request, PERSONAL)
        if self.settings.signs_in:
            await self._check_identity(request, user)
            back = "/"
        else:
            links.verify(self.keyring, "connections", user, "", dict(request.query_params))
            self._check_header_identity(request, user)
            back = f"{links.connections_path(user)}?" + urlencode(
                {k: request.query_params[k] for k in ("expires", "sig")}
            )
        await self._check_csrf(request, self._browser(request), user)
        await self.flow.disconnect(user, server)
        log.info("disconnected", user=user, server=server.id)
        return RedirectResponse(back, status_code=303)

    async def client_metadata(self, request: Request) -> Response:
        clients = self.flow.clients
        document = oauth_client.client_metadata_document(
            clients.client_id_url, clients.redirect_uri, CLIENT_NAME
        )
        return JSONResponse(document, headers={"Cache-Control": "public, max-age=3600"})

    # -- checks --------------------------------------------------------------------------

    def _user(self, request: Request) -> str:
        user = str(request.path_params["user"])
        if not ID_PATTERN.fullmatch(user) or user.lower() in RESERVED:
            raise FlowError(
                "Not found", "This link names no valid user.", "Ask your agent for a fresh link.", 404
            )
        return user

    def _server(self, request: Request, kinds: tuple[str, ...] = ("oauth",)) -> ServerConfig:
        server_id = str(request.path_params["server"])
        server = self.flow.registry.get(server_id) if SERVER_ID_PATTERN.fullmatch(server_id) else None
        if server is None or server.credential_kind not in kinds:
            raise FlowError(
                "Not found",
                f"No OAuth server {server_id!r} is configured here.",
                "Ask your agent for a fresh link.",
                404,
            )
        return server

    async def _check_identity(self, request: Request, user: str) -> Session | None:
        """Where people sign in, the session's user must be `user`; else the SSO header, when set."""
        if not self.settings.signs_in:
            self._check_header_identity(request, user)
            return None
        session = await self.sessions.require(request)
        if session.user != user:
            log.warning("a link for another user refused", user=user, signed_in=session.user)
            who = f"signed in as {session.user}" if session.user else "signed in with an operator link"
            raise Forbidden(
                f"You are {who}, and this link is for the user id {user}. Nothing was changed.",
                next_step=f"If {user} is you, sign out (the button is on your connections page) and sign in "
                f"as {user}. Otherwise ask your agent for a link of your own: it gives one whenever a server "
                "needs you.",
                title=f"This link is for {user}",
                code="link_for_someone_else",
                action=("Your connections", "/"),
            )
        return session

    def _check_header_identity(self, request: Request, user: str) -> None:
        header = self.settings.browser_identity_header
        if header is None:
            return
        asserted = request.headers.get(header)
        if asserted != user:
            log.warning("browser identity does not match the link's user", user=user)
            raise FlowError(
                "Wrong account",
                f"You are signed in as {asserted or 'nobody'}, but this link is for {user}.",
                "Sign in as that user, or ask your agent for a link for your own user id.",
                403,
            )

    def _person(self, session: Session | None) -> pages.Person | None:
        return self.sessions.person(session) if session else None

    def _browser(self, request: Request) -> str:
        browser_id = request.cookies.get(COOKIE)
        if not browser_id:
            raise FlowError(
                "Cookies needed",
                "This browser did not keep Keybearer's cookie from the previous page.",
                "Allow cookies for this site and open the link again.",
                403,
            )
        return browser_id

    def _csrf(self, browser_id: str, user: str) -> str:
        return self.keyring.sign(LINK, f"csrf\n{browser_id}\n{user}".encode())

    async def _check_csrf(self, request: Request, browser_id: str, user: str) -> None:
        form = await read_form(request)
        token = str(form.get("csrf", ""))
        if not self.keyring.verify(LINK, f"csrf\n{browser_id}\n{user}".encode(), token):
            raise FlowError(
                "Request refused",
                "This form was not sent from the page Keybearer showed in this browser.",
                "Open the link from your agent again and press the button there.",
                403,
            )

    def _set_cookie(self, response: Response, browser_id: str) -> None:
        response.set_cookie(
            COOKIE, browser_id, max_age=COOKIE_MAX_AGE, httponly=True, samesite="lax",
            secure=self.settings.public_url.startswith("https://"), path="/",
        )  # fmt: skip


def _self_url(request: Request) -> str:
    """The page's own path and query, to post the form back to."""
    query = request.url.query
    return request.url.path + (f"?{query}" if query else "")


def _state(conn: Any) -> str:
    if conn is None:
        return "not connected"
    if conn.state == MUST_RECONNECT:
        return "must reconnect"
    if conn.expires_at is not None and conn.expires_at < time.time():
        return "expired (refreshes on next use)" if conn.refreshable else "expired: reconnect"
    return "connected"


def _managed_row(
    server: ServerConfig, conn: Connection | None, signed_in: bool, forget: str
) -> pages.ConnectionRow:
    """A server the organisation manages: nothing to connect; its state, and what (if anything) the person can do."""
    now = time.time()
    state = conn.state if conn else None
    usable = state == CONNECTED and conn is not None and (conn.expires_at is None or conn.expires_at > now)
    expires_at, when, last_error, sign_in = None, None, None, None
    if usable and conn is not None:
        text, expires_at = "connected", conn.expires_at
    elif state == NOT_ALLOWED and conn is not None:
        text, when = "not allowed by your organisation", conn.obtained_at
        last_error = "If you need it, ask whoever manages access at your organisation."
    elif state == REFUSED and conn is not None:
        text, when = "unavailable: the server refuses Keybearer", conn.obtained_at
        last_error = "The proxy's operator must fix this; nothing for you to do."
    elif not signed_in:
        text, sign_in = "needs you to sign in again", SIGN_IN_AGAIN
    elif state == CONNECTED:
        text = "expired: obtained again when your agent next uses it"
    else:
        text = "not yet obtained: Keybearer gets it when your agent first uses this server"
    return pages.ConnectionRow(
        server=server.id, host=urlsplit(server.url).netloc, state=text, expires_at=expires_at,
        last_error=last_error, connect_url=None, disconnect_action=forget if usable else None,
        managed=True, since=when, sign_in_url=sign_in,
    )  # fmt: skip
