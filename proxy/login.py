"""Signing people in: an OpenID Connect relying party, and browser sessions.

    GET  /login?next=/path   a pending sign-in (state, PKCE verifier, nonce) bound to this
                             browser's cookie -> 303 to the organisation's provider
    GET  /login/callback     state (once, same browser) -> RFC 9207 iss -> code exchange ->
                             the ID token verified -> a new session -> 303 to `next`
    GET  /logout             a page with the Sign out button
    POST /logout             (CSRF) the session ends, on every replica at once

The provider's discovery document and its keys come through the guarded
fetcher (oauth/fetch.py), like everything an authorization server hands the
proxy. The ID token must be signed by a key of the provider's JWKS with an
asymmetric algorithm, name the provider as `iss` and this client in `aud`,
carry the nonce this sign-in sent, and not have expired.

When servers are authorized by the organisation (`grant: identity_assertion`,
connect/subject.py), the sign-in also asks for a refresh token (`offline_access`,
when the provider lists it), to renew the person's ID token. OpenID Connect
Core §11 lets a provider grant it only with `prompt=consent` (oidc-provider
does; Okta, Entra ID and Keycloak do not need it, and Entra shows a consent
page each time it is sent), so it is sent only once a sign-in without it came
back with no refresh token; when even that one comes back without, the
provider gives this client none, and no sign-in asks again for a day.

A session is a random id. The browser holds it sealed (AES-GCM) in an
HttpOnly, SameSite=Lax cookie (`__Host-` and Secure on https); the token store
holds the record, sealed too, under a hash of the id: every replica sees the
same sessions, and signing out ends one everywhere. A session ends after
`session_idle_timeout` unused, and after `session_lifetime` in any case.
Operators who hold the admin token get sessions too, from a console link
(console.py), whether or not people sign in here.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol
from urllib.parse import urlencode

import structlog
from joserfc import jwt
from joserfc.errors import JoseError
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from proxy import errors, pages
from proxy.crypto import DecryptError, Keyring
from proxy.errors import Answer, Forbidden, InvalidInput, KeybearerError, NotFound, Unavailable
from proxy.names import LINK, PENDING_STATE, SESSION
from proxy.oauth import client as oauth_client
from proxy.oauth.client import OFFLINE_ACCESS, AuthServerUnavailable, OAuthError
from proxy.oauth.discovery import OIDC_WELL_KNOWN, AuthServer, DiscoveryError, checked_endpoint
from proxy.oauth.fetch import Fetcher, FetchError, UnsafeURL
from proxy.oauth.jwks import KeySetCache, KeysUnavailable
from proxy.routing import RESERVED
from proxy.settings import ID_PATTERN, Settings
from proxy.stores import TokenStore

log = structlog.get_logger("keybearer.login")

CALLBACK_PATH = "/login/callback"
PENDING_TTL = 600.0  # to sign in at the provider
# A session's idle clock restarts on use, with one store write at most this
# often (and at most four times per idle timeout).
TOUCH_EVERY = 60.0
MAX_FORM_BYTES = 16 * 1024
# An ID token or refresh token from the provider longer than this is refused:
# each is kept per person in the token store.
MAX_TOKEN_CHARS = 16 * 1024
# How a sign-in asks for a refresh token, as learned from the provider's answers
# (see the module's docstring), for every replica; relearned after a day.
OFFLINE_LEARNED = "login:offline_access"
LEARNED_TTL = 86400.0


def cookie_name(base: str, secure: bool) -> str:
    """`__Host-` makes the browser keep the cookie only when it is Secure, for
    Path=/ and this host alone: no sibling subdomain can set or shadow it."""
    return f"__Host-{base}" if secure else base


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


# -- sessions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Session:
    id: str = field(repr=False)
    user: str | None  # None: an operator who came in through a console link
    admin: bool
    name: str  # shown on pages
    created: float
    expires: float  # the absolute end
    touched: float


class SessionEnded(KeybearerError):
    """The browser's session cookie names a session that is over; the page forgets the cookie."""

    status = 401
    code = "session_ended"
    title = "Your session has ended"

    def __init__(
        self, message: str, next_step: str, expired_cookie: str, action: tuple[str, str] | None
    ) -> None:
        super().__init__(message, next_step=next_step, action=action)
        self.expired_cookie = expired_cookie

    def answer(self) -> Answer:
        return replace(super().answer(), headers=(("set-cookie", self.expired_cookie),))


