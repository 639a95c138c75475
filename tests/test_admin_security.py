"""What a holder of the admin token cannot make the proxy do, against a real
`keybearer serve` process and a real upstream that records what reaches it:
read the proxy's own environment or files and send them upstream, put a key in
a header that frames the request, or point a server at the cloud metadata
service, a private or loopback address the operator did not allow, or the
proxy itself."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from support import ROOT, ProxyProcess

from proxy.settings import ServerConfig
from proxy.stores.sqlite import SQLiteStore

TOKEN = "admin-token-security-6d1f0b9e2c4a"
SECRET_IN_FILE = "file-secret-of-the-proxy-4b7e1c9d"
LOOPBACK = ["127.0.0.0/8", "::1/128"]


class RecordingUpstream:
    """A plain HTTP server on loopback that answers 200 and keeps every request's headers."""

    def __init__(self) -> None:
        seen = self.seen = []  # type: list[dict[str, str]]

        class Handler(BaseHTTPRequestHandler):
            def answer(self) -> None:
                seen.append({k.lower(): v for k, v in self.headers.items()})
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                body = b'{"jsonrpc": "2.0", "id": 1, "result": {}}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/mcp"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def recorder() -> Iterator[RecordingUpstream]:
    up = RecordingUpstream()
    yield up
    up.close()


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "proxy-secret"
    path.write_text(SECRET_IN_FILE + "\n")
    return path


def start_proxy(workdir: Path, salt: str, recorder: RecordingUpstream, **config: Any) -> ProxyProcess:
    # A config-file server on loopback: the operator's, never restricted.
    servers = {"operators": {"url": recorder.url, "auth": "none"}}
    return ProxyProcess(
        {"servers": servers, **config}, workdir, {"KEYBEARER_SALT": salt, "KEYBEARER_ADMIN_TOKEN": TOKEN}
    )


@pytest.fixture(scope="module")
def strict(
    recorder: RecordingUpstream, tmp_path_factory: pytest.TempPathFactory, salt: str
) -> Iterator[ProxyProcess]:
    """Defaults: no loopback or private network allowed for servers added at run time."""
    proc = start_proxy(tmp_path_factory.mktemp("strict"), salt, recorder)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def lenient(
    recorder: RecordingUpstream, tmp_path_factory: pytest.TempPathFactory, salt: str
) -> Iterator[ProxyProcess]:
    """Loopback allowed, and even the whole link-local network listed: metadata stays refused."""
    proc = start_proxy(
        tmp_path_factory.mktemp("lenient"),
        salt,
        recorder,
        api_servers_allowed_networks=[*LOOPBACK, "169.254.0.0/16"],
        public_url="https://keybearer.internal.test",
    )
    yield proc
    proc.stop()
    for secret in (TOKEN, salt, SECRET_IN_FILE):
        assert secret not in proc.log()


async def admin_client(proxy: ProxyProcess) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=proxy.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=15)


