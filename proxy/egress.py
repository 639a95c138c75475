"""Egress through a corporate HTTP proxy: which upstream goes through which proxy.

Read once, at start, from the standard environment variables every other tool
in the image already honours (curl, pip, the platform's own agents), rather
than from settings of Keybearer's own that would have to be kept in step:

- `https_proxy` / `HTTPS_PROXY` for https upstreams, `http_proxy` /
  `HTTP_PROXY` for http ones (the lower-case name wins when both are set, as
  with curl); `http://[user:password@]host[:port]`, or `host:port`. Only plain
  http proxies: an https or SOCKS proxy URL stops the start with a message.
- `no_proxy` / `NO_PROXY`: hosts reached directly, with curl's meaning: a
  comma- (or space-) separated list; a name matches itself and every name
  below it (`example.com` and `.example.com` both match `api.example.com`);
  an IP address or CIDR range matches addresses written literally in the URL;
  `*` matches everything.
- Loopback (`localhost`, `*.localhost`, 127.0.0.0/8, ::1) is never proxied.

`ALL_PROXY` is not read: it is often a SOCKS proxy meant for other tools.
Credentials in a proxy URL become a `Proxy-Authorization: Basic` header; they
are registered with the log redaction and never shown: `ProxyServer` prints as
`host:port`.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from proxy import logs
from proxy.settings import ConfigError


@dataclass(frozen=True, slots=True)
class ProxyServer:
    host: str
    port: int
    # The Proxy-Authorization value, or None; never printed.
    authorization: bytes | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The proxy's URL without its credentials."""
        return f"http://{self}"


@dataclass(frozen=True, slots=True)
class Egress:
    """The proxies to use, per URL scheme, and the hosts that bypass them."""

    http: ProxyServer | None
    https: ProxyServer | None
    no_proxy: tuple[str, ...] = ()

    def proxy_for(self, scheme: str, host: str) -> ProxyServer | None:
        """The proxy an origin is reached through, or None for a direct connection."""
        proxy = self.https if scheme == "https" else self.http
        if proxy is None or is_loopback(host) or bypassed(host, self.no_proxy):
            return None
        return proxy

    def __str__(self) -> str:
        return f"http via {self.http or 'direct'}, https via {self.https or 'direct'}, no_proxy {','.join(self.no_proxy) or '-'}"


def from_environ(env: Mapping[str, str]) -> Egress | None:
    """The environment's egress proxies, or None when there are none (every origin direct).
    A proxy URL that cannot be used raises ConfigError naming its variable."""
    http = _proxy(env, "http_proxy")
    https = _proxy(env, "https_proxy")
    if http is None and https is None:
        return None
    no_proxy = _variable(env, "no_proxy")[1]
    entries = tuple(e for e in no_proxy.replace(",", " ").split() if e)
    return Egress(http, https, entries)


def _variable(env: Mapping[str, str], name: str) -> tuple[str, str]:
    for variable in (name, name.upper()):
        value = env.get(variable, "").strip()
        if value:
            return variable, value
    return name.upper(), ""


def _proxy(env: Mapping[str, str], name: str) -> ProxyServer | None:
    variable, value = _variable(env, name)
    if not value:
        return None
    if "://" not in value:
        value = "http://" + value
    try:
        parts = urlsplit(value)
        port = parts.port or 80
    except ValueError:
        raise ConfigError(
            variable, f"is not a proxy URL such as http://proxy.example:3128 ({_shown(value)})"
        ) from None
    if parts.scheme.lower() != "http" or not parts.hostname:
        raise ConfigError(
            variable,
            f"only http:// proxies are supported, as http://[user:password@]host:port (got {_shown(value)})",
        )
    authorization = None
    if parts.username is not None:
        password = unquote(parts.password or "")
        token = base64.b64encode(f"{unquote(parts.username)}:{password}".encode()).decode("ascii")
        authorization = f"Basic {token}".encode("ascii")
        logs.register_secret(token)
        logs.register_secret(password)
    return ProxyServer(parts.hostname, port, authorization)


def _shown(url: str) -> str:
    """A proxy URL for a message: without its credentials."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


def is_loopback(host: str) -> bool:
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def bypassed(host: str, no_proxy: tuple[str, ...]) -> bool:
    """Whether `host` matches a no_proxy entry, as curl matches them."""
    host = host.strip("[]").rstrip(".").lower()
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for entry in no_proxy:
        if entry == "*":
            return True
        entry = entry.strip("[]").lower()
        if ip is not None:
            try:
                if ip in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass  # a name: never matches an address
            continue
        name = entry.lstrip(".").rstrip(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False
