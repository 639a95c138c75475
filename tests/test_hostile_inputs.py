"""Hostile input at the edge, against a real `keybearer serve` process: each
gets a clear 4xx (or is forwarded untouched), never a 500, the proxy stays up
and nothing is stored."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest
from peers.mcp_client import Upstream, run_upstream
from support import ProxyProcess, free_port

from proxy import links
from proxy.crypto import Keyring

ADMIN_TOKEN = "admin-token-hostile-7c1d9e3f5a2b4d6f8a0c"
USER = "alice"
# Far in the future and well-formed: only the signature is wrong.
EXPIRES = str(int(time.time()) + 3600)


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with run_upstream("streamable-http") as up:
        yield up


@pytest.fixture(scope="module")
def proxy(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory, salt: str) -> Iterator[ProxyProcess]:
    servers = {
        "echo": {"url": upstream.base_url + "/_echo", "auth": "none"},
        # Never reached: the pages under test refuse before any OAuth traffic.
        "linear": {"url": f"http://127.0.0.1:{free_port()}/mcp", "auth": "oauth"},
    }
    proc = ProxyProcess(
        {"servers": servers, "api_servers_allowed_networks": ["127.0.0.0/8"]},
        tmp_path_factory.mktemp("hostile"),
        {"KEYBEARER_SALT": salt, "KEYBEARER_ADMIN_TOKEN": ADMIN_TOKEN},
    )
    yield proc
    proc.stop()
    log = proc.log()
    assert "Traceback" not in log and "RecursionError" not in log


@pytest.fixture
def admin(proxy: ProxyProcess) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=proxy.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
    ) as client:
        yield client


def assert_still_up(proxy: ProxyProcess) -> None:
    assert httpx.get(proxy.url + "/ping", timeout=5).status_code == 200


# -- signed links and page forms ----------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        f"/connect/{USER}/linear?expires={EXPIRES}&sig=%C3%A9",  # sig "é"
        f"/connect/{USER}/linear?expires={EXPIRES}&sig=%E2%82%AC%F0%9F%94%91",  # "€🔑"
        f"/connections/{USER}?expires={EXPIRES}&sig=%C3%A9",
        f"/connect/{USER}/linear?expires=%C2%B2&sig=abc",  # expires "²": a digit to str.isdigit
        f"/connect/{USER}/linear?expires={'9' * 5000}&sig=abc",
    ],
)
def test_a_mangled_link_gets_a_page_not_a_500(proxy: ProxyProcess, path: str) -> None:
    answer = httpx.get(proxy.url + path, timeout=10)
    assert answer.status_code == 403
    assert answer.headers["content-type"].startswith("text/html")
    assert "link" in answer.text.lower()
    assert_still_up(proxy)


def test_a_non_ascii_csrf_token_gets_a_page_not_a_500(
    proxy: ProxyProcess, salt: str, admin: httpx.Client
) -> None:
    keyring = Keyring(salt)
    connect = links.connect_url(proxy.url, keyring, USER, "linear", 600)
    connections = links.connections_url(proxy.url, keyring, USER, 600)
    with httpx.Client(timeout=10) as browser:
        assert browser.get(connect).status_code == 200  # the page, and its cookie
        refused = browser.post(connect, data={"csrf": "é"})
        assert refused.status_code == 403
        assert "not sent from the page" in refused.text
        disconnect = connections.replace(f"/connections/{USER}?", f"/connections/{USER}/linear/disconnect?")
        refused = browser.post(disconnect, data={"csrf": "€"})
        assert refused.status_code == 403
        assert "not sent from the page" in refused.text
    assert admin.get("/admin/servers/linear/connections").json()["connections"] == []
    assert_still_up(proxy)


# -- JSON nested deeper than any parser should follow ---------------------------

DEEP_ARRAYS = b"[" * 100_000
DEEP_OBJECTS = b'{"a":' * 50_000
# A JSON-RPC request whose id alone nests 950 deep: json.loads takes it, but
# echoing such an id in an error answer is what the depth cap rules out.
DEEP_ID = b'{"jsonrpc":"2.0","method":"tools/list","id":' + b"[" * 950 + b"]" * 950 + b"}"


@pytest.mark.parametrize("body", [DEEP_ARRAYS, DEEP_OBJECTS, DEEP_ID], ids=["arrays", "objects", "id"])
def test_deep_json_to_an_unknown_server_gets_a_404(proxy: ProxyProcess, body: bytes) -> None:
    answer = httpx.post(
        f"{proxy.url}/{USER}/nosuch", content=body, headers={"Content-Type": "application/json"}, timeout=10
    )
    assert answer.status_code == 404
    assert answer.json()["error"] == "unknown_server"
    assert_still_up(proxy)


@pytest.mark.parametrize("body", [DEEP_ARRAYS, DEEP_OBJECTS, DEEP_ID], ids=["arrays", "objects", "id"])
def test_deep_json_to_a_server_is_forwarded_untouched(proxy: ProxyProcess, body: bytes) -> None:
    answer = httpx.post(
        f"{proxy.url}/{USER}/echo", content=body, headers={"Content-Type": "application/json"}, timeout=10
    )
    assert answer.status_code == 200
    assert answer.json()["body"] == body.decode()
    assert_still_up(proxy)


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/admin/servers"), ("PUT", "/admin/servers/echo2"), ("POST", "/admin/tokens")],
)
def test_deep_json_to_the_admin_api_gets_a_400(
    proxy: ProxyProcess, admin: httpx.Client, method: str, path: str
) -> None:
    before = admin.get("/admin/servers").json()
    answer = admin.request(method, path, content=b"[" * 60_000)  # under the 64 KiB admin body cap
    assert answer.status_code == 400
    assert answer.json() == {
        "error": "invalid_request",
        "message": "the body's brackets nest more than 64 levels deep or do not pair up",
    }
    assert admin.get("/admin/servers").json() == before
    assert_still_up(proxy)


def test_admin_api_still_takes_ordinary_json(admin: httpx.Client) -> None:
    body = json.dumps({"id": "plain", "url": "http://127.0.0.1:1/mcp", "auth": "none"})
    created = admin.post("/admin/servers", content=body)
    assert created.status_code in (200, 201), created.text
    assert admin.delete("/admin/servers/plain").status_code in (200, 204)
