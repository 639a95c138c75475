"""Running in production: health, metrics, inbound caller authentication, the
exposure check, graceful shutdown and workers.

Every proxy here is `keybearer serve --config FILE`, the image's command, run
from the venv; the upstream is the SDK test server, the JWKS a tiny local HTTP
server, Redis a private redis-server that the test kills and restarts.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from conftest import RedisServer
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from peers.mcp_client import INITIALIZE, Upstream, raw_post, result_text, run_upstream, streamable_session
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from support import ROOT, ProxyProcess, free_port, wait_for_port

KEYBEARER = str(Path(sys.executable).parent / "keybearer")
SECRET_USER = "alice-secret-user"
REDIS_PASSWORD = "redis-pw-never-shown-4e1d"
ADMIN_TOKEN = "admin-token-for-production-tests-7c2a"


class Keybearer(ProxyProcess):
    """ProxyProcess, started by the console script the image's ENTRYPOINT names."""

    def command(self, *args: str) -> list[str]:
        return [KEYBEARER, *args, "--config", str(self.config_path)]

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.command("serve"), stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir
        )
        try:
            wait_for_port(self.port, self.proc)
            httpx.get(self.url + "/ping", timeout=5).raise_for_status()
        except BaseException:
            self.stop()
            raise RuntimeError(f"proxy did not start; log:\n{self.log()}") from None

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(*args), capture_output=True, text=True, env=self.env, cwd=ROOT, timeout=60
        )

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
        return lines


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with run_upstream("streamable-http") as up:
        yield up


def servers(up: Upstream) -> dict[str, Any]:
    return {
        "plain": {"url": up.mcp_url, "auth": "none"},
        "echo": {"url": up.base_url + "/_echo", "auth": "none"},
        "ticks": {"url": up.base_url + "/_sse_ticks?n=-1&interval=0.2", "auth": "none"},
        "slow": {"url": up.base_url + "/_slow?seconds=1.5", "auth": "none"},
    }


@pytest.fixture
def start(tmp_path: Path, salt: str) -> Iterator[Callable[..., Keybearer]]:
    started: list[Keybearer] = []

    def factory(config: dict[str, Any], env: dict[str, str] | None = None, **kw: Any) -> Keybearer:
        proc = Keybearer(config, tmp_path, {"KEYBEARER_SALT": salt, **(env or {})}, **kw)
        started.append(proc)
        return proc

    yield factory
    for proc in started:
        proc.stop()


