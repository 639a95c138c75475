"""Fetching what OAuth discovery hands the proxy, without letting it point anywhere.

Every URL the proxy fetches on behalf of an MCP server or an authorization
server comes from someone else's metadata. `Fetcher` checks each one before a
byte is sent:

- the scheme is https; plain http only to a loopback address, and only when
  `allow_http_loopback` is set (tests, local development);
- the host is resolved and every address it resolves to is checked: link-local,
  cloud metadata, unspecified, multicast, broadcast and reserved addresses are
  always refused, private ranges unless `allow_private`, loopback unless
  `allow_http_loopback`.

The address check lives in the connector's resolver, so the address the socket
connects to is the address that was checked (no DNS-rebinding window between a
check and a connect). Literal IP addresses never reach a resolver in aiohttp,
so they are checked up front, which also gives the clearest message.

Through an egress proxy (egress.py), the proxy would resolve the target's name
itself, past the check. So the fetcher resolves and checks the target first and
asks the proxy for exactly that address (`CONNECT 203.0.113.7:443`), with TLS
verified against the host's name and `Host` naming it. The proxy's own address
is the operator's and is not checked: it is reached through a session of its
own whose only resolver use is the proxy's name.

Redirects are never followed (a 3xx is an error), responses are capped in size
and in time, and anything but a JSON object where one is expected is an error.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import socket
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from multidict import CIMultiDictProxy
from yarl import URL

from proxy import tracing
from proxy.egress import Egress
from proxy.errors import UpstreamFailed

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

USER_AGENT = "keybearer (MCP auth proxy)"

# Instance metadata services: refused even where private addresses are allowed.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, ...
        "fd00:ec2::254",  # AWS over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "169.254.170.2",  # AWS ECS task metadata
    )
)
PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
)
BROADCAST = ipaddress.ip_address("255.255.255.255")
NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Numeric hosts that are not dotted-quad IPv4 (2130706433, 0x7f.1, 127.1): the C
# resolver maps them onto addresses; they are never a legitimate metadata host.
NUMERIC_HOST = re.compile(r"(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]*))*\.?", re.IGNORECASE)


class OAuthProtocolError(UpstreamFailed):
    """The root of the protocol's errors: an authorization server, or what it
    pointed at, did not give what the protocol needs. The application above
    turns each into an answer that names the server."""

    code = "oauth_error"


class UnsafeURL(OAuthProtocolError):
    """A URL the proxy refuses to fetch; the message names it and says why."""


class FetchError(OAuthProtocolError):
    """A fetch failed. `transient` is true when trying again later may work
    (network trouble, timeouts, 5xx, 429); `http_status` is the status if one came."""

    def __init__(self, message: str, *, transient: bool, http_status: int | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.http_status = http_status


def address_refusal(ip: IPAddress, *, allow_loopback: bool, allow_private: bool) -> str | None:
    """Why an address may not be connected to, or None when it may."""
    if isinstance(ip, ipaddress.IPv6Address):
        # IPv4 addresses carried inside IPv6 ones are judged as IPv4.
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return address_refusal(embedded, allow_loopback=allow_loopback, allow_private=allow_private)
        if ip.scope_id:
            ip = ipaddress.IPv6Address(str(ip).split("%", 1)[0])
    if ip in METADATA_ADDRESSES:
        return "it is a cloud metadata address"
    if ip.is_unspecified:
        return "it is the unspecified address"
    if ip.is_multicast:
        return "it is a multicast address"
    if ip == BROADCAST:
        return "it is the broadcast address"
    if ip.is_link_local:
        return "it is a link-local address"
    if ip.is_loopback:
        return None if allow_loopback else "it is a loopback address"
    if any(ip in net for net in PRIVATE_NETWORKS if net.version == ip.version):
        return (
            None
            if allow_private
            else "it is a private address (set oauth_allow_private_addresses to allow it)"
        )
    if not ip.is_global:
        return "it is a reserved, non-public address"
    return None


def _literal_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _is_localhost_name(host: str) -> bool:
    host = host.rstrip(".").lower()
    return host == "localhost" or host.endswith(".localhost")


class _GuardedResolver(AbstractResolver):
    """Resolves through the default resolver and refuses the host if any of its
    addresses is one the policy forbids. aiohttp connects only to what this
    returns, so what is checked is what is connected to."""

    def __init__(self, inner: AbstractResolver, *, allow_loopback: bool, allow_private: bool) -> None:
        self._inner = inner
        self._allow_loopback = allow_loopback
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        localhost = _is_localhost_name(host)
        for result in results:
            ip = ipaddress.ip_address(result["host"])
            reason = address_refusal(
                ip, allow_loopback=self._allow_loopback, allow_private=self._allow_private
            )
            if reason is None and localhost and not ip.is_loopback:
                reason = "a localhost name must resolve to loopback"
            if reason is not None:
                raise UnsafeURL(f"host {host!r} resolves to {ip}, and {reason}")
        return results

    async def close(self) -> None:
        await self._inner.close()


class Fetcher:
    """The one HTTP client for OAuth discovery, registration and token calls."""

    def __init__(
        self,
        allow_http_loopback: bool,
        allow_private: bool,
        timeout: float = 10,
        max_bytes: int = 1_048_576,
        *,
        resolver: AbstractResolver | None = None,
        egress: Egress | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.allow_http_loopback = allow_http_loopback
        self.allow_private = allow_private
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.egress = egress
        # The resolver the guard wraps; tests inject one to map names onto addresses.
        self._inner_resolver = resolver
        # The CAs to trust instead of the system's (tests trust their own).
        self._ssl: ssl.SSLContext | bool = ssl_context or True
        self._guard: _GuardedResolver | None = None
        self._session: aiohttp.ClientSession | None = None
        self._proxied: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is not None:
            return
        inner = self._inner_resolver or aiohttp.ThreadedResolver()
        self._guard = _GuardedResolver(
            inner, allow_loopback=self.allow_http_loopback, allow_private=self.allow_private
        )
        self._session = self._new_session(self._guard)
        if self.egress is not None:
            # Resolves only the proxy's name: every target is sent as its checked address.
            self._proxied = self._new_session(aiohttp.ThreadedResolver())

    def _new_session(self, resolver: AbstractResolver) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(resolver=resolver, ttl_dns_cache=60, limit=64, ssl=self._ssl)
        return aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": USER_AGENT},
            trust_env=False,  # proxies are egress.py's to decide, with the target checked first
        )

    async def close(self) -> None:
        for session in (self._session, self._proxied):
            if session is not None:
                await session.close()
        self._session = self._proxied = None

    async def __aenter__(self) -> Fetcher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- checks ------------------------------------------------------------

    def check_url(self, url: str) -> None:
        """Refuse, with UnsafeURL, what can be refused without resolving a name:
        the scheme, credentials in the URL, and literal or numeric addresses."""
        try:
            parts = urlsplit(url)
            host = parts.hostname
            parts.port  # noqa: B018  (raises on a bad port)
        except (ValueError, TypeError):
            raise UnsafeURL(f"{_shown(url)!r} is not a valid URL") from None
        scheme = parts.scheme.lower()
        if scheme not in ("https", "http") or not host:
            raise UnsafeURL(f"{_shown(url)!r} is not an absolute https:// URL")
        if parts.username is not None or parts.password is not None:
            raise UnsafeURL(f"{_shown(url)}: URLs with credentials in them are refused")
        ip = _literal_ip(host)
        if ip is None and NUMERIC_HOST.fullmatch(host):
            raise UnsafeURL(f"{_shown(url)}: {host!r} is a numeric host that is not a dotted-quad address")
        if ip is not None:
            reason = address_refusal(
                ip, allow_loopback=self.allow_http_loopback, allow_private=self.allow_private
            )
            if reason is not None:
                raise UnsafeURL(f"{_shown(url)}: refused because {reason}")
        if scheme == "http":
            loopback = ip.is_loopback if ip is not None else _is_localhost_name(host)
            if not (self.allow_http_loopback and loopback):
                raise UnsafeURL(
                    f"{_shown(url)}: plain http is refused; OAuth URLs must be https"
                    + (" (http is allowed only to loopback, in tests)" if self.allow_http_loopback else "")
                )

    # -- requests ----------------------------------------------------------

    async def get_json(self, url: str, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        """GET a JSON object. Anything but a 2xx JSON object is a FetchError."""
        status, _, body = await self._request(
            "GET", url, headers={"Accept": "application/json", **(headers or {})}
        )
        if not 200 <= status < 300:
            raise FetchError(
                f"{_shown(url)} answered HTTP {status}",
                transient=_transient_status(status),
                http_status=status,
            )
        parsed = _json_object(body)
        if parsed is None:
            raise FetchError(
                f"{_shown(url)} did not answer with a JSON object", transient=False, http_status=status
            )
        return parsed

    async def post_form(
        self,
        url: str,
        data: Mapping[str, str],
        auth: aiohttp.BasicAuth | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, dict[str, Any] | None]:
        """POST a form; (status, JSON object or None) for 2xx and 4xx answers.
        5xx, 429, redirects and network trouble raise FetchError."""
        sent = {"Accept": "application/json", **(headers or {})}
        if auth is not None:
            sent["Authorization"] = auth.encode()
        status, _, body = await self._request("POST", url, headers=sent, data=dict(data))
        return self._answer(url, status, body)

    async def post_json(self, url: str, body: Any) -> tuple[int, dict[str, Any] | None]:
        """POST a JSON body; answers as for post_form."""
        status, _, answer = await self._request(
            "POST",
            url,
            headers={"Accept": "application/json", "Content-Type": "application/json"},
            data=json.dumps(body).encode(),
        )
        return self._answer(url, status, answer)

    async def send(
        self, method: str, url: str, *, headers: Mapping[str, str], data: bytes | None = None
    ) -> tuple[int, CIMultiDictProxy[str]]:
        """A request whose body is not wanted: (status, headers). Redirects are
        returned, not followed; only network trouble raises."""
        status, response_headers, _ = await self._request(
            method, url, headers=headers, data=data, read_body=False, redirects_ok=True
        )
        return status, response_headers

    def _answer(self, url: str, status: int, body: bytes) -> tuple[int, dict[str, Any] | None]:
        if _transient_status(status):
            raise FetchError(f"{_shown(url)} answered HTTP {status}", transient=True, http_status=status)
        if not (200 <= status < 300 or 400 <= status < 500):
            raise FetchError(f"{_shown(url)} answered HTTP {status}", transient=False, http_status=status)
        return status, _json_object(body)

    async def _request(
        self, method: str, url: str, **options: Any
    ) -> tuple[int, CIMultiDictProxy[str], bytes]:
        self.check_url(url)
        # The address without its query: a query may carry what is not the trace's to keep.
        shown = URL(url).with_user(None).with_query(None).with_fragment(None)
        attributes = {"http.request.method": method, "url.full": str(shown)}
        with tracing.span("oauth fetch", attributes, client=True) as span:
            answer = await self._exchange(method, url, **options)
            span.set_attribute("http.response.status_code", answer[0])
            return answer

    async def _exchange(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        data: Any = None,
        read_body: bool = True,
        redirects_ok: bool = False,
    ) -> tuple[int, CIMultiDictProxy[str], bytes]:
        if self._session is None:
            raise RuntimeError("Fetcher.start() was not called")
        target = URL(url)
        assert target.host is not None  # check_url refused URLs without one
        proxy = self.egress.proxy_for(target.scheme, target.host) if self.egress is not None else None
        try:
            async with asyncio.timeout(self.timeout):
                if proxy is None:
                    sending = self._session.request(
                        method, target, headers=dict(headers), data=data, allow_redirects=False
                    )
                else:
                    assert self._proxied is not None
                    # To the checked address: the proxy would resolve a name past the check.
                    sending = self._proxied.request(
                        method,
                        target.with_host(await self._checked_address(target)),
                        headers={"Host": target.raw_authority, **headers},
                        data=data,
                        allow_redirects=False,
                        proxy=proxy.url,
                        # On the CONNECT request: only https is ever proxied here, since plain
                        # http is allowed to loopback only, which never goes through a proxy.
                        proxy_headers=(
                            {"Proxy-Authorization": proxy.authorization.decode()}
                            if proxy.authorization
                            else None
                        ),
                        server_hostname=target.host,
                    )
                async with sending as response:
                    status = response.status
                    if 300 <= status < 400 and not redirects_ok:
                        location = response.headers.get("Location", "")
                        raise FetchError(
                            f"{_shown(url)} answered with a redirect (HTTP {status}"
                            + (f" to {_shown(location)}" if location else "")
                            + "); redirects are not followed",
                            transient=False,
                            http_status=status,
                        )
                    body = await self._read(url, response) if read_body else b""
                    return status, response.headers, body
        except UnsafeURL as exc:
            raise UnsafeURL(f"{_shown(url)}: refused because {exc}") from None
        except TimeoutError:
            raise FetchError(
                f"{_shown(url)} did not answer within {self.timeout:g} s", transient=True
            ) from None
        except aiohttp.ClientSSLError as exc:
            raise FetchError(f"{_shown(url)}: TLS failed ({exc})", transient=False) from None
        except aiohttp.InvalidURL:
            raise UnsafeURL(f"{_shown(url)!r} is not a valid URL") from None
        except aiohttp.ClientError as exc:
            through = f" through the egress proxy {proxy}" if proxy is not None else ""
            raise FetchError(
                f"{_shown(url)} could not be reached{through} ({_describe(exc)})", transient=True
            ) from None

    async def _checked_address(self, target: URL) -> str:
        """The first address of the target's host, every one of them checked (the
        guarded resolver raises UnsafeURL); a literal address was checked by check_url."""
        assert self._guard is not None and target.host is not None
        if _literal_ip(target.host) is not None:
            return target.host
        try:
            results = await self._guard.resolve(target.host, target.port or 0, socket.AF_UNSPEC)
            return results[0]["host"]
        except (OSError, IndexError):
            raise FetchError(
                f"{_shown(str(target))} could not be reached (its host name could not be resolved)",
                transient=True,
            ) from None

    async def _read(self, url: str, response: aiohttp.ClientResponse) -> bytes:
        limit = self.max_bytes
        if response.content_length is not None and response.content_length > limit:
            raise FetchError(
                f"{_shown(url)} answered with {response.content_length} bytes, over the limit of {limit}",
                transient=False,
            )
        body = bytearray()
        async for chunk in response.content.iter_any():
            body += chunk
            if len(body) > limit:
                raise FetchError(f"{_shown(url)} answered with more than {limit} bytes", transient=False)
        return bytes(body)


def _transient_status(status: int) -> bool:
    return status >= 500 or status in (408, 429)


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return parsed if isinstance(parsed, dict) else None


def _shown(url: str) -> str:
    """A URL for a message: without any userinfo, and cut short."""
    try:
        parts = urlsplit(url)
        if parts.username is not None or parts.password is not None:
            url = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    except ValueError:
        pass
    url = "".join(c if c.isprintable() else "?" for c in url)
    return url if len(url) <= 300 else url[:300] + "…"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return f"the egress proxy answered HTTP {exc.status}; check HTTPS_PROXY and the proxy itself"
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        return f"the egress proxy could not be reached: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "its host name could not be resolved"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"connection failed: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the response body was cut off or malformed"
    return type(exc).__name__
