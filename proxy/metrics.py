"""Prometheus metrics. Labels name servers and outcomes, never a user:
user ids are unbounded and personal, so they stay in logs only.

With several workers, set PROMETHEUS_MULTIPROC_DIR (the CLI does) and every
worker's figures are summed at /metrics.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

REQUESTS = Counter(
    "keybearer_requests_total", "Agent requests by server and HTTP status", ["server", "status"]
)
UPSTREAM_LATENCY = Histogram(
    "keybearer_upstream_latency_seconds",
    "Time until the upstream's response headers",
    ["server"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
OPEN_STREAMS = Gauge(
    "keybearer_open_streams", "Event streams being relayed", ["server"], multiprocess_mode="livesum"
)
REFRESHES = Counter(
    "keybearer_token_refresh_total", "Token refreshes by server and result", ["server", "result"]
)
CONSENT_REQUIRED = Counter(
    "keybearer_consent_required_total", "Answers asking a user to connect or reconnect", ["server"]
)
TIME_TO_EXPIRY = Histogram(
    "keybearer_token_time_to_expiry_seconds",
    "Remaining lifetime of the access token when used",
    ["server"],
    buckets=(0, 30, 60, 300, 900, 1800, 3600, 7200, 86400),
)
# Set by every check of a store: the change feed's poll (every few seconds) and
# /ready. With several workers a store counts as up only when every live worker
# reached it at its last check.
STORE_UP = Gauge(
    "keybearer_store_up",
    "1 when the store answered its last check, 0 when it did not",
    ["store"],
    multiprocess_mode="livemin",
)


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


# The forwarding path's children, looked up once: labels() takes a lock and
# builds a key on every call. Both label sets are bounded (servers x statuses).
@functools.lru_cache(maxsize=4096)
def request_counter(server: str, status: int) -> Any:
    return REQUESTS.labels(server, str(status))


@functools.lru_cache(maxsize=1024)
def upstream_latency(server: str) -> Any:
    return UPSTREAM_LATENCY.labels(server)


@functools.lru_cache(maxsize=1024)
def time_to_expiry(server: str) -> Any:
    return TIME_TO_EXPIRY.labels(server)


def refresh_result(server: str, result: str) -> None:
    REFRESHES.labels(server, result).inc()


def store_up(store: str, up: bool) -> None:
    """`store` is "database" (servers, secrets) or "tokens" (per-user tokens), as /ready names them."""
    STORE_UP.labels(store).set(1 if up else 0)