def scrape(url: str) -> tuple[str, list[Sample]]:
    answer = httpx.get(url, timeout=5)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    samples = [s for family in text_string_to_metric_families(answer.text) for s in family.samples]
    return answer.text, samples


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 if none)."""
    return sum(
        s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def wait_until(check: Callable[[], Any], timeout: float = 5.0, every: float = 0.05) -> float:
    """Poll `check` (sync or async) until truthy; the seconds it took."""
    started = time.monotonic()
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"not true after {timeout} s")
        await asyncio.sleep(every)


# -- health ---------------------------------------------------------------------------


async def test_ready_follows_redis_and_ping_needs_nothing(
    start: Callable[..., Keybearer], redis_server_factory: Callable[..., RedisServer]
) -> None:
    redis = redis_server_factory(args=["--requirepass", REDIS_PASSWORD])
    proxy = start({"redis_url": f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis.port}/0"})
    async with httpx.AsyncClient(base_url=proxy.url, timeout=5) as client:
        assert (await client.get("/ping")).status_code == 200
        ready = await client.get("/ready")
        assert ready.status_code == 200 and ready.json() == {"ready": True}

        redis.kill()
        down = await client.get("/ready")
        assert down.status_code == 503
        body = down.json()
        assert body["ready"] is False and "database" not in body  # SQLite is fine
        assert f"127.0.0.1:{redis.port}" in body["tokens"]
        assert REDIS_PASSWORD not in down.text
        ping = await client.get("/ping")  # liveness does not depend on the stores
        assert ping.status_code == 200 and ping.text == "ok\n"

        redis.start()  # same port; the proxy is not restarted

        async def is_ready() -> bool:
            return (await client.get("/ready")).status_code == 200

        await wait_until(is_ready, timeout=10, every=0.1)
        assert (await client.get("/ready")).json() == {"ready": True}
    assert proxy.proc is not None and proxy.proc.poll() is None
    assert REDIS_PASSWORD not in proxy.log()


# -- metrics --------------------------------------------------------------------------


async def test_metrics_after_traffic(start: Callable[..., Keybearer], upstream: Upstream) -> None:
    proxy = start({"servers": servers(upstream)})
    async with streamable_session(f"{proxy.url}/{SECRET_USER}/plain") as session:
        assert result_text(await session.call_tool("echo", {"text": "hi"})) == "hi"
    async with httpx.AsyncClient(timeout=10) as client:
        for _ in range(3):
            assert (await client.post(f"{proxy.url}/{SECRET_USER}/echo", content=b"{}")).status_code == 200
        assert (await client.get(f"{proxy.url}/{SECRET_USER}/nosuch")).status_code == 404
        assert (await client.get(f"{proxy.url}/{SECRET_USER}/Bad!Server")).status_code == 400

        text, samples = scrape(proxy.url + "/metrics")
        assert value(samples, "keybearer_requests_total", server="echo", status="200") == 3
        assert value(samples, "keybearer_requests_total", server="plain", status="200") >= 3
        # Server ids that are not configured are not labels either (they are unbounded too).
        assert value(samples, "keybearer_requests_total", server="-", status="404") == 1
        assert value(samples, "keybearer_requests_total", server="-", status="400") == 1
        assert value(samples, "keybearer_upstream_latency_seconds_count", server="echo") == 3
        assert value(samples, "keybearer_upstream_latency_seconds_bucket", server="echo", le="+Inf") == 3
        assert value(samples, "keybearer_upstream_latency_seconds_sum", server="echo") > 0
        assert value(samples, "keybearer_open_streams", server="ticks") == 0

        # The gauge counts an event stream while it is open through the proxy.
        async with client.stream("GET", f"{proxy.url}/{SECRET_USER}/ticks") as stream:
            async for line in stream.aiter_lines():
                if line.startswith("data:"):
                    break
            _, samples = scrape(proxy.url + "/metrics")
            assert value(samples, "keybearer_open_streams", server="ticks") == 1
        await wait_until(
            lambda: value(scrape(proxy.url + "/metrics")[1], "keybearer_open_streams", server="ticks") == 0
        )

    text, samples = scrape(proxy.url + "/metrics")
    assert SECRET_USER not in text
    label_names = {name for s in samples if s.name.startswith("keybearer_") for name in s.labels}
    assert label_names <= {"server", "status", "result", "store", "le"}, label_names


async def test_metrics_listen_moves_metrics_off_the_main_port(
    start: Callable[..., Keybearer], upstream: Upstream
) -> None:
    metrics_port = free_port()
    proxy = start({"servers": servers(upstream), "metrics_listen": f"127.0.0.1:{metrics_port}"})
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.post(f"{proxy.url}/{SECRET_USER}/echo", content=b"{}")).status_code == 200
        main = await client.get(proxy.url + "/metrics")
    assert main.status_code == 404 and "keybearer_" not in main.text
    text, samples = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
    assert value(samples, "keybearer_requests_total", server="echo", status="200") == 1
    assert SECRET_USER not in text


# -- inbound authentication: tokens ---------------------------------------------------


async def test_inbound_tokens(start: Callable[..., Keybearer], upstream: Upstream) -> None:
    # Beyond loopback, which inbound authentication makes acceptable without the override.
    port = free_port()
    proxy = start(
        {"servers": servers(upstream), "inbound_auth": "tokens", "listen": f"0.0.0.0:{port}"},
        {"KEYBEARER_ADMIN_TOKEN": ADMIN_TOKEN},
        port=port,
    )
    assert not any("WITHOUT INBOUND" in line.get("event", "") for line in proxy.log_lines())
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
        created = await client.post(
            "/admin/tokens", json={"users": ["alice"], "label": "agent"}, headers=admin
        )
        assert created.status_code == 201, created.text
        token, token_id = created.json()["token"], created.json()["id"]
        assert token.startswith("kbp_") and created.json()["users"] == ["alice"]
        listed = (await client.get("/admin/tokens", headers=admin)).json()["tokens"]
        assert [t["id"] for t in listed] == [token_id] and token not in json.dumps(listed)
    auth = {"Authorization": f"Bearer {token}"}

    # alice's token: a whole MCP session as alice; the token itself stops at the proxy
    async with streamable_session(f"{proxy.url}/alice/plain", headers=auth) as session:
        assert result_text(await session.call_tool("echo", {"text": "as alice"})) == "as alice"
        seen = json.loads(result_text(await session.call_tool("headers", {})))
    assert "authorization" not in seen
    assert token not in json.dumps(seen)

    # refused callers: nothing is forwarded
    before = (await upstream.astats())["requests"]
    as_bob = await raw_post(f"{proxy.url}/bob/plain", INITIALIZE, headers=auth)
    assert as_bob.status_code == 403
    assert as_bob.json()["error"]["data"]["error"] == "caller_forbidden"
    nothing = await raw_post(f"{proxy.url}/alice/plain", INITIALIZE)
    assert nothing.status_code == 401
    assert nothing.json()["error"]["data"]["error"] == "caller_unauthenticated"
    for wrong in (token[:-4] + "AAAA", "kbp_000000000000.nope", "not-a-proxy-token", ADMIN_TOKEN):
        answer = await raw_post(
            f"{proxy.url}/alice/plain", INITIALIZE, headers={"Authorization": f"Bearer {wrong}"}
        )
        assert answer.status_code == 401, wrong
    async with httpx.AsyncClient(timeout=10) as client:
        basic = await client.get(f"{proxy.url}/alice/echo", headers={"Authorization": "Basic YTpi"})
        assert basic.status_code == 401
        assert "www-authenticate" not in basic.headers
    assert (await upstream.astats())["requests"] == before

    # A token made by the CLI on the same store reaches the running proxy within its reload.
    made = proxy.run("tokens", "create", "--user", "carol", "--user", "dave", "--label", "cli", "--json")
    assert made.returncode == 0, made.stderr
    cli_token, cli_id = json.loads(made.stdout)["token"], json.loads(made.stdout)["id"]
    cli_auth = {"Authorization": f"Bearer {cli_token}"}

    async def status(user: str, headers: dict[str, str]) -> int:
        return (await raw_post(f"{proxy.url}/{user}/plain", INITIALIZE, headers=headers)).status_code

    await wait_until(lambda: _is(status("dave", cli_auth), 200), timeout=5)
    assert await status("carol", cli_auth) == 200
    assert await status("alice", cli_auth) == 403
    listed_cli = proxy.run("tokens", "list", "--json")
    assert {t["id"] for t in json.loads(listed_cli.stdout)} == {token_id, cli_id}
    assert cli_token not in listed_cli.stdout and token not in listed_cli.stdout

    # Revoked by the CLI: refused within the SQLite reload bound (about a second).
    revoked = proxy.run("tokens", "revoke", cli_id)
    assert revoked.returncode == 0, revoked.stderr
    took = await wait_until(lambda: _is(status("dave", cli_auth), 401), timeout=5)
    assert took < 3
    # Revoked through the admin API: refused at once.
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
        gone = await client.delete(f"/admin/tokens/{token_id}", headers=admin)
        assert gone.status_code in (200, 204)
    assert await status("alice", auth) == 401

    log = proxy.log()
    for secret in (token, cli_token, token.partition(".")[2], ADMIN_TOKEN):
        assert secret not in log


async def _is(status: Any, expected: int) -> bool:
    return bool(await status == expected)


# -- inbound authentication: JWT ------------------------------------------------------

ISSUER = "https://issuer.keybearer.test"
AUDIENCE = "keybearer-proxy"


class Jwks:
    """A JWKS on loopback, and the private keys to sign with."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.keys = [self.public(self.key, "k1")]
        self.fetches = 0
        jwks = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                jwks.fetches += 1
                body = json.dumps({"keys": jwks.keys}).encode()
                self.send_response(200 if self.path == "/jwks.json" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def public(key: Any, kid: str) -> dict[str, Any]:
        jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
        return {**jwk, "kid": kid, "use": "sig", "alg": "RS256"}

    def sign(self, key: Any = None, kid: str = "k1", **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "subject-id", "iat": now, "exp": now + 300, **claims}
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, key or self.key, algorithm="RS256", headers={"kid": kid})


