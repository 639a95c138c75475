"""Requests a web page could have sent never reach an upstream with a credential.

A page in the user's browser can POST to a proxy on the same laptop (a
"simple" cross-site request needs no CORS preflight), or rebind a domain of
its own to 127.0.0.1 and talk to the proxy as that domain. The first carries
the page's `Origin`; the second a `Host` that names the page's domain. Agents
send neither a foreign `Origin` nor a foreign `Host`.

- `Origin`, when present, must be the proxy's own (`public_url`) or one the
  operator allows (`allowed_origins`, for browser-based MCP clients).
- `Host` must be an IP address (a rebinding page always names its own
  domain), `localhost`, the `public_url` host, or one the operator allows
  (`allowed_hosts`: a Kubernetes Service name, an ingress host; `*` turns the
  check off for deployments whose front proxy rewrites `Host`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

from proxy.bounded import BoundedMap
from proxy.errors import Answer

MAX_JUDGED = 256


def _origin(url: str) -> str:
    parts = urlsplit(url.strip().lower())
    default = {"http": 80, "https": 443}.get(parts.scheme)
    try:
        port = parts.port
    except ValueError:
        return ""
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if port is not None and port != default:
        netloc += f":{port}"
    return f"{parts.scheme}://{netloc}"


def _host_name(host: str) -> str:
    """The name part of a Host header value, lower-cased, without port or brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


class WebOriginGuard:
    def __init__(self, public_url: str, allowed_origins: Iterable[str], allowed_hosts: Iterable[str]) -> None:
        self.origins = frozenset({_origin(public_url), *(_origin(o) for o in allowed_origins)}) - {""}
        hosts = {_host_name(h) for h in allowed_hosts}
        self.any_host = "*" in hosts
        self.hosts = frozenset({urlsplit(public_url).hostname or "", "localhost", *hosts}) - {""}
        # Host values seen, judged once: an agent sends the same one on every request.
        self._judged: BoundedMap[bytes, bool] = BoundedMap(MAX_JUDGED)

    def refusal(self, headers: Iterable[tuple[bytes, bytes]], *, origin: bool = True) -> Answer | None:
        """The 403 for a request a web page could have sent, or None. People's own
        pages check only the host: a sign-in that comes back from an authorization
        server arrives with a foreign (or `null`) Origin, and their forms carry
        CSRF tokens of their own."""
        for name, value in headers:
            if origin and name == b"origin" and _origin(value.decode("latin-1")) not in self.origins:
                return Answer(
                    403,
                    "foreign_origin",
                    f"requests from web pages at {value.decode('latin-1')[:100]!r} are refused: a page in a "
                    "browser must not use a person's MCP credentials",
                    "an MCP client that runs in a browser needs its origin in the proxy's allowed_origins",
                )
            if name == b"host" and not self._host_ok(value):
                return Answer(
                    403,
                    "foreign_host",
                    f"this proxy does not answer to the host name {value.decode('latin-1')[:100]!r}",
                    "reach it by its public_url, an IP address or localhost; an operator can add the name "
                    "to allowed_hosts",
                )
        return None

    def _host_ok(self, value: bytes) -> bool:
        judged = self._judged.get(value)
        if judged is None:
            judged = self._judged[value] = self.host_allowed(value.decode("latin-1"))
        return judged

    def host_allowed(self, host: str) -> bool:
        if self.any_host:
            return True
        name = _host_name(host)
        if name in self.hosts or name.endswith(".localhost"):
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True