class SignInRequired(KeybearerError):
    """No session yet: to the sign-in, and back to this page after it."""

    status = 303
    code = "sign_in_required"
    title = "Sign in"

    def __init__(self, next_path: str) -> None:
        self.location = "/login?" + urlencode({"next": next_path})
        super().__init__(
            "This page needs you to sign in.",
            next_step="Continue to your organisation's sign-in.",
            action=("Sign in", self.location),
        )

    def answer(self) -> Answer:
        return replace(super().answer(), headers=(("location", self.location),))


class Sessions:
    def __init__(self, settings: Settings, keyring: Keyring, tokens: TokenStore) -> None:
        self.keyring = keyring
        self.tokens = tokens
        self.idle = settings.session_idle_timeout
        self.lifetime = settings.session_lifetime
        self.signs_in = settings.signs_in
        self.secure = settings.public_url.startswith("https://")
        self.cookie = cookie_name("kb_session", self.secure)

    async def start(
        self, response: Response, user: str | None, admin: bool, name: str, lifetime: float | None = None
    ) -> Session:
        """A new session (never an old id reused), its cookie set on `response`."""
        now = time.time()
        lifetime = min(lifetime or self.lifetime, self.lifetime)
        session = Session(secrets.token_urlsafe(32), user, admin, name, now, now + lifetime, now)
        await self._save(session)
        sealed_id = self.keyring.encrypt(SESSION, session.id.encode(), "cookie")
        response.set_cookie(
            self.cookie, sealed_id, max_age=int(lifetime), httponly=True, samesite="lax", secure=self.secure,
            path="/",
        )  # fmt: skip
        log.info("session started", user=user, admin=admin)
        return session

    async def current(self, request: Request) -> Session | None:
        """The request's session, its idle clock restarted; None when the browser
        has no session cookie; SessionEnded when it has one that is over."""
        sealed_id = request.cookies.get(self.cookie)
        if not sealed_id:
            return None
        session_id = self._session_id(sealed_id)
        if session_id is None:
            raise self.ended(request)
        key = _hash(session_id)
        sealed = await self.tokens.get_session(key)
        if sealed is None:
            raise self.ended(request)
        try:
            data = json.loads(self.keyring.decrypt(SESSION, sealed, f"session:{key}"))
            session = Session(id=session_id, **data)
        except (DecryptError, ValueError, TypeError):
            raise self.ended(request) from None
        now = time.time()
        if now >= session.expires:
            await self.tokens.delete_session(key)
            raise self.ended(request)
        if now - session.touched >= min(TOUCH_EVERY, self.idle / 4):
            session = replace(session, touched=now)
            await self._save(session)
        return session

    async def require(self, request: Request) -> Session:
        """The signed-in person's session (people sign in here)."""
        session = await self.current(request)
        if session is None:
            raise SignInRequired(_next_of(request))
        return session

    async def end(self, request: Request, response: Response) -> None:
        """The request's session ends on every replica, and the browser forgets its cookie."""
        await self.forget(request)
        response.headers.append("set-cookie", self._expired_cookie())

    async def forget(self, request: Request) -> None:
        session_id = self._session_id(request.cookies.get(self.cookie, ""))
        if session_id and await self.tokens.delete_session(_hash(session_id)):
            log.info("session ended")

    def csrf(self, session: Session) -> str:
        return self.keyring.sign(LINK, f"session-csrf\n{session.id}".encode())

    def check_csrf(self, session: Session, token: str) -> None:
        if not self.keyring.verify(LINK, f"session-csrf\n{session.id}".encode(), token):
            raise Forbidden(
                "This form was not sent from a page Keybearer showed in this browser.",
                next_step="Go back, reload the page and press the button there.",
                title="Request refused",
            )

    def person(self, session: Session) -> pages.Person:
        return pages.Person(session.name, session.user, self.csrf(session), session.admin)

    def ended(self, request: Request) -> SessionEnded:
        if self.signs_in:
            return SessionEnded(
                "You were signed out: the session was unused for a while, reached its time limit, or was "
                "ended in another tab.",
                "Sign in again to carry on where you were.",
                self._expired_cookie(),
                ("Sign in again", "/login?" + urlencode({"next": _next_of(request)})),
            )
        return SessionEnded(
            "Your operator session was unused for a while, reached its time limit, or was ended.",
            "Run `keybearer link --admin` for a fresh console link.",
            self._expired_cookie(),
            None,
        )

    async def _save(self, session: Session) -> None:
        key = _hash(session.id)
        record = json.dumps({k: v for k, v in asdict(session).items() if k != "id"}).encode()
        ttl = min(self.idle, session.expires - time.time())
        await self.tokens.put_session(
            key, self.keyring.encrypt(SESSION, record, f"session:{key}"), max(ttl, 1.0)
        )

    def _session_id(self, sealed_id: str) -> str | None:
        try:
            return self.keyring.decrypt(SESSION, sealed_id, "cookie").decode()
        except (DecryptError, ValueError):
            return None

    def _expired_cookie(self) -> str:
        return f"{self.cookie}=; Max-Age=0; Path=/; HttpOnly; SameSite=lax" + (
            "; Secure" if self.secure else ""
        )