@pytest.fixture(scope="module")
def jwks() -> Iterator[Jwks]:
    served = Jwks()
    yield served
    served.server.shutdown()


async def test_inbound_jwt(start: Callable[..., Keybearer], upstream: Upstream, jwks: Jwks) -> None:
    proxy = start(
        {
            "servers": servers(upstream),
            "inbound_auth": "jwt",
            # The key set comes through the OAuth fetcher: plain http only to loopback, when allowed.
            "oauth_allow_http_loopback": True,
            "jwt_jwks_url": jwks.url,
            "jwt_issuer": ISSUER,
            "jwt_audience": AUDIENCE,
            "jwt_user_claim": "uid",
        }
    )
    alice = jwks.sign(uid="alice")
    async with streamable_session(
        f"{proxy.url}/alice/plain", headers={"Authorization": f"Bearer {alice}"}
    ) as session:
        seen = json.loads(result_text(await session.call_tool("headers", {})))
    assert "authorization" not in seen and alice not in json.dumps(seen)

    before = (await upstream.astats())["requests"]
    now = int(time.time())
    unsigned = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "uid": "alice", "exp": now + 300}, None, "none")
    cases = {
        "bob's token on alice": (jwks.sign(uid="bob"), 403),
        "no user claim (sub is not the configured claim)": (jwks.sign(sub="alice"), 403),
        "expired": (jwks.sign(uid="alice", iat=now - 7200, exp=now - 3600), 401),
        "no exp": (jwks.sign(uid="alice", exp=None), 401),
        "another key, same kid": (jwks.sign(key=jwks.other, uid="alice"), 401),
        "another key, unknown kid": (jwks.sign(key=jwks.other, kid="k2", uid="alice"), 401),
        "wrong issuer": (jwks.sign(uid="alice", iss="https://evil.test"), 401),
        "wrong audience": (jwks.sign(uid="alice", aud="another-service"), 401),
        "alg none": (unsigned, 401),
        "HS256 with the public key's bytes": (_hs256_confusion(jwks), 401),
        "garbage": ("a.b.c", 401),
    }
    for case, (token, expected) in cases.items():
        answer = await raw_post(
            f"{proxy.url}/alice/plain", INITIALIZE, headers={"Authorization": f"Bearer {token}"}
        )
        assert answer.status_code == expected, (case, answer.text)
        assert "www-authenticate" not in answer.headers
    assert (await raw_post(f"{proxy.url}/alice/plain", INITIALIZE)).status_code == 401
    assert (await upstream.astats())["requests"] == before
    assert jwks.fetches <= 2  # the key set is cached, not fetched per request

    # The issuer rotates: a token signed with a key new to the JWKS passes once the proxy
    # has fetched the set again (a few seconds at most, not the cache's ten minutes).
    jwks.keys.append(jwks.public(jwks.other, "k2"))
    rotated = {"Authorization": f"Bearer {jwks.sign(key=jwks.other, kid='k2', uid='alice')}"}

    async def passes() -> bool:
        return (await raw_post(f"{proxy.url}/alice/plain", INITIALIZE, headers=rotated)).status_code == 200

    assert await wait_until(passes, timeout=10, every=0.25) < 7
    # Unknown key ids do not make the proxy fetch the set on every request.
    fetched = jwks.fetches
    for i in range(20):
        forged = jwks.sign(key=jwks.other, kid=f"unknown-{i}", uid="alice")
        answer = await raw_post(
            f"{proxy.url}/alice/plain", INITIALIZE, headers={"Authorization": f"Bearer {forged}"}
        )
        assert answer.status_code == 401
    assert jwks.fetches - fetched <= 1
    assert alice not in proxy.log()