@pytest.fixture
async def lenient_admin(lenient: ProxyProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with await admin_client(lenient) as client:
        yield client


@pytest.fixture
async def strict_admin(strict: ProxyProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with await admin_client(strict) as client:
        yield client


async def stored(proxy: ProxyProcess) -> dict[str, Any]:
    """What the proxy's SQLite file holds, read beside it."""
    db = SQLiteStore(proxy.config["database_url"].removeprefix("sqlite:///"))
    await db.open()
    try:
        servers = sorted((s.to_dict() | {"id": s.id} for s in await db.list_servers()), key=str)
        return {"servers": servers, "secrets": await db.list_secrets()}
    finally:
        await db.close()


async def refused(
    admin: httpx.AsyncClient, proxy: ProxyProcess, method: str, path: str, body: dict[str, Any], names: str
) -> str:
    """Send a request that must be refused with 400 and change nothing; its message."""
    before = (await admin.get("/admin/servers")).json(), await stored(proxy)
    answer = await admin.request(method, path, json=body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "invalid_request"
    message: str = answer.json()["message"]
    assert names in message, message
    assert ((await admin.get("/admin/servers")).json(), await stored(proxy)) == before
    return message


# -- environment variables and files are the operator's ------------------------------


SOURCES = [
    ("api_key", "api_key_env", "KEYBEARER_SALT"),
    ("api_key", "api_key_env", "KEYBEARER_ADMIN_TOKEN"),
    ("api_key", "api_key_file", "SECRET_FILE"),
    ("oauth", "client_secret_env", "KEYBEARER_SALT"),
    ("oauth", "client_secret_file", "SECRET_FILE"),
    ("oauth", "client_private_key_file", "SECRET_FILE"),
]


@pytest.mark.parametrize(("auth", "field", "value"), SOURCES, ids=[f"{s[1]}={s[2]}" for s in SOURCES])
async def test_admin_api_cannot_name_the_proxys_environment_or_files(
    lenient: ProxyProcess,
    lenient_admin: httpx.AsyncClient,
    recorder: RecordingUpstream,
    secret_file: Path,
    auth: str,
    field: str,
    value: str,
) -> None:
    value = str(secret_file) if value == "SECRET_FILE" else value
    definition = {"url": recorder.url, "auth": auth, field: value}
    message = await refused(
        lenient_admin, lenient, "POST", "/admin/servers", {"id": "exfil", **definition}, field
    )
    assert "config file" in message
    # An existing server cannot be changed into one either.
    created = await lenient_admin.post(
        "/admin/servers", json={"id": "honest", "url": recorder.url, "auth": auth}
    )
    assert created.status_code == 201, created.text
    await refused(lenient_admin, lenient, "PUT", "/admin/servers/honest", definition, field)

    seen_before = len(recorder.seen)
    for sid in ("exfil", "honest"):
        async with httpx.AsyncClient(timeout=10) as agent:
            await agent.post(f"{lenient.url}/alice/{sid}", json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
    secrets = (lenient.env["KEYBEARER_SALT"], TOKEN, SECRET_IN_FILE)
    assert not [h for h in recorder.seen[seen_before:] if any(s in json.dumps(h) for s in secrets)]
    assert (await lenient_admin.delete("/admin/servers/honest")).status_code == 204


def test_cli_cannot_name_the_proxys_environment(lenient: ProxyProcess, recorder: RecordingUpstream) -> None:
    result = lenient.cli("servers", "add", "exfil-cli", "--url", recorder.url, "--auth", "api_key",
                         "--set", "api_key_env=KEYBEARER_SALT")  # fmt: skip
    assert result.returncode == 2
    assert "api_key_env" in result.stderr and "config file" in result.stderr
    listed = lenient.cli("servers", "list", "--json")
    assert "exfil-cli" not in {s["id"] for s in json.loads(listed.stdout)}


async def test_stored_rows_naming_environment_or_files_are_not_read(
    proxy_factory: type[ProxyProcess],
    recorder: RecordingUpstream,
    secret_file: Path,
    tmp_path: Path,
    salt: str,
) -> None:
    """Rows written before the rule: the servers load, but nothing of the machine is read for them."""
    db = SQLiteStore(str(tmp_path / "keybearer.db"))
    await db.open()
    await db.migrate()
    for sid, source in (("old-env", {"api_key_env": "KEYBEARER_SALT"}),
                        ("old-file", {"api_key_file": str(secret_file)})):  # fmt: skip
        await db.put_server(ServerConfig(id=sid, url=recorder.url, auth="api_key", source="store", **source))
    await db.close()
    proxy = proxy_factory({"api_servers_allowed_networks": LOOPBACK}, env={"KEYBEARER_ADMIN_TOKEN": TOKEN})
    async with await admin_client(proxy) as admin, httpx.AsyncClient(timeout=10) as agent:
        for sid in ("old-env", "old-file"):
            shown = (await admin.get(f"/admin/servers/{sid}")).json()
            assert shown["auth"] == "api_key" and "api_key_env" not in shown and "api_key_file" not in shown
            assert (await admin.get(f"/admin/servers/{sid}/api-key")).json()["set"] is False
            seen_before = len(recorder.seen)
            answer = await agent.post(
                f"{proxy.url}/alice/{sid}", json={"jsonrpc": "2.0", "id": 1, "method": "ping"}
            )
            assert answer.status_code == 503 and "api_key_missing" in answer.text
            assert recorder.seen[seen_before:] == []
    proxy.stop()
    log = proxy.log()
    assert "stored server names environment variables or files; ignored" in log
    assert salt not in log and SECRET_IN_FILE not in log


# -- headers that frame the request ------------------------------------------------------


FRAMING = ["Host", "Transfer-Encoding", "Content-Length", "Connection", "Keep-Alive", "TE", "Trailer",
           "Upgrade", "Proxy-Authorization", "Cookie", "expect"]  # fmt: skip


@pytest.mark.parametrize("header", FRAMING)
async def test_api_key_header_cannot_frame_the_request(
    lenient: ProxyProcess, lenient_admin: httpx.AsyncClient, recorder: RecordingUpstream, header: str
) -> None:
    body = {"id": "framed", "url": recorder.url, "auth": "api_key", "api_key_header": header}
    message = await refused(lenient_admin, lenient, "POST", "/admin/servers", body, "api_key_header")
    assert header in message


def keybearer_check(config: Path, salt: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check", "--config", str(config)],
        capture_output=True, text=True, cwd=ROOT, timeout=60, env={"KEYBEARER_SALT": salt},
    )  # fmt: skip


def test_config_file_server_cannot_put_a_key_in_a_framing_header(tmp_path: Path, salt: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"servers": {
        "smuggler": {"url": "https://mcp.example.com/mcp", "auth": "api_key", "api_key_header": "Transfer-Encoding"}
    }}))  # fmt: skip
    result = keybearer_check(config, salt)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "servers.smuggler.api_key_header" in result.stderr


# -- where servers added at run time may point -------------------------------------------


ALWAYS_REFUSED = [
    ("http://169.254.169.254/latest/meta-data/", "metadata"),
    ("http://[::ffff:169.254.169.254]/", "metadata"),
    ("http://169.254.170.2/v2/credentials", "metadata"),
    ("http://169.254.1.1/mcp", "link-local"),
    ("http://[fe80::1]/mcp", "link-local"),
    ("http://0.0.0.0:8080/mcp", "unspecified"),
    ("http://[::]/mcp", "unspecified"),
    ("http://224.0.0.1/mcp", "multicast"),
    ("http://240.0.0.1/mcp", "reserved"),
    ("http://nosuch.invalid/mcp", "does not resolve"),
]


@pytest.mark.parametrize(("url", "reason"), ALWAYS_REFUSED, ids=[u for u, _ in ALWAYS_REFUSED])
async def test_never_the_metadata_service_or_other_special_addresses(
    lenient: ProxyProcess,
    lenient_admin: httpx.AsyncClient,
    recorder: RecordingUpstream,
    url: str,
    reason: str,
) -> None:
    await refused(
        lenient_admin, lenient, "POST", "/admin/servers", {"id": "meta", "url": url, "auth": "none"}, reason
    )
    created = await lenient_admin.post(
        "/admin/servers", json={"id": "meta", "url": recorder.url, "auth": "none"}
    )
    assert created.status_code == 201, created.text
    await refused(lenient_admin, lenient, "PUT", "/admin/servers/meta", {"url": url, "auth": "none"}, reason)
    assert (await lenient_admin.delete("/admin/servers/meta")).status_code == 204


async def test_never_the_proxy_itself(lenient: ProxyProcess, lenient_admin: httpx.AsyncClient) -> None:
    for url in (f"{lenient.url}/admin/servers", f"http://localhost:{lenient.port}/alice/other",
                f"http://[::ffff:127.0.0.1]:{lenient.port}/", "https://keybearer.internal.test/admin/",
                "http://KeyBearer.Internal.Test.:443/x"):  # fmt: skip
        body = {"id": "loop", "url": url, "auth": "none"}
        message = await refused(lenient_admin, lenient, "POST", "/admin/servers", body, "this proxy")
        assert "url" in message


async def test_loopback_and_private_only_when_the_operator_allows(
    strict: ProxyProcess,
    strict_admin: httpx.AsyncClient,
    lenient: ProxyProcess,
    lenient_admin: httpx.AsyncClient,
    recorder: RecordingUpstream,
) -> None:
    port = recorder.url.split(":")[2].split("/")[0]
    for url in (recorder.url, f"http://localhost:{port}/mcp", f"http://2130706433:{port}/mcp",
                "http://10.1.2.3/mcp", "http://192.168.0.1/mcp", "http://[fd00::1]/mcp"):  # fmt: skip
        message = await refused(
            strict_admin, strict, "POST", "/admin/servers", {"id": "near", "url": url, "auth": "none"}, "url"
        )
        assert "api_servers_allowed_networks" in message
    seen_before = len(recorder.seen)
    async with httpx.AsyncClient(timeout=10) as agent:
        assert (await agent.post(f"{strict.url}/alice/near", json={})).status_code == 404
        # The operator's own config-file server on loopback is not restricted.
        assert (await agent.post(f"{strict.url}/alice/operators", json={})).status_code == 200
    assert len(recorder.seen) == seen_before + 1

    # Allowed networks: loopback is fine, private networks not listed still are not.
    created = await lenient_admin.post(
        "/admin/servers", json={"id": "near", "url": recorder.url, "auth": "none"}
    )
    assert created.status_code == 201, created.text
    async with httpx.AsyncClient(timeout=10) as agent:
        assert (await agent.post(f"{lenient.url}/alice/near", json={})).status_code == 200
    await refused(lenient_admin, lenient, "PUT", "/admin/servers/near", {"url": "http://10.1.2.3/", "auth": "none"},
                  "private")  # fmt: skip
    assert (await lenient_admin.delete("/admin/servers/near")).status_code == 204


def test_cli_servers_add_follows_the_same_policy(strict: ProxyProcess, recorder: RecordingUpstream) -> None:
    result = strict.cli("servers", "add", "near-cli", "--url", recorder.url, "--auth", "none")
    assert result.returncode == 2 and "api_servers_allowed_networks" in result.stderr
    meta = strict.cli("servers", "add", "meta-cli", "--url", "http://169.254.169.254/", "--auth", "none")
    assert meta.returncode == 2 and "metadata" in meta.stderr


def test_allowed_networks_must_be_networks(tmp_path: Path, salt: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"api_servers_allowed_networks": ["10.0.0.0/8", "intranet"]}))
    result = keybearer_check(config, salt)
    assert result.returncode == 2
    assert "api_servers_allowed_networks" in result.stderr and "intranet" in result.stderr