def _next_of(request: Request) -> str:
    """Where to come back to after signing in: this page, or home after a form."""
    if request.method != "GET":
        return "/"
    query = request.url.query
    return request.url.path + (f"?{query}" if query else "")


def safe_next(value: str | None) -> str:
    """A path on this proxy, never another site (`//evil`, `/\\evil`) or the sign-in itself."""
    if (
        not value
        or len(value) > 2048
        or not value.startswith("/")
        or value.startswith(("//", "/\\"))
        or not value.isascii()
        or not value.isprintable()
        or value.startswith("/login")
    ):
        return "/"
    return value


async def read_form(request: Request, max_fields: int = 4) -> FormData:
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit() or int(declared) > MAX_FORM_BYTES:
        raise InvalidInput("The form is too large.", next_step="Go back and send it again.")
    return await request.form(max_files=0, max_fields=max_fields)


# -- the relying party -------------------------------------------------------------------


class SignInFailed(KeybearerError):
    status = 400
    code = "sign_in_failed"
    title = "Not signed in"

    def __init__(self, message: str, next_step: str = "Sign in again.", status: int | None = None) -> None:
        super().__init__(message, next_step=next_step, status=status, action=("Sign in again", "/login"))


class IdentityProviderUnavailable(Unavailable):
    code = "identity_provider_unavailable"
    title = "Sign-in is unavailable"


@dataclass(frozen=True)
class IdToken:
    """An ID token of the provider's, verified: the subject of token exchanges."""

    value: str = field(repr=False)
    issued: float
    expires: float


@dataclass(frozen=True)
class Identity:
    user: str
    admin: bool
    name: str
    next_path: str
    id_token: IdToken
    refresh_token: str | None = field(repr=False, default=None)  # the provider's, to renew the ID token


class KeepsSignIns(Protocol):
    """Where a person's ID token (and refresh token) go at sign-in, and end at sign-out."""

    async def keep(self, identity: Identity) -> None: ...

    async def forget(self, user: str) -> None: ...


@dataclass(frozen=True)
class Provider:
    auth_server: AuthServer  # endpoints and client authentication, for oauth/client.py
    jwks_uri: str