def _hs256_confusion(jwks: Jwks) -> str:
    import base64
    import hashlib
    import hmac

    from cryptography.hazmat.primitives import serialization

    pem = jwks.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "uid": "alice", "exp": int(time.time()) + 300}
    payload = b64(json.dumps(claims).encode())
    signature = hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(signature)}"


# -- exposure -------------------------------------------------------------------------


def test_unauthenticated_listen_beyond_loopback(start: Callable[..., Keybearer], tmp_path: Path) -> None:
    port = free_port()
    refused = start({"listen": f"0.0.0.0:{port}"}, port=port, start=False)
    result = refused.run("serve")
    assert result.returncode == 2
    assert "KEYBEARER_ALLOW_UNAUTHENTICATED_LISTEN" in result.stderr
    assert "inbound_auth" in result.stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()

    allowed = start(
        {"listen": f"0.0.0.0:{port}"}, {"KEYBEARER_ALLOW_UNAUTHENTICATED_LISTEN": "true"}, port=port
    )
    assert httpx.get(allowed.url + "/ping", timeout=5).status_code == 200
    (warning,) = [line for line in allowed.log_lines() if "WITHOUT INBOUND AUTHENTICATION" in line["event"]]
    assert warning["level"] == "warning" and warning["listen"] == f"0.0.0.0:{port}"


