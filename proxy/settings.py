"""Every setting Keybearer reads, declared in one place.

Sources, strongest first: command-line flags, `KEYBEARER_*` environment
variables, the YAML file. Every secret can also come from a file named by the
`…_FILE` twin of its variable, which is how Kubernetes Secrets are mounted.
Unknown keys are errors: a typo in an auth proxy's config must not silently
turn a setting off.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from proxy.errors import InvalidInput

AuthType = Literal["none", "api_key", "oauth"]
AUTH_TYPES: tuple[str, ...] = ("none", "api_key", "oauth")
# How an oauth server's tokens are obtained: per user through the browser
# (authorization_code), or one for the whole server, as the proxy's own client
# (client_credentials: machine to machine, no person involved), or per user as
# the organisation's identity provider allows (identity_assertion: the person's
# sign-in exchanged for an ID-JAG, presented with a JWT bearer grant).
Grant = Literal["authorization_code", "client_credentials", "identity_assertion"]
GRANTS: tuple[str, ...] = ("authorization_code", "client_credentials", "identity_assertion")
# The grants that act as one static client of the server's authorization server.
STATIC_CLIENT_GRANTS = ("client_credentials", "identity_assertion")
# The `aud` of a private_key_jwt client assertion (RFC 7523 §3).
AssertionAudience = Literal["token_endpoint", "issuer"]
ASSERTION_AUDIENCES: tuple[str, ...] = ("token_endpoint", "issuer")

# One path segment, a conservative alphabet, a length cap. Starting with an
# alphanumeric rules out "." and ".." without a special case.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
SERVER_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
HEADER_NAME_PATTERN = re.compile(r"[A-Za-z0-9-]{1,64}")
ENV_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# First path segments a configurable proxy path may use (they are reserved as user ids).
RESERVED_FOR_PATHS = frozenset({"oauth", "oauth2", "callback", "connect", "keybearer"})
UPSTREAM_PATH_PATTERN = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@/-]{0,1023}")
# Headers that frame or route a request, or belong to one hop: a key sent in one
# would change what the upstream (or anything in between) reads as the request.
FRAMING_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer",
     "upgrade", "cookie", "expect"}
)  # fmt: skip
# Secrets read from this machine's environment or files: only the operator's
# config file may name them, never a server added through the admin API or CLI.
OPERATOR_ONLY_KEYS = (
    "api_key_env", "api_key_file", "client_secret_env", "client_secret_file", "client_private_key_file",
)  # fmt: skip
# /<user>/<server>/mcp is the MCP endpoint too (routing.py), so it is never an upstream path.
MCP_ALIAS = "/mcp"


class ConfigError(InvalidInput):
    """A setting or a server definition is wrong; `key` names it the way the operator wrote it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class ServerConfig:
    """One upstream MCP server."""

    id: str
    url: str
    auth: AuthType = "none"
    # api_key: where the key comes from (env or file win over a stored key)
    # and how it is presented upstream.
    api_key_env: str | None = None
    api_key_file: str | None = None
    api_key_header: str = "Authorization"
    api_key_scheme: str = "Bearer"
    # Upstream paths on the server's origin reachable besides `url` itself.
    paths: tuple[str, ...] = ()
    # oauth
    grant: Grant = "authorization_code"
    client_id: str | None = None
    client_secret_env: str | None = None
    client_secret_file: str | None = None
    # client_credentials and identity_assertion only: private_key_jwt client authentication (RFC 7523)
    # with the PEM private key in this file, instead of a secret.
    client_private_key_file: str | None = None
    client_key_id: str | None = None
    client_assertion_audience: AssertionAudience = "token_endpoint"
    scopes: tuple[str, ...] = ()
    resource: bool = True
    authorization_params: Mapping[str, str] = field(default_factory=dict)
    # Where the definition came from: "config" servers are read-only at run time.
    source: Literal["config", "store"] = "config"

    @property
    def credential_kind(self) -> str:
        """The credential source that serves the server (credentials/): its auth
        type, or for an oauth server its grant when that is not the code flow."""
        if self.auth == "oauth" and self.grant in STATIC_CLIENT_GRANTS:
            return self.grant
        return self.auth

    @property
    def origin(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def path(self) -> str:
        return urlsplit(self.url).path or "/"

    def to_dict(self) -> dict[str, Any]:
        """The declarative form, as written in YAML or sent to the admin API."""
        out: dict[str, Any] = {}
        defaults = ServerConfig(id=self.id, url=self.url)
        for f in fields(self):
            if f.name in ("id", "source"):
                continue
            value = getattr(self, f.name)
            if f.name in ("url", "auth") or value != getattr(defaults, f.name):
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


_SERVER_KEYS = {f.name for f in fields(ServerConfig)} - {"id", "source"}


def parse_server(server_id: str, raw: Any, *, key: str, source: str = "config") -> ServerConfig:
    """Validate one server definition; raise ConfigError naming the bad key."""
    if not isinstance(server_id, str) or not SERVER_ID_PATTERN.fullmatch(server_id):
        raise ConfigError(
            key, "server id must be 1-64 characters of a-z, 0-9, '-' and '_', starting alphanumeric"
        )
    if not isinstance(raw, Mapping):
        raise ConfigError(key, "must be a mapping with at least `url` and `auth`")
    unknown = sorted(set(raw) - _SERVER_KEYS)
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(_SERVER_KEYS))})")
    if source != "config":
        for name in OPERATOR_ONLY_KEYS:
            if name in raw:
                raise ConfigError(f"{key}.{name}", _operator_only(name, server_id))
    if "url" not in raw:
        raise ConfigError(f"{key}.url", "required")
    url = _upstream_url(raw["url"], key=f"{key}.url")
    auth = raw.get("auth", "none")
    if auth not in AUTH_TYPES:
        raise ConfigError(f"{key}.auth", f"must be one of {', '.join(AUTH_TYPES)} (got {auth!r})")
    values: dict[str, Any] = {"id": server_id, "url": url, "auth": auth, "source": source}
    for name in ("api_key_env", "client_secret_env"):
        if name in raw:
            values[name] = _string(
                raw[name], f"{key}.{name}", ENV_NAME_PATTERN, "an environment variable name"
            )
    for name in (
        "api_key_file",
        "client_secret_file",
        "client_id",
        "client_private_key_file",
        "client_key_id",
    ):
        if name in raw:
            values[name] = _string(raw[name], f"{key}.{name}")
    if "api_key_header" in raw:
        values["api_key_header"] = _key_header(raw["api_key_header"], f"{key}.api_key_header")
    if "api_key_scheme" in raw:
        scheme = raw["api_key_scheme"]
        if scheme is None:
            scheme = ""
        values["api_key_scheme"] = _string(
            scheme,
            f"{key}.api_key_scheme",
            re.compile(r"[A-Za-z0-9._-]{0,32}"),
            "a word such as Bearer, or empty",
        )
    if "paths" in raw:
        values["paths"] = tuple(
            _string(p, f"{key}.paths[{i}]", UPSTREAM_PATH_PATTERN, "an absolute path such as /messages/")
            for i, p in enumerate(_list(raw["paths"], f"{key}.paths"))
        )
        for i, p in enumerate(values["paths"]):
            if any(seg in (".", "..") for seg in p.split("/")):
                raise ConfigError(f"{key}.paths[{i}]", "dot segments are not allowed")
            if p == MCP_ALIAS:
                raise ConfigError(
                    f"{key}.paths[{i}]",
                    "/mcp cannot be opened: /<user>/<server>/mcp is the server's MCP endpoint "
                    "(for clients that insist on /mcp); to reach the upstream's /mcp, define it as "
                    "a server of its own with url: <origin>/mcp",
                )
    if "scopes" in raw:
        values["scopes"] = tuple(
            _string(s, f"{key}.scopes[{i}]", re.compile(r"[!#-\[\]-~]{1,256}"), "a scope token")
            for i, s in enumerate(_list(raw["scopes"], f"{key}.scopes"))
        )
    if "resource" in raw:
        if not isinstance(raw["resource"], bool):
            raise ConfigError(f"{key}.resource", "must be true or false")
        values["resource"] = raw["resource"]
    if "authorization_params" in raw:
        params = raw["authorization_params"]
        if not isinstance(params, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in params.items()
        ):
            raise ConfigError(f"{key}.authorization_params", "must map parameter names to strings")
        values["authorization_params"] = dict(params)
    for name, allowed in (("grant", GRANTS), ("client_assertion_audience", ASSERTION_AUDIENCES)):
        if name in raw:
            if raw[name] not in allowed:
                raise ConfigError(f"{key}.{name}", f"must be one of {', '.join(allowed)} (got {raw[name]!r})")
            values[name] = raw[name]
    _check_client_credentials(values, key)
    if auth != "api_key":
        for name in ("api_key_env", "api_key_file"):
            if name in values:
                raise ConfigError(f"{key}.{name}", f"only meaningful with auth: api_key (auth is {auth})")
    if auth != "oauth":
        for name in ("client_id", "client_secret_env", "client_secret_file", "scopes", "grant"):
            if name in values:
                raise ConfigError(f"{key}.{name}", f"only meaningful with auth: oauth (auth is {auth})")
    return ServerConfig(**values)