class RelyingParty:
    def __init__(
        self,
        settings: Settings,
        keyring: Keyring,
        tokens: TokenStore,
        fetcher: Fetcher,
        wants_refresh_token: Callable[[], bool] = lambda: False,
    ) -> None:
        assert settings.login_issuer and settings.login_client_id
        self.issuer = settings.login_issuer
        self.client_id = settings.login_client_id
        self.client_secret = settings.login_client_secret
        self.scopes = tuple(settings.login_scopes.split())
        self.user_claim = settings.login_user_claim
        self.admin_claim = settings.login_admin_claim
        self.admin_values = frozenset(settings.login_admin_values)
        self.redirect_uri = settings.public_url + CALLBACK_PATH
        self.metadata_ttl = settings.metadata_cache_ttl
        self.keyring = keyring
        self.tokens = tokens
        self.fetcher = fetcher
        # True while a server needs the person's ID token renewed (identity_assertion):
        # else Keybearer asks for no long-lived credential it would not use.
        self.wants_refresh_token = wants_refresh_token
        self._provider: tuple[float, Provider] | None = None
        self.keys = KeySetCache(fetcher, self._jwks_uri)
        self._claims = jwt.JWTClaimsRegistry(
            leeway=60, iss={"essential": True, "value": self.issuer}, aud={"essential": True, "value": self.client_id},
            exp={"essential": True}, iat={"essential": True}, sub={"essential": True},
        )  # fmt: skip

    async def begin(self, browser_id: str, next_path: str) -> str:
        """A pending sign-in, stored sealed; the provider's authorization URL."""
        provider = await self.provider()
        verifier, challenge = oauth_client.pkce_pair()
        nonce = secrets.token_urlsafe(24)
        state = self._state_for(browser_id)
        offline = await self._offline_asked(provider)
        scopes = self.scopes + ((OFFLINE_ACCESS,) if offline and OFFLINE_ACCESS not in self.scopes else ())
        record = {"verifier": verifier, "nonce": nonce, "next": next_path, "offline": offline}
        sealed = self.keyring.encrypt(
            PENDING_STATE, json.dumps(record).encode(), f"{PENDING_STATE}:login:{state}"
        )
        await self.tokens.put_pending(f"login:{state}", sealed, PENDING_TTL)
        return oauth_client.authorization_url(
            provider.auth_server, self.client_id, self.redirect_uri, state, challenge, scopes, None,
            {"nonce": nonce}, consent_for_offline=offline == "consent",
        )  # fmt: skip

    async def finish(self, params: Mapping[str, str], browser_id: str) -> Identity:
        pending = await self._take_pending(params.get("state", ""), browser_id)
        if "error" in params:
            error, description = params.get("error", "")[:64], params.get("error_description", "")[:300]
            log.info("sign-in refused at the provider", error=error)
            raise KeybearerError(
                f"Your organisation's sign-in did not let you in. It answered: {error}"
                + (f" ({description})" if description else ""),
                next_step="If you should have access here, ask whoever manages your organisation's accounts, "
                "or try again with another account.",
                status=403, code="access_denied", title="Access denied", action=("Try again", "/login"),
            )  # fmt: skip
        code = params.get("code", "")
        if not code or len(code) > 2048:
            raise SignInFailed("Your organisation's sign-in sent no authorization code.")
        provider = await self.provider()
        try:
            client = oauth_client.static_registration(
                provider.auth_server, self.client_id, self.client_secret, self.redirect_uri
            )
            oauth_client.check_callback_issuer(provider.auth_server, params.get("iss"))
            issued = await oauth_client.exchange_code(
                self.fetcher, provider.auth_server, client, code, self.redirect_uri, pending["verifier"], None
            )
        except AuthServerUnavailable as exc:
            log.error("sign-in failed: the provider is unavailable", reason=str(exc))
            raise self._unavailable() from None
        except OAuthError as exc:
            log.warning("sign-in failed at the token endpoint", error=exc.error)
            raise SignInFailed(
                f"Your organisation's sign-in refused to complete it: {exc}", status=403
            ) from None
        id_token = issued.raw.get("id_token")
        if not isinstance(id_token, str) or not id_token:
            raise SignInFailed("Your organisation's sign-in answered without an ID token.", status=502)
        if len(id_token) > MAX_TOKEN_CHARS:
            raise SignInFailed(
                f"Your organisation's sign-in answered with an ID token over {MAX_TOKEN_CHARS} characters.",
                status=502,
            )
        claims = await self._verified(id_token, pending["nonce"])
        user = self._user(claims)
        refresh_token = _bounded(issued.refresh_token) if self.wants_refresh_token() else None
        await self._learn(pending.get("offline", ""), refresh_token is not None)
        log.info("signed in", user=user)
        return Identity(
            user, self._is_admin(claims), _display_name(claims, user), safe_next(pending["next"]),
            _id_token(id_token, claims), refresh_token,
        )  # fmt: skip

    # -- a refresh token, for servers the organisation authorizes (identity_assertion) ----

    async def _offline_asked(self, provider: Provider) -> str:
        """How this sign-in asks for a refresh token: "" not at all, "plain" by
        `offline_access`, "consent" by `offline_access` and `prompt=consent`."""
        listed = OFFLINE_ACCESS in (provider.auth_server.scopes_supported or ())
        if not self.wants_refresh_token() or not (listed or OFFLINE_ACCESS in self.scopes):
            return ""
        learned = await self.tokens.cache_get(OFFLINE_LEARNED)
        return {"consent": "consent", "none": ""}.get(learned or "", "plain")

    async def _learn(self, asked: str, got_refresh_token: bool) -> None:
        if not asked or got_refresh_token:
            return
        if asked == "plain":
            log.info(
                "the provider gave no refresh token for offline_access alone; sign-ins add prompt=consent"
            )
            await self.tokens.cache_set(OFFLINE_LEARNED, "consent", LEARNED_TTL)
            return
        log.warning(
            "the provider gives the sign-in client no refresh token, even with prompt=consent: ID tokens "
            "cannot be renewed, people sign in again when theirs expires; allow the client the "
            "refresh_token grant and offline_access at the provider (docs/enterprise.md)",
            client_id=self.client_id,
        )
        await self.tokens.cache_set(OFFLINE_LEARNED, "none", LEARNED_TTL)

    async def renew(self, refresh_token: str, user: str) -> tuple[IdToken, str | None]:
        """A new ID token for `user` by the refresh token grant, and the rotated
        refresh token (None: the old one stays). OAuthError when the provider
        refuses (`invalid_grant`: the person's session there is over) or answers
        without a usable ID token; AuthServerUnavailable when it cannot answer."""
        provider = await self.provider()
        client = oauth_client.static_registration(
            provider.auth_server, self.client_id, self.client_secret, self.redirect_uri
        )
        issued = await oauth_client.refresh(self.fetcher, provider.auth_server, client, refresh_token, None)
        id_token = issued.raw.get("id_token")
        if not isinstance(id_token, str) or not id_token or len(id_token) > MAX_TOKEN_CHARS:
            raise OAuthError("invalid_response", "the provider renewed the sign-in without an ID token")
        try:
            claims = await self.keys.decode(id_token)
            self._claims.validate(claims)
        except KeysUnavailable as exc:
            raise AuthServerUnavailable(str(exc)) from None
        except (JoseError, ValueError) as exc:
            raise OAuthError("invalid_response", f"the renewed ID token was refused: {exc}") from None
        if claims.get(self.user_claim) != user:
            raise OAuthError("invalid_response", "the renewed ID token names another person")
        return _id_token(id_token, claims), _bounded(issued.refresh_token)

    async def agent_id_token(self, token: str, user: str) -> IdToken | None:
        """The agent's own bearer token, when it can be the subject of a token
        exchange for `user`: an ID token of this provider (its signature, `iss`)
        for this client (`aud`), naming `user` as a sign-in would, not expired."""
        if len(token) > MAX_TOKEN_CHARS:
            return None
        try:
            claims = await self.keys.decode(token)
            self._claims.validate(claims)
        except (KeysUnavailable, JoseError, ValueError):
            return None
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if len(audiences) > 1 and claims.get("azp") != self.client_id:
            return None
        if claims.get(self.user_claim) != user or float(claims["exp"]) <= time.time():
            return None
        return _id_token(token, claims)

    async def exchange(
        self, id_token: str, audience: str, resource: str | None, scopes: tuple[str, ...]
    ) -> str:
        """An ID-JAG for `audience` from the provider, authenticated as at sign-in.
        OAuthError when the provider refuses, AuthServerUnavailable when it cannot answer."""
        provider = await self.provider()
        client = oauth_client.static_registration(
            provider.auth_server, self.client_id, self.client_secret, self.redirect_uri
        )
        return await oauth_client.exchange_id_token(
            self.fetcher, provider.auth_server, client, id_token, audience, resource, scopes
        )

    async def provider(self) -> Provider:
        """The provider's OpenID configuration, fetched once per metadata_cache_ttl."""
        if self._provider and self._provider[0] > time.monotonic():
            return self._provider[1]
        url = self.issuer.rstrip("/") + OIDC_WELL_KNOWN
        try:
            provider = provider_from_metadata(
                self.fetcher, await self.fetcher.get_json(url), url, self.issuer
            )
        except (FetchError, UnsafeURL, DiscoveryError) as exc:
            log.error("identity provider unusable", issuer=self.issuer, reason=str(exc))
            raise self._unavailable() from None
        self._provider = (time.monotonic() + self.metadata_ttl, provider)
        return provider

    def _unavailable(self) -> IdentityProviderUnavailable:
        return IdentityProviderUnavailable(
            f"Keybearer cannot reach your organisation's sign-in ({self.issuer}) right now.",
            next_step="Try again in a minute. If it keeps failing, tell the proxy's operator: its log says why.",
            action=("Try again", "/login"),
        )

    # -- state, bound to the browser ---------------------------------------------------

    def _state_for(self, browser_id: str, nonce: str | None = None) -> str:
        """A state that names the browser which began (by a MAC of its cookie), so
        that another browser's callback is refused before the state is spent."""
        nonce = nonce or secrets.token_urlsafe(24)
        tag = self.keyring.sign(LINK, f"login-state\n{nonce}\n{_hash(browser_id)}".encode())[:22]
        return f"{nonce}.{tag}"

    async def _take_pending(self, state: str, browser_id: str) -> dict[str, str]:
        stale = SignInFailed(
            "This sign-in was already completed, has expired, or was started in another browser.",
            next_step="Sign in again from this browser.",
        )
        if not state or len(state) > 128 or not state.isascii() or not browser_id:
            raise stale
        if not hmac.compare_digest(
            self._state_for(browser_id, state.partition(".")[0]).encode(), state.encode()
        ):
            log.warning("sign-in callback from another browser refused")
            raise stale
        sealed = await self.tokens.take_pending(f"login:{state}")
        try:
            record: dict[str, str] = json.loads(
                self.keyring.decrypt(PENDING_STATE, sealed or "", f"{PENDING_STATE}:login:{state}")
            )
        except (DecryptError, ValueError):
            raise stale from None
        return record

    # -- the ID token ------------------------------------------------------------------

    async def _verified(self, id_token: str, nonce: str) -> dict[str, Any]:
        try:
            claims = await self.keys.decode(id_token)
            self._claims.validate(claims)
        except KeysUnavailable:
            raise self._unavailable() from None
        except (JoseError, ValueError) as exc:
            raise self._refused(str(exc)) from None
        if not isinstance(claims.get("nonce"), str) or not hmac.compare_digest(claims["nonce"], nonce):
            raise self._refused("its nonce is not the one this sign-in sent")
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if len(audiences) > 1 and claims.get("azp") != self.client_id:
            raise self._refused("it names several audiences and this client is not its azp")
        return claims

    def _refused(self, reason: str) -> SignInFailed:
        log.warning("ID token refused", reason=reason)
        return SignInFailed(
            f"The answer from your organisation's sign-in could not be verified: {reason}.",
            next_step="Sign in again. If it keeps failing, tell the proxy's operator.",
            status=403,
        )

    async def _jwks_uri(self) -> str:
        return (await self.provider()).jwks_uri

    def _user(self, claims: Mapping[str, Any]) -> str:
        value = claims.get(self.user_claim)
        if not isinstance(value, str) or not ID_PATTERN.fullmatch(value) or value.lower() in RESERVED:
            shown = "has none" if value is None else f"is {str(value)[:100]!r}"
            log.warning("sign-in refused: no usable user id", claim=self.user_claim)
            raise Forbidden(
                f"Your account cannot be used here: Keybearer takes your user id from the sign-in's "
                f"`{self.user_claim}` claim, and yours {shown}. A user id is 1-128 letters, digits, '.', '_', "
                "'@' and '-'.",
                next_step="Tell the proxy's operator (the login_user_claim setting).",
                title="Account not usable here",
            )
        return value

    def _is_admin(self, claims: Mapping[str, Any]) -> bool:
        if not self.admin_claim:
            return False
        value = claims.get(self.admin_claim)
        held = value if isinstance(value, list) else [value]
        return any(isinstance(v, str) and v in self.admin_values for v in held)