# -- shutdown -------------------------------------------------------------------------


async def test_sigterm_ends_streams_and_finishes_requests(
    start: Callable[..., Keybearer], upstream: Upstream
) -> None:
    proxy = start({"servers": servers(upstream), "shutdown_timeout": 10})
    assert proxy.proc is not None
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=30)) as client:
        async with client.stream("GET", f"{proxy.url}/alice/ticks") as stream:
            lines = stream.aiter_lines()
            async for line in lines:
                if line.startswith("data:"):
                    break
            slow = asyncio.create_task(client.get(f"{proxy.url}/alice/slow"))
            await wait_until(lambda: _upstream_open(upstream, "/_slow"))

            proxy.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            async with asyncio.timeout(5):  # the stream ends: no hang until shutdown_timeout
                async for _ in lines:
                    pass
            stream_ended = time.monotonic() - signalled
        answer = await asyncio.wait_for(slow, 5)
    assert answer.status_code == 200 and answer.json() == {"slept": 1.5}
    code = await asyncio.to_thread(proxy.proc.wait, 8)
    exited = time.monotonic() - signalled
    assert code in (0, -signal.SIGTERM), proxy.log()
    assert stream_ended < 1.5, stream_ended  # at once, not after the in-flight request
    assert exited < 5, exited
    outcomes = {line.get("outcome") for line in proxy.log_lines() if line.get("event") == "request"}
    assert "closed_for_shutdown" in outcomes


async def _upstream_open(upstream: Upstream, path: str) -> bool:
    return bool((await upstream.astats())["open_by_path"].get(path))


# -- workers --------------------------------------------------------------------------


async def test_workers(start: Callable[..., Keybearer], upstream: Upstream) -> None:
    proxy = start({"servers": servers(upstream)}, {"KEYBEARER_WORKERS": "2"})
    assert proxy.proc is not None
    assert len(_workers(proxy.proc.pid)) == 2
    for _ in range(8):
        async with httpx.AsyncClient(timeout=10) as client:  # a new connection each time
            answer = await client.post(f"{proxy.url}/{SECRET_USER}/echo", content=b"{}")
            assert answer.status_code == 200
    async with streamable_session(f"{proxy.url}/{SECRET_USER}/plain") as session:
        assert result_text(await session.call_tool("echo", {"text": "w"})) == "w"
    text, samples = scrape(proxy.url + "/metrics")
    # Every worker's figures, summed.
    assert value(samples, "keybearer_requests_total", server="echo", status="200") == 8
    assert value(samples, "keybearer_upstream_latency_seconds_count", server="echo") == 8
    assert SECRET_USER not in text


def _workers(pid: int) -> list[int]:
    """The worker processes uvicorn spawned under `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


# -- the operations guide -------------------------------------------------------------


def test_operations_guide_lists_every_setting_with_its_default() -> None:
    from dataclasses import fields

    from proxy.settings import SETTINGS, Settings, env_name

    text = (ROOT / "docs" / "operations.md").read_text()
    table = text[text.index("## Every setting") :]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells
    assert set(rows) == set(SETTINGS), set(rows) ^ set(SETTINGS)
    defaults = {f.name: f.default for f in fields(Settings)}
    for name, (_, secret) in SETTINGS.items():
        _, env, default, _ = rows[name]
        assert f"`{env_name(name)}`" in env, name
        assert ("(secret)" in env) == secret, name
        expected = defaults[name]
        if name == "salt":
            shown = "**required**"
        elif expected in (None, ()):
            shown = "none"
        elif isinstance(expected, bool):
            shown = f"`{str(expected).lower()}`"
        elif isinstance(expected, float) and expected.is_integer():
            shown = f"`{int(expected)}`"
        else:
            shown = f"`{expected}`"
        assert default == shown, (name, default, shown)
