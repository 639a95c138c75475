"""Egress through a corporate HTTP proxy (proxy/egress.py): Debian's tinyproxy on
loopback, with a private config, in front of origins this machine serves.

Loopback addresses are never proxied, so the forwarding tests reach their
origins by this machine's host name, which tinyproxy resolves; the fetcher's
tests map made-up names onto addresses with their own resolver, since the
fetcher resolves and checks a target before the proxy is asked for it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from peers.hostile_upstream import answer, read_request
from support import ProxyProcess, free_port, self_signed_certificate, wait_for_port

from proxy import egress, upstream
from proxy.oauth.fetch import Fetcher, FetchError, UnsafeURL
from proxy.settings import ConfigError

HOST = socket.gethostname()
AUTH_HOST = "auth.example.test"
USER, PASSWORD, WRONG = "keybearer", "pr0xy-pa55-7f3a9c", "wr0ng-pa55-1d2e3f"
PING = {"jsonrpc": "2.0", "id": 1, "method": "ping"}


# -- NO_PROXY and the proxy variables, as read from an environment ------------


def test_no_proxy_matches_as_curl_does() -> None:
    entries = ("example.com", ".corp.internal", "10.0.0.0/8", "192.168.1.7", "[fd00::1]")
    for host in ("example.com", "api.example.com", "EXAMPLE.com.", "corp.internal", "a.b.corp.internal",
                 "10.1.2.3", "192.168.1.7", "fd00::1", "[fd00::1]"):  # fmt: skip
        assert egress.bypassed(host, entries), host
    for host in ("notexample.com", "example.com.evil", "internal", "192.168.1.8", "11.0.0.1", "fd00::2"):
        assert not egress.bypassed(host, entries), host
    assert egress.bypassed("anything.example", ("*",))
    assert not egress.bypassed("10.1.2.3", ("10.example",))  # a name never matches an address
    assert not egress.bypassed("example.com", ())


def test_the_environment_names_the_proxies() -> None:
    assert egress.from_environ({}) is None
    assert egress.from_environ({"HTTPS_PROXY": " ", "NO_PROXY": "x"}) is None
    proxies = egress.from_environ(
        {
            "HTTPS_PROXY": "http://upper:1",
            "https_proxy": "http://lower:2",
            "HTTP_PROXY": "proxy.corp:3128",
            "NO_PROXY": "a.example, b.example,c.example",
        }
    )
    assert proxies is not None and proxies.https is not None and proxies.http is not None
    assert (str(proxies.https), str(proxies.http)) == ("lower:2", "proxy.corp:3128")
    assert proxies.no_proxy == ("a.example", "b.example", "c.example")
    assert proxies.proxy_for("https", "mcp.example.com") is proxies.https
    assert proxies.proxy_for("http", "mcp.example.com") is proxies.http
    assert proxies.proxy_for("https", "b.example") is None
    http_only = egress.from_environ({"HTTP_PROXY": "http://p"})
    assert http_only is not None and http_only.proxy_for("https", "x.example") is None


def test_loopback_is_never_proxied() -> None:
    proxies = egress.from_environ(
        {"HTTPS_PROXY": "http://proxy.corp:3128", "HTTP_PROXY": "http://proxy.corp:3128"}
    )
    assert proxies is not None
    for host in ("localhost", "LOCALHOST.", "mcp.localhost", "127.0.0.1", "127.9.8.7", "::1", "[::1]",
                 "::ffff:127.0.0.1"):  # fmt: skip
        assert proxies.proxy_for("https", host) is None and proxies.proxy_for("http", host) is None, host
    assert proxies.proxy_for("https", "localhost.example.com") is not None


def test_proxy_credentials_are_never_shown() -> None:
    proxies = egress.from_environ(
        {"HTTPS_PROXY": f"http://{USER}:{PASSWORD.replace('-', '%2D')}@proxy.corp:8080"}
    )
    assert proxies is not None and proxies.https is not None
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert proxies.https.authorization == f"Basic {token}".encode()
    for shown in (str(proxies), repr(proxies), str(proxies.https), proxies.https.url):
        assert PASSWORD not in shown and token not in shown and USER not in shown
    for url in (f"socks5://{USER}:{PASSWORD}@proxy.corp:1080", f"https://{USER}:{PASSWORD}@proxy.corp",
                f"http://{USER}:{PASSWORD}@proxy.corp:port"):  # fmt: skip
        with pytest.raises(ConfigError) as info:
            egress.from_environ({"https_proxy": url})
        assert info.value.key == "https_proxy" and PASSWORD not in str(info.value), str(info.value)
        assert "proxy.corp" in str(info.value)


# -- real processes -----------------------------------------------------------


class TinyProxy:
    """tinyproxy on loopback with a config of its own; `requests()` reads its log."""

    def __init__(
        self, folder: Path, connect_ports: list[int], credentials: tuple[str, str] | None = None
    ) -> None:
        binary = shutil.which("tinyproxy") or shutil.which("tinyproxy", path="/usr/bin:/usr/sbin")
        if binary is None:
            pytest.fail("tinyproxy is not installed: run tests/system-deps.sh")
        self.port = free_port()
        self.log_path = folder / f"tinyproxy-{self.port}.log"
        config = [
            f"Port {self.port}", "Listen 127.0.0.1", "Allow 127.0.0.1", "Timeout 30", "MaxClients 50",
            f'LogFile "{self.log_path}"', "LogLevel Connect", "DisableViaHeader Yes",
            # CONNECT only to the test's own https ports.
            *(f"ConnectPort {port}" for port in connect_ports),
        ]  # fmt: skip
        if credentials is not None:
            config.append(f"BasicAuth {credentials[0]} {credentials[1]}")
        config_path = folder / f"tinyproxy-{self.port}.conf"
        config_path.write_text("\n".join(config) + "\n")
        self.proc = subprocess.Popen(
            [binary, "-d", "-c", str(config_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port, self.proc)

    def url(self, credentials: tuple[str, str] | None = None) -> str:
        userinfo = f"{credentials[0]}:{credentials[1]}@" if credentials else ""
        return f"http://{userinfo}127.0.0.1:{self.port}"

    def requests(self) -> list[str]:
        """Each request line tinyproxy received, in order."""
        text = self.log_path.read_text() if self.log_path.exists() else ""
        return [line.split("): ", 1)[1] for line in text.splitlines() if "Request (file descriptor" in line]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def tinyproxies(tmp_path: Path) -> Iterator[list[TinyProxy]]:
    started: list[TinyProxy] = []
    yield started
    for proxy in started:
        proxy.stop()


class EchoOrigin:
    """An http or https origin that answers each request with what it saw."""

    def __init__(self, address: str, tls: ssl.SSLContext | None = None) -> None:
        self.address, self.tls = address, tls
        self.port = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> EchoOrigin:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    head, _ = await read_request(reader)
                    lines = head.decode("latin-1").split("\r\n")
                    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
                    seen = {"target": lines[0].split(" ")[1], "host": headers.get("host"),
                            "proxy_authorization": headers.get("proxy-authorization")}  # fmt: skip
                    writer.write(answer(json.dumps(seen).encode(), b"content-type: application/json"))
                    await writer.drain()
            except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(on_connect, self.address, 0, ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()


@dataclass
class Origins:
    plain: EchoOrigin
    tls: EchoOrigin
    certificate: Path
    trust: ssl.SSLContext

    @property
    def servers(self) -> dict[str, Any]:
        return {
            "plain": {"url": f"http://{HOST}:{self.plain.port}/mcp", "auth": "none"},
            "tls": {"url": f"https://{HOST}:{self.tls.port}/mcp", "auth": "none"},
        }

    def port(self, server: str) -> int:
        return self.plain.port if server == "plain" else self.tls.port


@pytest.fixture(scope="module")
async def origins(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Origins]:
    if egress.is_loopback(HOST):
        pytest.skip(f"this machine's host name {HOST!r} is a loopback name, which is never proxied")
    try:
        address = socket.gethostbyname(HOST)
    except OSError:
        pytest.skip(f"this machine's host name {HOST!r} does not resolve")
    certificate, key = self_signed_certificate(tmp_path_factory.mktemp("tls"), names=(HOST, AUTH_HOST))
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(certificate, key)
    trust = ssl.create_default_context(cafile=str(certificate))
    async with EchoOrigin(address) as plain, EchoOrigin(address, server_tls) as tls:
        yield Origins(plain, tls, certificate, trust)


def proxy_env(url: str, no_proxy: str = "") -> dict[str, str]:
    """Both spellings: the lower-case one wins, and the test's environment may hold either."""
    names = {"http_proxy": url, "https_proxy": url, "no_proxy": no_proxy}
    return {**names, **{name.upper(): value for name, value in names.items()}}