def _operator_only(name: str, server_id: str) -> str:
    stored = (
        f"PUT /admin/servers/{server_id}/api-key or `keybearer api-key set {server_id}`"
        if name.startswith("api_key")
        else f"PUT /admin/servers/{server_id}/oauth-client or `keybearer oauth-client set {server_id}`"
    )
    return (
        "environment variables and files are named only in the config file (the operator's), never "
        f"through the admin API or `keybearer servers add`: define this server in the config file, "
        f"or store the secret itself with {stored}"
    )


def _key_header(raw: Any, key: str) -> str:
    name = _string(raw, key, HEADER_NAME_PATTERN, "an HTTP header name")
    if name.lower() in FRAMING_HEADERS or name.lower().startswith("proxy-"):
        raise ConfigError(
            key,
            f"{name} frames or routes the request (or is a hop-by-hop or cookie header) and cannot carry "
            "an API key; use Authorization (the default) or a header such as X-API-Key",
        )
    return name


_KEY_SETTINGS = ("client_private_key_file", "client_key_id", "client_assertion_audience")


def _check_client_credentials(values: Mapping[str, Any], key: str) -> None:
    """The client_credentials and identity_assertion grants act as one static
    client; its private key (or secret) authenticates it, and only they use a private key."""
    grant = values.get("grant")
    if grant not in STATIC_CLIENT_GRANTS:
        for name in _KEY_SETTINGS:
            if name in values:
                raise ConfigError(
                    f"{key}.{name}", "only meaningful with grant: client_credentials or identity_assertion"
                )
        return
    if values["auth"] != "oauth":
        return  # refused below, naming the auth type
    if "client_id" not in values:
        raise ConfigError(
            f"{key}.client_id",
            f"required with grant: {grant} (the client registered for the proxy at the "
            "server's authorization server)",
        )
    if "client_private_key_file" in values:
        for name in ("client_secret_env", "client_secret_file"):
            if name in values:
                raise ConfigError(
                    f"{key}.{name}", "give either a client secret or client_private_key_file, not both"
                )
    else:
        for name in ("client_key_id", "client_assertion_audience"):
            if name in values:
                raise ConfigError(f"{key}.{name}", "only meaningful with client_private_key_file")


