"""The admin API's OpenAPI document against the running API: schemathesis
generates requests for every operation (valid ones and ones that break the
schema) and sends them to a real `keybearer serve` on the SQLite store.

Every answer must be one the document allows and never a 5xx; and every
refused request (4xx) must leave the API's view and the store's file exactly
as they were, compared before and after that one request.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from support import ProxyProcess
from test_admin import seed_connection, seed_registration

from proxy.crypto import Keyring
from proxy.openapi import DOCUMENT, PATHS
from proxy.stores.sqlite import SQLiteStore

TOKEN = "admin-token-openapi-8e2d4c6a0b1f"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
KEY = "sk-openapi-0123456789abcdef"
UNUSED = "https://127.0.0.1:9/mcp"  # a loopback port nothing listens on
# Stored servers of every kind, recreated whenever a generated request deletes one.
BASELINE: dict[str, dict[str, Any]] = {
    "fz-none": {"url": UNUSED, "auth": "none"},
    "fz-key": {"url": UNUSED, "auth": "api_key"},
    "fz-oauth": {"url": UNUSED, "auth": "oauth"},
}
CONFIG_SERVER = "fz-config"  # read-only; it shows the config file's own keys
# Read-only too: a grant, a private key file and managed_by in the answers.
SERVICE_SERVER = {"url": UNUSED, "auth": "oauth", "grant": "client_credentials", "client_id": "fz-service",
                  "client_private_key_file": "/nonexistent/fz-key.pem", "client_assertion_audience": "issuer"}  # fmt: skip
EXAMPLES = 12  # per operation and generation mode: the whole run stays well under a minute
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance]  # fmt: skip


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, salt: str) -> Iterator[ProxyProcess]:
    config = {
        "servers": {
            CONFIG_SERVER: {"url": UNUSED, "auth": "api_key", "api_key_env": "FZ_UNSET_KEY"},
            "fz-service": SERVICE_SERVER,
        },
        "api_servers_allowed_networks": ["127.0.0.0/8", "::1/128"],
    }
    env = {"KEYBEARER_SALT": salt, "KEYBEARER_ADMIN_TOKEN": TOKEN}
    proc = ProxyProcess(config, tmp_path_factory.mktemp("openapi"), env)
    yield proc
    proc.stop()
    log = proc.log()
    for secret in (TOKEN, KEY, salt):
        assert secret not in log


@pytest.fixture(scope="module")
async def baseline(proxy: ProxyProcess, salt: str) -> None:
    async with httpx.AsyncClient(base_url=proxy.url, headers=AUTH, timeout=10) as admin:
        for sid, definition in BASELINE.items():
            assert (await admin.post("/admin/servers", json={"id": sid, **definition})).status_code == 201
        assert (await admin.put("/admin/servers/fz-key/api-key", json={"api_key": KEY})).status_code == 204
        client = {"client_id": "fz-client", "client_secret": "fz-secret-0123456789"}
        assert (await admin.put("/admin/servers/fz-oauth/oauth-client", json=client)).status_code == 200
        assert (await admin.post("/admin/tokens", json={"users": ["alice"]})).status_code == 201
    await seed_oauth_state(proxy, Keyring(salt))


async def seed_oauth_state(proxy: ProxyProcess, keyring: Keyring) -> None:
    """A connected user, a dynamic registration and cached metadata for fz-oauth."""
    db = SQLiteStore(database_file(proxy))
    await db.open()
    try:
        await db.delete_connection("alice", "fz-oauth")
        await seed_connection(db, keyring, "alice", "fz-oauth")
        await seed_registration(db, keyring, "fz-oauth")
        await db.cache_set("oauth:fz-oauth:discovery", "{}", 3600)
    finally:
        await db.close()


def database_file(proxy: ProxyProcess) -> str:
    return str(proxy.config["database_url"].removeprefix("sqlite:///"))


def snapshot(session: requests.Session, proxy: ProxyProcess) -> dict[str, Any]:
    """What the API shows and every row the store's file holds (change events aside)."""
    shown = {path: session.get(proxy.url + path).json() for path in ("/admin/servers", "/admin/tokens")}
    for sid in (*BASELINE, CONFIG_SERVER, "fz-service"):
        for part in ("api-key", "oauth-client", "connections"):
            path = f"/admin/servers/{sid}/{part}"
            shown[path] = session.get(proxy.url + path).json()
    db = sqlite3.connect(f"file:{database_file(proxy)}?mode=ro", uri=True)
    try:
        tables = ("servers", "secrets", "connections", "pending", "locks", "cache")
        stored = {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}
    finally:
        db.close()
    return {"shown": shown, "stored": stored}