async def call(proxy: ProxyProcess, server: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=20) as client:
        return await client.post(f"{proxy.url}/alice/{server}", json=PING)


def refusal(answer: httpx.Response) -> tuple[int, str, str]:
    """Status, code and message of the proxy's own JSON-RPC error answer."""
    error = answer.json()["error"]
    return answer.status_code, error["data"]["error"], error["message"]


async def test_http_and_https_upstreams_go_through_the_proxy(
    origins: Origins, tinyproxies: list[TinyProxy], proxy_factory: type[ProxyProcess], tmp_path: Path
) -> None:
    tiny = TinyProxy(tmp_path, [origins.tls.port])
    tinyproxies.append(tiny)
    env = {**proxy_env(tiny.url()), "SSL_CERT_FILE": str(origins.certificate)}
    proxy = proxy_factory({"servers": origins.servers}, env=env)
    for server in ("plain", "tls", "plain", "tls"):
        answer = await call(proxy, server)
        assert answer.status_code == 200, answer.text
        # The origin got an origin-form request for its own host (TLS verified on the way).
        assert answer.json() == {
            "target": "/mcp",
            "host": f"{HOST}:{origins.port(server)}",
            "proxy_authorization": None,
        }
    requests = tiny.requests()
    assert f"POST http://{HOST}:{origins.plain.port}/mcp HTTP/1.1" in requests
    assert f"CONNECT {HOST}:{origins.tls.port} HTTP/1.1" in requests

    tiny.stop()
    for server in ("plain", "tls"):
        # The first may meet a pooled connection the proxy's exit closed; the next connects anew.
        answers = [await call(proxy, server) for _ in range(2)]
        assert answers[0].status_code == 502
        status, code, message = refusal(answers[1])
        assert (status, code) == (502, "upstream_unreachable")
        assert f"the egress proxy 127.0.0.1:{tiny.port} could not be reached" in message