def _id_token(value: str, claims: Mapping[str, Any]) -> IdToken:
    return IdToken(value, float(claims["iat"]), float(claims["exp"]))


def _bounded(refresh_token: str | None) -> str | None:
    if refresh_token is not None and len(refresh_token) > MAX_TOKEN_CHARS:
        log.warning("the provider's refresh token is too long to keep; ID tokens will not be renewed")
        return None
    return refresh_token


def provider_from_metadata(fetcher: Fetcher, metadata: Mapping[str, Any], url: str, issuer: str) -> Provider:
    """Validate an OpenID provider's configuration: its issuer exactly, endpoints the fetcher accepts."""
    if metadata.get("issuer") != issuer:
        raise DiscoveryError(f"{url} names issuer {str(metadata.get('issuer'))[:200]!r}, not {issuer!r}")
    endpoints: dict[str, str] = {}
    for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
        endpoints[name] = checked_endpoint(fetcher, metadata, name, url)
    methods = _strings(metadata.get("code_challenge_methods_supported"))
    if methods is not None and "S256" not in methods:
        raise DiscoveryError(f"{issuer} does not support PKCE with S256")
    auth_server = AuthServer(
        issuer=issuer,
        authorization_endpoint=endpoints["authorization_endpoint"],
        token_endpoint=endpoints["token_endpoint"],
        token_endpoint_auth_methods_supported=_strings(metadata.get("token_endpoint_auth_methods_supported")),
        scopes_supported=_strings(metadata.get("scopes_supported")),
        authorization_response_iss_parameter_supported=(
            metadata.get("authorization_response_iss_parameter_supported") is True
        ),
        raw=dict(metadata),
        metadata_url=url,
    )
    return Provider(auth_server, endpoints["jwks_uri"])