def _upstream_url(raw: Any, *, key: str) -> str:
    if not isinstance(raw, str) or len(raw) > 2048:
        raise ConfigError(key, "must be an http(s) URL of at most 2048 characters")
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018  (raises on a port that is not a number of 0-65535)
    except ValueError:
        raise ConfigError(key, f"must be an absolute http:// or https:// URL (got {raw!r})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, f"must be an absolute http:// or https:// URL (got {raw!r})")
    try:
        parts.hostname.encode("idna")
    except UnicodeError:
        raise ConfigError(key, f"{parts.hostname!r} is not a valid host name") from None
    if parts.username or parts.password:
        raise ConfigError(key, "must not carry credentials; use auth: api_key or oauth")
    if parts.fragment:
        raise ConfigError(key, "must not have a #fragment")
    return raw


def _string(raw: Any, key: str, pattern: re.Pattern[str] | None = None, what: str = "a string") -> str:
    if not isinstance(raw, str) or (pattern is not None and not pattern.fullmatch(raw)):
        raise ConfigError(key, f"must be {what} (got {raw!r})")
    return raw


def _list(raw: Any, key: str) -> list[Any]:
    if isinstance(raw, str):
        return raw.split()
    if not isinstance(raw, list):
        raise ConfigError(key, "must be a list")
    return raw


def setting(default: Any, kind: str, *, secret: bool = False) -> Any:
    """Declare a setting: its default, how its value is parsed (`_convert`), and
    whether it is a secret (then `KEYBEARER_<NAME>_FILE` may name a file holding it)."""
    return field(default=default, metadata={"kind": kind, "secret": secret})


@dataclass(frozen=True)
class Settings:
    listen: str = setting("127.0.0.1:8080", "listen")
    public_url: str = setting("http://127.0.0.1:8080", "url")
    database_url: str = setting("sqlite:///keybearer.db", "str", secret=True)
    redis_url: str | None = setting(None, "str", secret=True)
    redis_prefix: str = setting("mcp", "prefix")
    admin_token: str | None = setting(None, "str", secret=True)
    salt: str | None = setting(None, "str", secret=True)
    # Earlier salts, still accepted for decryption while `keys rotate` runs.
    salt_previous: tuple[str, ...] = setting((), "list", secret=True)
    max_body_bytes: int = setting(4 * 1024 * 1024, "int")
    upstream_connect_timeout: float = setting(10.0, "float")
    # Time allowed for the upstream's response headers, and between chunks of
    # a non-stream body. An open event stream has no read timeout.
    upstream_timeout: float = setting(60.0, "float")
    log_level: str = setting("info", "level")
    # Traces name the user (enduser.id) only when the operator allows it (docs/operations.md "Traces").
    trace_user_ids: bool = setting(False, "bool")
    # Shared deployments.
    migrate_on_start: bool = setting(False, "bool")
    postgres_pool_size: int = setting(10, "int")
    # Off behind PgBouncer in transaction mode, which cannot keep prepared statements.
    postgres_statement_cache: bool = setting(True, "bool")
    # One deadline for each Redis or PostgreSQL operation, retries included: a
    # store that hangs answers 503 this soon, like one that is down. /ready
    # answers within it too (keep readiness probes' timeouts above it).
    store_timeout: float = setting(3.0, "float")
    # OAuth, the browser side.
    callback_path: str = setting("/oauth/callback", "path")
    connect_link_ttl: float = setting(3600.0, "float")
    # A header set by a trusted SSO proxy in front; when set, it must equal the
    # path's user for a browser to complete a connection.
    browser_identity_header: str | None = setting(None, "header")
    refresh_skew: float = setting(60.0, "float")
    # The refresh lock's lifetime: its holder renews it every third of this
    # while it lives, so a replica that died holding it blocks that user's
    # refresh at most this long (others answer 503 meanwhile).
    refresh_lock_ttl: float = setting(10.0, "float")
    # After repeated failures at one authorization server, how long to stop
    # calling it (requests then get 503 at once instead of waiting on it).
    token_endpoint_cooldown: float = setting(15.0, "float")
    metadata_cache_ttl: float = setting(3600.0, "float")
    # Discovery fetches: plain http only to loopback, and only when allowed (tests).
    oauth_allow_http_loopback: bool = setting(False, "bool")
    # Private (RFC 1918 and the like) addresses, for authorization servers inside the cluster.
    oauth_allow_private_addresses: bool = setting(False, "bool")
    # Loopback and private networks (CIDR) that servers added through the admin
    # API or `keybearer servers add` may point at; config-file servers may point anywhere.
    api_servers_allowed_networks: tuple[str, ...] = setting((), "list")
    # Where authorization servers fetch the proxy's Client ID Metadata Document,
    # which is also its client id there; None: <public_url>/oauth/client-metadata.json.
    client_metadata_url: str | None = setting(None, "str")
    # Serving.
    workers: int = setting(1, "int")
    # Seconds in-flight requests get to finish on SIGTERM; open event streams
    # are ended at once so that their clients reconnect to another replica.
    shutdown_timeout: float = setting(10.0, "float")
    metrics_listen: str | None = setting(None, "listen")  # HOST:PORT for /metrics on its own port
    # Inbound connections, bounded before caller authentication can run (each
    # per worker process): a request head's size (request line and headers),
    # the seconds from its first byte until it is complete, open connections.
    max_header_bytes: int = setting(64 * 1024, "int")
    header_timeout: float = setting(10.0, "float")
    max_connections: int = setting(1000, "int")
    # Inbound caller authentication, for shared deployments.
    inbound_auth: str = setting("none", "inbound")
    jwt_jwks_url: str | None = setting(None, "url")
    jwt_issuer: str | None = setting(None, "str")
    jwt_audience: str | None = setting(None, "str")
    jwt_user_claim: str = setting("sub", "str")
    # Listening beyond loopback without inbound_auth lets anyone act as any user.
    allow_unauthenticated_listen: bool = setting(False, "bool")
    # Web pages: origins of browser-based MCP clients allowed to call through the
    # proxy, and host names it answers to beyond IP addresses, localhost and
    # public_url's host (web_origin.py).
    allowed_origins: tuple[str, ...] = setting((), "list")
    allowed_hosts: tuple[str, ...] = setting((), "list")
    # Signing people in with the organisation's OpenID Connect provider (login.py):
    # off without an issuer, and then signed links are the only way in.
    login_issuer: str | None = setting(None, "issuer")
    login_client_id: str | None = setting(None, "str")
    login_client_secret: str | None = setting(None, "str", secret=True)
    login_scopes: str = setting("openid profile email", "scopes")
    # The ID token claim that is the person's user id, and the claim (a string
    # or a list) that makes an operator when it holds one of the values.
    login_user_claim: str = setting("sub", "claim")
    login_admin_claim: str | None = setting(None, "claim")
    login_admin_values: tuple[str, ...] = setting((), "list")
    # A browser session ends after this long unused, and after its lifetime whatever happens.
    session_idle_timeout: float = setting(7200.0, "float")
    session_lifetime: float = setting(43200.0, "float")
    # From the config file only.
    servers: Mapping[str, ServerConfig] = field(default_factory=dict)
    config_file: str | None = None

    @property
    def signs_in(self) -> bool:
        """People sign in with the organisation's provider (the login_* settings)."""
        return self.login_issuer is not None

    @property
    def listens_on_loopback(self) -> bool:
        host = self.listen_host
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    @property
    def listen_host(self) -> str:
        host, _, _ = self.listen.rpartition(":")
        return host.strip("[]")

    @property
    def listen_port(self) -> int:
        return int(self.listen.rpartition(":")[2])


# name -> (kind, is_secret), read off the declarations above.
SETTINGS: dict[str, tuple[str, bool]] = {
    f.name: (f.metadata["kind"], f.metadata["secret"]) for f in fields(Settings) if "kind" in f.metadata
}
FILE_ONLY_KEYS = {"servers"}
ENV_PREFIX = "KEYBEARER_"


def env_name(setting: str) -> str:
    return ENV_PREFIX + setting.upper()


def load_settings(
    config_file: str | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge file < environment < flags into validated Settings."""
    env = os.environ if env is None else env
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    config_file = flags.pop("config", None) or env.get(ENV_PREFIX + "CONFIG") or config_file
    raw: dict[str, Any] = _read_file(config_file) if config_file else {}

    values: dict[str, Any] = {}
    for name in raw:
        if name not in SETTINGS and name not in FILE_ONLY_KEYS:
            known = ", ".join(sorted([*SETTINGS, *FILE_ONLY_KEYS]))
            raise ConfigError(name, f"unknown key (known: {known})")
    for name, (kind, secret) in SETTINGS.items():
        if name in raw:
            values[name] = _convert(kind, raw[name], name)
        from_env = _from_env(env, name, secret)
        if from_env is not None:
            values[name] = _convert(kind, from_env, env_name(name))
        if name in flags:
            values[name] = _convert(kind, flags[name], "--" + name.replace("_", "-"))

    servers_raw = raw.get("servers") or {}
    if not isinstance(servers_raw, Mapping):
        raise ConfigError("servers", "must be a mapping of server id to its definition")
    values["servers"] = {
        sid: parse_server(sid, body, key=f"servers.{sid}") for sid, body in servers_raw.items()
    }
    values["config_file"] = config_file
    settings = Settings(**values)
    if settings.max_body_bytes < 1024:
        raise ConfigError("max_body_bytes", "must be at least 1024")
    if settings.max_header_bytes < 1024:
        raise ConfigError("max_header_bytes", "must be at least 1024")
    if settings.max_connections < 1:
        raise ConfigError("max_connections", "must be at least 1")
    if not 1 <= settings.workers <= 64:
        raise ConfigError("workers", "must be between 1 and 64")
    for network in settings.api_servers_allowed_networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(
                "api_servers_allowed_networks", f"{network!r} is not a network such as 10.0.0.0/8 or ::1/128"
            ) from None
    if settings.client_metadata_url is not None:
        _check_client_metadata_url(settings.client_metadata_url, settings.oauth_allow_http_loopback)
    if settings.inbound_auth == "jwt" and not (settings.jwt_jwks_url and settings.jwt_issuer):
        raise ConfigError("jwt_jwks_url", "inbound_auth: jwt needs jwt_jwks_url and jwt_issuer")
    if settings.inbound_auth == "jwt" and not settings.jwt_audience:
        # Without it, any token the issuer made for any other service would pass.
        raise ConfigError(
            "jwt_audience", "inbound_auth: jwt needs jwt_audience, the audience of this proxy's tokens"
        )
    _check_login(settings)
    return settings


def _check_client_metadata_url(url: str, allow_http_loopback: bool) -> None:
    """A client id that authorization servers fetch: https (plain http only to
    loopback, for tests), a host, a path; no query, fragment, credentials or
    dot segments (draft-ietf-oauth-client-id-metadata-document §3)."""
    key = "client_metadata_url"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ConfigError(key, f"is not a valid URL (got {url!r})") from None
    loopback = parts.hostname in ("127.0.0.1", "::1", "localhost")
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback and allow_http_loopback):
        raise ConfigError(
            key,
            f"must be an https:// URL (plain http only to a loopback address, with "
            f"oauth_allow_http_loopback) (got {url!r})",
        )
    if not parts.hostname or parts.path in ("", "/") or len(url) > 2048:
        raise ConfigError(
            key, f"must name a document by its path, e.g. https://proxy.example.com/client.json (got {url!r})"
        )
    if "?" in url or "#" in url or parts.username is not None or parts.password is not None:
        raise ConfigError(key, f"must have no query, fragment or credentials (got {url!r})")
    if any(segment in (".", "..") for segment in parts.path.split("/")):
        raise ConfigError(key, f"must have no . or .. path segments (got {url!r})")


def _check_login(settings: Settings) -> None:
    if not settings.signs_in:
        for server in settings.servers.values():
            if server.grant == "identity_assertion":
                raise ConfigError(
                    f"servers.{server.id}.grant",
                    "identity_assertion exchanges the person's sign-in at the organisation's identity "
                    "provider: set login_issuer and login_client_id (docs/enterprise.md)",
                )
        for name in ("login_client_id", "login_client_secret", "login_admin_claim"):
            if getattr(settings, name):
                raise ConfigError(
                    "login_issuer", f"{name} is set but login_issuer is not: set both, or neither"
                )
        return
    if not settings.login_client_id:
        raise ConfigError(
            "login_client_id",
            "login_issuer needs the client id registered at that provider, with the redirect URI "
            f"{settings.public_url}/login/callback",
        )
    if bool(settings.login_admin_claim) != bool(settings.login_admin_values):
        raise ConfigError(
            "login_admin_values",
            "login_admin_claim and login_admin_values go together: the claim, and the values of it that "
            "make an operator (e.g. groups and keybearer-admins)",
        )
    if settings.browser_identity_header:
        raise ConfigError(
            "browser_identity_header",
            "with login_issuer, people sign in to Keybearer itself; remove browser_identity_header",
        )


def _from_env(env: Mapping[str, str], name: str, secret: bool) -> str | None:
    names = [env_name(name)]
    if name == "salt":
        names.append("SALT")  # accepted for deployments that already set it
    for var in names:
        if secret and env.get(var + "_FILE"):
            path = env[var + "_FILE"]
            try:
                return Path(path).read_text().strip()
            except OSError as exc:
                raise ConfigError(var + "_FILE", f"cannot read {path}: {exc.strerror}") from None
        if env.get(var):
            return env[var]
    return None


def _read_file(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
    try:
        # libyaml's parser where it is built in: the pure-Python one took 0.15 s of a start with 500 servers.
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506 (a safe loader)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where else ""
        raise ConfigError("config", f"{path} is not valid YAML{at}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a mapping at the top level")
    return data


def _convert(kind: str, value: Any, key: str) -> Any:
    if kind == "int":
        if isinstance(value, bool) or not str(value).strip().isdigit():
            raise ConfigError(key, f"must be a whole number (got {value!r})")
        return int(value)
    if kind == "float":
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(key, f"must be a number of seconds (got {value!r})") from None
        if not 0 < number <= 86400:
            raise ConfigError(key, "must be between 0 and 86400 seconds")
        return number
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(key, f"must be true or false (got {value!r})")
    if kind == "scopes":
        scopes = (
            " ".join(value) if isinstance(value, list) and all(isinstance(v, str) for v in value) else value
        )
        if not isinstance(scopes, str) or "openid" not in scopes.split():
            raise ConfigError(key, f"must be space-separated scopes that include openid (got {value!r})")
        return " ".join(scopes.split())
    if kind == "list":
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ConfigError(key, "must be a list of strings (comma-separated in the environment)")
        return tuple(i.strip() for i in items if i.strip())
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string (got {value!r})")
    if kind == "listen":
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(key, f"must be HOST:PORT, e.g. 127.0.0.1:8080 (got {value!r})")
    elif kind == "url":
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ConfigError(key, f"must be an http(s) base URL without query (got {value!r})")
        value = value.rstrip("/")
    elif kind == "prefix":
        if ":" in value:
            # ':' separates the parts of every key: "kbt:cache" would put one
            # deployment's keys under another's "kbt:cache:*" (its cache).
            raise ConfigError(
                key,
                f"must not contain ':', which separates the parts of Redis keys (got {value!r}); "
                "deployments sharing a Redis need prefixes that do not nest, e.g. kbt-a and kbt-b",
            )
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
            raise ConfigError(key, f"must be 1-64 characters of letters, digits, _ . - (got {value!r})")
    elif kind == "path":
        if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", value) or any(
            s in (".", "..") for s in value.split("/")
        ):
            raise ConfigError(key, f"must be an absolute path such as /oauth/callback (got {value!r})")
        if value.split("/")[1].lower() not in RESERVED_FOR_PATHS:
            raise ConfigError(
                key,
                f"must start with one of /{', /'.join(sorted(RESERVED_FOR_PATHS))} so it cannot be a user id",
            )
    elif kind == "inbound":
        if value not in ("none", "tokens", "jwt"):
            raise ConfigError(key, f"must be one of none, tokens, jwt (got {value!r})")
    elif kind == "issuer":
        # Kept exactly as written: an ID token's `iss` must equal it character for character.
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ConfigError(
                key, f"must be the provider's issuer URL, e.g. https://login.example.com (got {value!r})"
            )
    elif kind == "claim":
        if not re.fullmatch(r"[!-~]{1,256}", value):
            raise ConfigError(key, f"must be a claim name such as sub, email or groups (got {value!r})")
    elif kind == "header":
        if not HEADER_NAME_PATTERN.fullmatch(value):
            raise ConfigError(key, f"must be an HTTP header name (got {value!r})")
    elif kind == "level":
        value = value.lower()
        if value not in ("debug", "info", "warning", "error"):
            raise ConfigError(key, "must be one of debug, info, warning, error")
    return value