def restore_baseline(
    session: requests.Session, proxy: ProxyProcess, keyring: Keyring, shown: dict[str, Any]
) -> bool:
    """Put back what an accepted DELETE or PUT took away, so that later cases have
    it to break; whether anything had to be put back."""
    present = {s["id"]: s for s in shown["/admin/servers"]["servers"]}
    writes = []
    for sid, definition in BASELINE.items():
        if sid not in present:
            writes.append(("POST", "/admin/servers", {"id": sid, **definition}))
        elif present[sid]["auth"] != definition["auth"]:
            writes.append(("PUT", f"/admin/servers/{sid}", definition))
    if not present.get("fz-key", {}).get("api_key", {}).get("set"):
        writes.append(("PUT", "/admin/servers/fz-key/api-key", {"api_key": KEY}))
    for method, path, body in writes:
        session.request(method, proxy.url + path, json=body).raise_for_status()
    restore = bool(writes) or not shown["/admin/servers/fz-oauth/connections"].get("connections")
    if restore:
        asyncio.run(seed_oauth_state(proxy, keyring))
    return restore


# Generated requests mostly name servers that do not exist and URLs that do not
# resolve; some are steered onto existing servers, URLs the policy allows and the
# real token, so that accepted writes and partial writes have a chance to happen.
STEERING = st.tuples(
    st.sampled_from([None, *BASELINE, *BASELINE, CONFIG_SERVER, "fz-service"]),
    st.sampled_from([None, UNUSED, "http://127.0.0.2:9/other"]),
    st.booleans(),
)


def steered(case: schemathesis.Case, server: str | None, url: str | None, token: bool) -> None:
    if server is not None and case.path_parameters and "server" in case.path_parameters:
        case.path_parameters["server"] = server
    if url is not None and isinstance(case.body, dict) and "url" in case.body:
        case.body["url"] = url
    # Negative cases often only break the Authorization header; half of them get the token back.
    if token or case.headers is None or "Authorization" not in case.headers:
        case.headers = {**(case.headers or {}), **AUTH}


def test_document_is_served_without_the_token(proxy: ProxyProcess) -> None:
    answer = httpx.get(proxy.url + "/admin/openapi.json")
    assert answer.status_code == 200
    assert answer.json() == DOCUMENT
    assert answer.json()["openapi"] == "3.1.0"


def test_document_is_off_with_the_admin_api(proxy_factory: type[ProxyProcess]) -> None:
    answer = httpx.get(proxy_factory({}).url + "/admin/openapi.json")
    assert answer.status_code == 404 and answer.json()["error"] == "admin_disabled"


def test_every_route_is_described() -> None:
    from proxy.admin import routes

    served = {
        (r.path, m.lower()) for r in routes(TOKEN, lambda: None) for m in r.methods or () if m != "HEAD"
    }
    catch_all = {("/admin/{rest:path}", m) for m in ("get", "post", "put", "delete", "patch")}
    assert served - catch_all == {(p, m) for p, ops in DOCUMENT["paths"].items() for m in ops}


@pytest.mark.usefixtures("baseline")
def test_fuzzed_requests_get_documented_answers_and_refusals_change_nothing(
    proxy: ProxyProcess, salt: str
) -> None:
    keyring = Keyring(salt)
    schema = schemathesis.openapi.from_url(proxy.url + "/admin/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    expected = {f"{method.upper()} {path}" for path, ops in PATHS.items() for method in ops}
    assert expected <= {operation.label for operation in operations}
    session = requests.Session()
    # Not proxy variables or netrc for loopback: looking them up was a fifth of the run.
    session.trust_env = False
    session.headers.update(AUTH)
    refused = 0
    # What a refused request left: the next case starts from it, unless something was accepted
    # since (nothing else writes meanwhile, and a change in between would fail that next case).
    last: dict[str, Any] | None = None

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(generation_mode=mode)

            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate, Phase.shrink],
                      suppress_health_check=list(HealthCheck))  # fmt: skip
            @given(case=strategy, steer=STEERING)
            def run(case: schemathesis.Case, steer: tuple[str | None, str | None, bool]) -> None:
                nonlocal refused, last
                steered(case, *steer)
                before, last = last or snapshot(session, proxy), None
                if restore_baseline(session, proxy, keyring, before["shown"]):
                    before = snapshot(session, proxy)
                response = case.call(base_url=proxy.url, session=session)
                case.validate_response(response, checks=CHECKS)
                if 400 <= response.status_code < 500:
                    refused += 1
                    after = snapshot(session, proxy)
                    assert after == before, (
                        f"refused with {response.status_code} but changed: {case.as_curl_command()}"
                    )
                    last = after

            run()
    assert refused > len(operations)  # the refusal check did run
