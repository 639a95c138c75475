"""Where servers added at run time may point.

Config-file servers are the operator's and may point anywhere. A server added
or changed through the admin API or `keybearer servers add` gets the proxy to
send requests, with a credential, to a URL the caller chose; so its host is
resolved when it is written and every address it resolves to is checked with
the same rules as OAuth discovery (proxy.oauth.fetch.address_refusal):

- link-local, cloud metadata, unspecified, multicast, broadcast and reserved
  addresses are always refused;
- loopback and private addresses only inside `api_servers_allowed_networks`;
- the proxy itself (its `public_url` origin, or its listening port on an
  address of this machine) is refused: a server there would loop, or reach /admin/.

A host name that does not resolve is refused (it cannot be checked). The check
happens at write time only: if a name's DNS later changes, the new addresses are
not checked again, so point run-time servers only at names you control.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from urllib.parse import urlsplit

from proxy.oauth.fetch import IPAddress, address_refusal
from proxy.settings import ConfigError, Settings

RESOLVE_TIMEOUT = 5.0
DEFAULT_PORTS = {"http": 80, "https": 443}


class UpstreamPolicy:
    def __init__(self, allowed_networks: Sequence[str], *, listen_port: int, public_url: str) -> None:
        self.allowed = tuple(ipaddress.ip_network(n, strict=False) for n in allowed_networks)
        self.listen_port = listen_port
        public = urlsplit(public_url)
        self.public_origin = (_host(public.hostname or ""), public.port or DEFAULT_PORTS[public.scheme])

    @classmethod
    def from_settings(cls, settings: Settings) -> UpstreamPolicy:
        return cls(
            settings.api_servers_allowed_networks,
            listen_port=settings.listen_port,
            public_url=settings.public_url,
        )

    async def check(self, url: str, key: str = "url") -> None:
        """Raise ConfigError(key) unless a run-time server may point at `url`."""
        parts = urlsplit(url)
        # Resolved as the forwarder will resolve it (proxy.upstream.split_url).
        host, port = parts.hostname or "", parts.port or DEFAULT_PORTS[parts.scheme]
        if (_host(host), port) == self.public_origin:
            raise ConfigError(key, f"{host}:{port} is this proxy (its public_url); point it at an MCP server")
        for ip in await _resolve(host, port, key):
            reason = self._refusal(ip)
            if reason is not None:
                raise ConfigError(key, f"host {host!r} resolves to {ip}, and {reason}")
            if port == self.listen_port and _is_own_address(ip):
                raise ConfigError(
                    key, f"{host}:{port} is this proxy (its listening port); point it at an MCP server"
                )

    def _refusal(self, ip: IPAddress) -> str | None:
        strict = address_refusal(ip, allow_loopback=False, allow_private=False)
        if strict is None:
            return None
        if address_refusal(ip, allow_loopback=True, allow_private=True) is not None:
            return strict  # metadata, link-local, ...: never allowed
        if any(_ipv4(ip) in net for net in self.allowed):
            return None
        kind = "loopback" if _ipv4(ip).is_loopback else "private"
        return (
            f"it is a {kind} address, which servers added at run time may reach only inside the "
            "networks listed in api_servers_allowed_networks (or define the server in the config file)"
        )


async def _resolve(host: str, port: int, key: str) -> list[IPAddress]:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except TimeoutError:
        raise ConfigError(key, f"host {host!r} did not resolve within {RESOLVE_TIMEOUT:g} s") from None
    except OSError as exc:
        raise ConfigError(
            key,
            f"host {host!r} does not resolve ({exc.strerror or exc}); a server added at run time must "
            "resolve when it is added, so that its addresses can be checked",
        ) from None
    return [ipaddress.ip_address(str(info[4][0])) for info in infos]


def _is_own_address(ip: IPAddress) -> bool:
    """Loopback, or an address of one of this machine's interfaces (only those can be bound)."""
    ip = _ipv4(ip)
    if ip.is_loopback:
        return True
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((str(ip), 0))
        except OSError:
            return False
    return True


def _ipv4(ip: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address connects to its IPv4 address: judge that one."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _host(host: str) -> str:
    return host.rstrip(".").lower()