async def test_no_proxy_hosts_are_reached_directly(
    origins: Origins, tinyproxies: list[TinyProxy], proxy_factory: type[ProxyProcess], tmp_path: Path
) -> None:
    tiny = TinyProxy(tmp_path, [origins.tls.port])
    tinyproxies.append(tiny)
    env = {
        **proxy_env(tiny.url(), no_proxy=f"other.example, .{HOST}"),
        "SSL_CERT_FILE": str(origins.certificate),
    }
    proxy = proxy_factory({"servers": origins.servers}, env=env)
    for server in ("plain", "tls"):
        assert (await call(proxy, server)).status_code == 200
    assert tiny.requests() == []


async def test_proxy_credentials_are_sent_and_never_shown(
    origins: Origins, tinyproxies: list[TinyProxy], proxy_factory: type[ProxyProcess], tmp_path: Path
) -> None:
    tiny = TinyProxy(tmp_path, [origins.tls.port], credentials=(USER, PASSWORD))
    tinyproxies.append(tiny)
    cert = {"SSL_CERT_FILE": str(origins.certificate)}
    good = proxy_factory({"servers": origins.servers}, env={**proxy_env(tiny.url((USER, PASSWORD))), **cert})
    none = proxy_factory({"servers": origins.servers}, env={**proxy_env(tiny.url()), **cert})
    wrong = proxy_factory({"servers": origins.servers}, env={**proxy_env(tiny.url((USER, WRONG))), **cert})
    answers = []
    for server in ("plain", "tls"):
        ok = await call(good, server)
        assert ok.status_code == 200, ok.text
        # The tunnel's origin never sees the proxy's credentials.
        assert server == "plain" or ok.json()["proxy_authorization"] is None
        unauthenticated = await call(none, server)
        status, code, message = refusal(unauthenticated)
        assert (status, code) == (502, "upstream_unreachable") and "HTTP 407" in message, message
        # tinyproxy answers a wrong password with 401 where it means 407: still a 502.
        refused = await call(wrong, server)
        assert refused.status_code == 502
        answers += [ok, unauthenticated, refused]
    tiny.stop()
    for server in ("plain", "tls"):
        answers += [await call(good, server) for _ in range(2)]
        assert answers[-1].status_code == 502
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    shown = [a.text for a in answers] + [good.log(), wrong.log()]
    for secret in (PASSWORD, WRONG, token):
        assert not any(secret in text for text in shown), secret
    assert f"127.0.0.1:{tiny.port}" in good.log()  # the start names the proxy, without credentials


# -- the OAuth fetcher --------------------------------------------------------


class Names(AbstractResolver):
    """Maps made-up names onto fixed addresses."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        address = self.names[host]
        return [ResolveResult(hostname=host, host=address, port=port,
                              family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                              proto=0, flags=socket.AI_NUMERICHOST)]  # fmt: skip

    async def close(self) -> None:
        pass


@pytest.fixture(scope="module")
async def site(origins: Origins) -> AsyncIterator[EchoOrigin]:
    """An https origin on loopback, reached by the fetcher as https://auth.example.test:<port>."""
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(origins.certificate, origins.certificate.with_suffix(".key"))
    async with EchoOrigin("127.0.0.1", server_tls) as origin:
        yield origin


def fetcher(proxy_url: str, trust: ssl.SSLContext, no_proxy: str = "") -> Fetcher:
    return Fetcher(
        allow_http_loopback=True, allow_private=False, timeout=10,
        resolver=Names({AUTH_HOST: "127.0.0.1", "meta.example.test": "169.254.169.254",
                        "internal.example.test": "10.1.2.3", "rebind.example.test": "fd00:ec2::254"}),
        egress=egress.from_environ({"https_proxy": proxy_url, "no_proxy": no_proxy}), ssl_context=trust,
    )  # fmt: skip