def _strings(value: Any) -> tuple[str, ...] | None:
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else None


def _display_name(claims: Mapping[str, Any], user: str) -> str:
    for claim in ("name", "preferred_username", "email"):
        value = claims.get(claim)
        if isinstance(value, str) and value.strip() and value.isprintable():
            return value.strip()[:100]
    return user


# -- the pages ---------------------------------------------------------------------------


class LoginPages:
    def __init__(self, sessions: Sessions, party: RelyingParty | None, kept: KeepsSignIns | None) -> None:
        self.sessions = sessions
        self.party = party
        self.kept = kept
        self.browser_cookie = cookie_name("kb_login", sessions.secure)

    async def login(self, request: Request) -> Response:
        if self.party is None:
            raise NotFound(
                "Signing in is not set up on this proxy.",
                next_step="Use the link your agent shows you; to see your connections, ask the operator for a "
                "link (`keybearer link YOUR-USER-ID`).",
                title="No sign-in here",
                action=("Home", "/"),
            )
        browser_id = request.cookies.get(self.browser_cookie) or secrets.token_urlsafe(32)
        url = await self.party.begin(browser_id, safe_next(request.query_params.get("next")))
        response = RedirectResponse(url, status_code=303, headers=pages.SECURITY_HEADERS)
        response.set_cookie(
            self.browser_cookie, browser_id, max_age=int(PENDING_TTL), httponly=True, samesite="lax",
            secure=self.sessions.secure, path="/",
        )  # fmt: skip
        return response

    async def callback(self, request: Request) -> Response:
        if self.party is None:
            return await self.login(request)
        identity = await self.party.finish(request.query_params, request.cookies.get(self.browser_cookie, ""))
        response = RedirectResponse(identity.next_path, status_code=303, headers=pages.SECURITY_HEADERS)
        # A sign-in always gets a fresh session: an id planted before it is worth nothing after.
        await self.sessions.forget(request)
        await self.sessions.start(response, identity.user, identity.admin, identity.name)
        if self.kept is not None:
            await self.kept.keep(identity)
        return response

    async def logout_page(self, request: Request) -> Response:
        session = await self._session(request)
        if session is None:
            return pages.signed_out(self.sessions.signs_in)
        return pages.sign_out(self.sessions.csrf(session), self.sessions.person(session))

    async def logout(self, request: Request) -> Response:
        session = await self._session(request)
        if session is not None:
            form = await read_form(request)
            self.sessions.check_csrf(session, str(form.get("csrf", "")))
        response = pages.signed_out(self.sessions.signs_in)
        await self.sessions.end(request, response)
        if session is not None and session.user and self.kept is not None:
            await self.kept.forget(session.user)  # no more exchanges in their name
        return response

    async def _session(self, request: Request) -> Session | None:
        try:
            return await self.sessions.current(request)
        except SessionEnded:
            return None


def routes(pages_: LoginPages) -> list[Route]:
    endpoint = errors.page_endpoint
    return [
        Route("/login", endpoint(pages_.login), methods=["GET"]),
        Route(CALLBACK_PATH, endpoint(pages_.callback), methods=["GET"]),
        Route("/logout", endpoint(pages_.logout_page), methods=["GET"]),
        Route("/logout", endpoint(pages_.logout), methods=["POST"]),
    ]