async def test_the_fetcher_asks_the_proxy_for_the_address_it_checked(
    origins: Origins, site: EchoOrigin, tinyproxies: list[TinyProxy], tmp_path: Path
) -> None:
    tiny = TinyProxy(tmp_path, [site.port])
    tinyproxies.append(tiny)
    async with fetcher(tiny.url(), origins.trust) as f:
        seen = await f.get_json(f"https://{AUTH_HOST}:{site.port}/.well-known/oauth-authorization-server")
    # tinyproxy cannot resolve the made-up name: it was given the address, TLS and Host the name.
    assert seen == {"target": "/.well-known/oauth-authorization-server", "host": f"{AUTH_HOST}:{site.port}",
                    "proxy_authorization": None}  # fmt: skip
    assert tiny.requests() == [f"CONNECT 127.0.0.1:{site.port} HTTP/1.1"]

    async with fetcher(tiny.url(), origins.trust, no_proxy=AUTH_HOST) as f:
        assert (await f.get_json(f"https://{AUTH_HOST}:{site.port}/direct"))["target"] == "/direct"
    assert len(tiny.requests()) == 1


async def test_the_fetchers_policy_applies_to_the_target_through_the_proxy(
    origins: Origins, tinyproxies: list[TinyProxy], tmp_path: Path
) -> None:
    tiny = TinyProxy(tmp_path, [443])
    tinyproxies.append(tiny)
    async with fetcher(tiny.url(), origins.trust) as f:
        for url, reason in [
            (
                "https://meta.example.test/latest/meta-data/",
                "169.254.169.254, and it is a cloud metadata address",
            ),
            ("https://internal.example.test/token", "10.1.2.3, and it is a private address"),
            ("https://rebind.example.test/", "cloud metadata address"),
            ("https://169.254.169.254/latest/meta-data/", "cloud metadata address"),
            ("https://10.1.2.3/token", "private address"),
        ]:
            with pytest.raises(UnsafeURL, match=reason):
                await f.get_json(url)
    assert tiny.requests() == []  # nothing was asked of the proxy


async def test_the_fetcher_through_a_proxy_with_credentials(
    origins: Origins, site: EchoOrigin, tinyproxies: list[TinyProxy], tmp_path: Path
) -> None:
    tiny = TinyProxy(tmp_path, [site.port], credentials=(USER, PASSWORD))
    tinyproxies.append(tiny)
    url = f"https://{AUTH_HOST}:{site.port}/jwks"
    async with fetcher(tiny.url((USER, PASSWORD)), origins.trust) as f:
        assert (await f.get_json(url))["target"] == "/jwks"
        tiny.stop()
        with pytest.raises(FetchError) as down:
            await f.get_json(url)
    assert down.value.transient and f"through the egress proxy 127.0.0.1:{tiny.port}" in str(down.value)
    again = TinyProxy(tmp_path, [site.port], credentials=(USER, PASSWORD))
    tinyproxies.append(again)
    async with fetcher(again.url(), origins.trust) as f:
        with pytest.raises(FetchError, match="the egress proxy answered HTTP 407"):
            await f.get_json(url)
    async with fetcher(again.url((USER, WRONG)), origins.trust) as f:
        with pytest.raises(FetchError, match="the egress proxy answered HTTP 401") as refused:
            await f.get_json(url)
    for message in (str(down.value), str(refused.value)):
        assert PASSWORD not in message and WRONG not in message


# -- proxies that misbehave ---------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "error", "message"),
    [
        (b"HTTP/1.1 200 Connection established\r\n\r\nnot a TLS server hello", upstream.InvalidResponse,
         "sent bytes into the new tunnel"),
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", upstream.InvalidResponse, "answer to CONNECT is not HTTP"),
        (b"HTTP/1.1 403 Forbidden\x1b[2J\r\ncontent-length: 0\r\n\r\n", upstream.ConnectFailed,
         "refused the tunnel to example.test:443 (HTTP 403 Forbidden?[2J)"),
        (b"HTTP/1.1 200 OK\r\nx: " + b"y" * 70_000, upstream.InvalidResponse, "answer to CONNECT is too long"),
        (b"", upstream.Disconnected, "closed the connection during CONNECT"),
    ],
)  # fmt: skip
async def test_a_proxy_that_misbehaves_during_connect_is_refused(
    answer: bytes, error: type[Exception], message: str
) -> None:
    async def fake_proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(fake_proxy, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = upstream.Pool(5, egress=egress.from_environ({"https_proxy": f"127.0.0.1:{port}"}))
    try:
        with pytest.raises(error, match=re.escape(message)):
            await pool.request("GET", upstream.Origin("https", "example.test", 443), b"/mcp", [], b"", 5)
    finally:
        pool.close()
        server.close()
