"""`keybearer`: serve, check the config, and manage what the store holds.

Exit codes: 0 done, 1 the operation failed (store down, nothing to delete),
2 the input or configuration is wrong. Errors go to stderr in one line that
names the bad key or argument and what to do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog

from proxy import logs
from proxy.app import compose
from proxy.crypto import check_salt
from proxy.errors import InvalidInput, KeybearerError, NotFound
from proxy.management import Management
from proxy.settings import ConfigError, Settings, load_settings
from proxy.stores import open_store, open_token_store
from proxy.stores.base import SchemaStatus

log = structlog.get_logger("keybearer.cli")


# Connection states with a token (else a refusal or a sign-in needed, since obtained_at).
HOLDS_TOKEN = ("connected", "must_reconnect")


class Failure(KeybearerError):
    """A failed operation (exit 1), as opposed to bad input (exit 2)."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(flags=_flags(args))
        return int(args.run(args, settings) or 0)
    except (InvalidInput, NotFound) as exc:
        print(f"keybearer: error: {exc}", file=sys.stderr)
        return 2
    except KeybearerError as exc:
        print(f"keybearer: failed: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="YAML config file (env KEYBEARER_CONFIG)")
    common.add_argument("--database-url", help="sqlite:///file.db (env KEYBEARER_DATABASE_URL)")
    common.add_argument("--json", action="store_true", help="print JSON for scripts")

    parser = argparse.ArgumentParser(
        prog="keybearer", description="Auth sidecar and reverse proxy for MCP servers."
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", parents=[common], help="run the proxy")
    serve.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (env KEYBEARER_LISTEN)")
    serve.add_argument("--public-url", help="where browsers reach the proxy (env KEYBEARER_PUBLIC_URL)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(run=serve_command)

    check = sub.add_parser(
        "check", parents=[common], help="validate the configuration and secrets, then exit"
    )
    check.set_defaults(run=check_command)

    migrate = sub.add_parser("migrate", parents=[common], help="apply database migrations")
    migrate.set_defaults(run=migrate_command)

    api_key = sub.add_parser("api-key", help="manage a server's stored API key")
    api_sub = api_key.add_subparsers(required=True, metavar="ACTION")
    for name, fn, text in (
        ("set", api_key_set, "store the key read from standard input (never from the command line)"),
        ("clear", api_key_clear, "delete the stored key"),
        ("show", api_key_show, "show whether a key is set, its length and last four characters"),
    ):
        p = api_sub.add_parser(name, parents=[common], help=text)
        p.add_argument("server")
        p.set_defaults(run=_store_command(fn))

    servers = sub.add_parser("servers", help="list and manage servers added at run time")
    srv_sub = servers.add_subparsers(required=True, metavar="ACTION")
    p = srv_sub.add_parser("list", parents=[common], help="every server, from the config file and the store")
    p.set_defaults(run=_store_command(servers_list))
    p = srv_sub.add_parser("add", parents=[common], help="add or replace a stored server")
    p.add_argument("server")
    p.add_argument("--url", required=True)
    p.add_argument("--auth", required=True, choices=["none", "api_key", "oauth"])
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another server key, e.g. api_key_header=X-API-Key",
    )
    p.set_defaults(run=_store_command(servers_add))
    p = srv_sub.add_parser(
        "remove", parents=[common], help="delete a stored server, its secrets and every user's tokens"
    )
    p.add_argument("server")
    p.set_defaults(run=_store_command(servers_remove))

    oauth = sub.add_parser(
        "oauth-client", help="a server's static OAuth client (for providers without registration)"
    )
    oauth_sub = oauth.add_subparsers(required=True, metavar="ACTION")
    p = oauth_sub.add_parser(
        "set", parents=[common], help="store a client id; the secret is read from standard input"
    )
    p.add_argument("server")
    p.add_argument("--client-id", required=True)
    p.add_argument("--auth-method", choices=["client_secret_basic", "client_secret_post", "none"])
    p.add_argument("--no-secret", action="store_true", help="a public client: read no secret")
    p.set_defaults(run=_store_command(oauth_client_set))
    for name, fn, text in (("show", oauth_client_show, "show the stored client (never the secret)"),
                           ("clear", oauth_client_clear, "delete the stored client")):  # fmt: skip
        p = oauth_sub.add_parser(name, parents=[common], help=text)
        p.add_argument("server")
        p.set_defaults(run=_store_command(fn))

    conns = sub.add_parser("connections", help="users' OAuth connections to a server")
    conns_sub = conns.add_subparsers(required=True, metavar="ACTION")
    p = conns_sub.add_parser("list", parents=[common], help="connected users with state and expiry")
    p.add_argument("server")
    p.set_defaults(run=_store_command(connections_list))
    p = conns_sub.add_parser("delete", parents=[common], help="delete one user's connection")
    p.add_argument("server")
    p.add_argument("user")
    p.set_defaults(run=_store_command(connections_delete))

    p = sub.add_parser(
        "reset", parents=[common], help="wipe a server's OAuth state: tokens, registrations, caches"
    )
    p.add_argument("server")
    p.set_defaults(run=_store_command(reset_command))

    toks = sub.add_parser("tokens", help="caller tokens for inbound_auth: tokens")
    toks_sub = toks.add_subparsers(required=True, metavar="ACTION")
    p = toks_sub.add_parser(
        "create", parents=[common], help="a new token, printed once, for the given user ids"
    )
    p.add_argument(
        "--user", action="append", required=True, dest="users", help="a user id it may act for (repeat)"
    )
    p.add_argument("--label", default="", help="what or who it is for")
    p.set_defaults(run=_store_command(tokens_create))
    p = toks_sub.add_parser("list", parents=[common], help="token ids, users and labels (never the tokens)")
    p.set_defaults(run=_store_command(tokens_list))
    p = toks_sub.add_parser("revoke", parents=[common], help="delete a token")
    p.add_argument("token_id")
    p.set_defaults(run=_store_command(tokens_revoke))

    p = sub.add_parser(
        "link",
        parents=[common],
        help="links for a person (connections; connect with SERVER), or --admin for the operator console",
    )
    p.add_argument("user", nargs="?", help="the person's user id")
    p.add_argument("server", nargs="?", help="an oauth server: also print a connect link for it")
    p.add_argument("--admin", action="store_true", help="a short-lived link to the operator console")
    p.set_defaults(run=_store_command(link_command))

    keys = sub.add_parser("keys", help="encryption keys")
    keys_sub = keys.add_subparsers(required=True, metavar="ACTION")
    p = keys_sub.add_parser(
        "rotate", parents=[common], help="re-encrypt every stored secret and token with the current salt"
    )
    p.set_defaults(run=_store_command(keys_rotate))
    return parser


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    names = ("config", "database_url", "listen", "public_url", "log_level")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def serve_command(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from proxy.app import Keybearer, check_exposure
    from proxy.serving import http_protocol

    logs.configure(settings.log_level, flush_interval=logs.SERVER_FLUSH_INTERVAL)
    check_exposure(settings)
    app = Keybearer(settings)  # fails here, before listening, on a bad salt or store URL
    status = asyncio.run(_schema(settings))
    if status.unknown:
        # Old and new replicas serve side by side during a rolling update.
        log.warning("the database schema is newer than this version", unknown=list(status.unknown))
    elif status.pending and not (settings.migrate_on_start or app.parts.store.embedded):
        raise Failure(_behind(status))
    if settings.workers > 1:
        # Each worker builds its own app from the same configuration.
        os.environ.update(_flag_env(args))
        if settings.config_file:
            os.environ["KEYBEARER_CONFIG"] = settings.config_file
        metrics_dir = tempfile.mkdtemp(prefix="keybearer-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    _serve_metrics(settings)
    uvicorn.run(
        "proxy.app:from_environment" if settings.workers > 1 else app,
        factory=settings.workers > 1,
        host=settings.listen_host,
        port=settings.listen_port,
        workers=settings.workers,
        loop="uvloop",
        http=http_protocol(settings),  # httptools, with limits on heads and connections
        lifespan="on",
        log_config=None,
        access_log=False,
        # The agent is not a trusted proxy: never take its X-Forwarded-* as the client.
        proxy_headers=False,
        server_header=False,
        date_header=False,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout),  # int(0.5) would be no grace at all
    )
    return 0


def _flag_env(args: argparse.Namespace) -> dict[str, str]:
    return {f"KEYBEARER_{k.upper()}": str(v) for k, v in _flags(args).items() if k != "config"}


def _serve_metrics(settings: Settings) -> None:
    if not settings.metrics_listen:
        return
    import prometheus_client
    from prometheus_client import multiprocess

    registry = prometheus_client.REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    host, _, port = settings.metrics_listen.rpartition(":")
    prometheus_client.start_http_server(int(port), addr=host.strip("[]"), registry=registry)


def check_command(args: argparse.Namespace, settings: Settings) -> int:
    check_salt(settings.salt)
    for previous in settings.salt_previous:
        check_salt(previous, "KEYBEARER_SALT_PREVIOUS")
    open_store(settings)
    open_token_store(settings)
    _print(args, {"ok": True, "servers": sorted(settings.servers)},
           f"configuration OK: {len(settings.servers)} server(s): {', '.join(sorted(settings.servers)) or 'none'}")  # fmt: skip
    return 0


StoreCommand = Callable[[argparse.Namespace, Management], Awaitable[int | None]]


def _store_command(fn: StoreCommand) -> Callable[[argparse.Namespace, Settings], int]:
    def run(args: argparse.Namespace, settings: Settings) -> int:
        # Log lines (redacted) go to stderr: stdout is the command's answer, JSON with --json.
        logs.configure(settings.log_level, sys.stderr)

        async def go() -> int:
            parts = compose(settings)
            # An embedded store migrates itself; a shared one only by `keybearer migrate`.
            _require_schema(await _schema(settings), migrates=parts.store.embedded)
            async with parts.opened():
                return int(await fn(args, parts.management) or 0)

        return asyncio.run(go())

    return run


async def _schema(settings: Settings) -> SchemaStatus:
    store = open_store(settings)
    await store.open()
    try:
        return await store.schema_status()
    finally:
        await store.close()


def _require_schema(status: SchemaStatus, *, migrates: bool) -> None:
    """Refuse to work on a schema this version does not match."""
    if status.unknown:
        raise Failure(
            f"the database schema is newer than this keybearer: it has migration(s) {', '.join(status.unknown)}, "
            "which this version does not know; use the keybearer version that migrated it, or a newer one"
        )
    if status.pending and not migrates:
        raise Failure(_behind(status))


def _behind(status: SchemaStatus) -> str:
    return (
        f"the database schema is behind this keybearer: {len(status.pending)} migration(s) pending "
        f"({', '.join(status.pending)}); run `keybearer migrate` with the same settings first"
    )


def migrate_command(args: argparse.Namespace, settings: Settings) -> int:
    logs.configure(settings.log_level, sys.stderr)

    async def go() -> list[str]:
        store = open_store(settings)
        await store.open()
        try:
            _require_schema(await store.schema_status(), migrates=True)
            return await store.migrate()
        finally:
            await store.close()

    applied = asyncio.run(go())
    text = (
        f"applied {len(applied)} migration(s): {', '.join(applied)}"
        if applied
        else "database schema is up to date"
    )
    _print(args, {"ok": True, "applied": applied}, text)
    return 0


async def api_key_set(args: argparse.Namespace, m: Management) -> int:
    key = _read_secret(f"the API key for {args.server}")
    await m.set_api_key(args.server, key)
    _print(args, {"ok": True, "server": args.server}, f"API key for {args.server} stored (encrypted)")
    return 0


async def api_key_clear(args: argparse.Namespace, m: Management) -> int:
    if not await m.clear_api_key(args.server):
        raise Failure(f"server {args.server!r} has no stored API key")
    _print(args, {"ok": True, "server": args.server}, f"API key for {args.server} deleted")
    return 0


async def api_key_show(args: argparse.Namespace, m: Management) -> int:
    info = m.registry.key_info(m.server(args.server))
    text = f"{args.server}: " + (
        f"set ({info.source}), {info.length} characters, ending …{info.last4 or '(hidden)'}"
        if info.set
        else "not set"
    )
    _print(args, {"server": args.server, **info.__dict__}, text)
    return 0


async def servers_list(args: argparse.Namespace, m: Management) -> int:
    rows = m.list_servers()
    managed = {
        "organisation": "  (managed by the organisation)",
        "operator": "  (one token, the proxy's client)",
    }
    text = "\n".join(
        f"{r['id']:<24} {r['auth']:<8} {r['source']:<7} {r['url']}{managed.get(r.get('managed_by', ''), '')}"
        for r in rows
    )
    text = text or "no servers"
    _print(args, rows, text)
    return 0


async def servers_add(args: argparse.Namespace, m: Management) -> int:
    raw: dict[str, Any] = {"url": args.url, "auth": args.auth}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError("--set", f"{item!r}: write KEY=VALUE")
        raw[key] = value
    if m.registry.get(args.server) is not None:
        server = await m.update_server(args.server, raw)
    else:
        server = await m.create_server(args.server, raw)
    _print(args, m.describe(server), f"server {server.id} saved")
    return 0


async def servers_remove(args: argparse.Namespace, m: Management) -> int:
    await m.delete_server(args.server)
    _print(args, {"ok": True, "id": args.server}, f"server {args.server} and its secrets deleted")
    return 0


async def oauth_client_set(args: argparse.Namespace, m: Management) -> int:
    body: dict[str, Any] = {"client_id": args.client_id}
    if args.auth_method:
        body["auth_method"] = args.auth_method
    if not args.no_secret:
        body["client_secret"] = _read_secret(f"the client secret for {args.server}").strip()
    info = await m.set_oauth_client(args.server, body)
    _print(args, info, f"OAuth client for {args.server} stored ({info['auth_method']})")
    return 0


async def oauth_client_show(args: argparse.Namespace, m: Management) -> int:
    info = await m.oauth_client(args.server)
    text = (
        f"{args.server}: client {info['client_id']} ({info['auth_method']})"
        if info["set"]
        else f"{args.server}: none"
    )
    _print(args, info, text)
    return 0


async def oauth_client_clear(args: argparse.Namespace, m: Management) -> int:
    if not await m.clear_oauth_client(args.server):
        raise Failure(f"server {args.server!r} has no stored OAuth client")
    _print(args, {"ok": True}, f"OAuth client for {args.server} deleted")
    return 0


async def connections_list(args: argparse.Namespace, m: Management) -> int:
    rows = await m.connections(args.server)
    # A state without a token (a refusal, a sign-in needed) shows when it began instead of an expiry.
    text = "\n".join(
        f"{r['user']:<32} {r['state']:<16} "
        f"{_when(r['expires_at']) if r['state'] in HOLDS_TOKEN else 'since ' + _when(r['obtained_at'])} "
        f"{r['last_error'] or ''}"
        for r in rows
    )
    _print(args, rows, text or f"no connections to {args.server}")
    return 0


async def connections_delete(args: argparse.Namespace, m: Management) -> int:
    if not await m.delete_connection(args.server, args.user):
        raise Failure(f"user {args.user!r} has no connection to {args.server!r}")
    _print(args, {"ok": True}, f"connection of {args.user} to {args.server} deleted")
    return 0


async def reset_command(args: argparse.Namespace, m: Management) -> int:
    deleted = await m.reset(args.server)
    _print(args, {"server": args.server, "deleted": deleted},
           f"{args.server}: deleted {deleted['connections']} connection(s), {deleted['registrations']} registration(s), "
           f"{deleted['cache_entries']} cache entrie(s)")  # fmt: skip
    return 0


async def tokens_create(args: argparse.Namespace, m: Management) -> int:
    value, info = await m.create_token(args.users, args.label)
    _print(args, {"token": value, **info}, f"{value}\n(shown once: store it now; id {info['id']})")
    return 0


async def tokens_list(args: argparse.Namespace, m: Management) -> int:
    rows = await m.list_tokens()
    _print(
        args, rows, "\n".join(f"{r['id']}  {','.join(r['users'])}  {r['label']}" for r in rows) or "no tokens"
    )
    return 0


async def tokens_revoke(args: argparse.Namespace, m: Management) -> int:
    try:
        await m.revoke_token(args.token_id)
    except NotFound as exc:
        raise Failure(str(exc)) from None  # nothing to delete: exit 1, like `api-key clear`
    _print(args, {"ok": True}, f"token {args.token_id} revoked")
    return 0


async def link_command(args: argparse.Namespace, m: Management) -> int:
    if args.admin:
        if args.user:
            raise InvalidInput("--admin takes no user: the console link is for operators")
        info = m.console_link()
        _print(
            args,
            info,
            f"operator console: {info['console_url']}\n(valid until {_when(info['expires_at'])} UTC)",
        )
        return 0
    if not args.user:
        raise InvalidInput(
            "name the person's user id: keybearer link USER [SERVER], or keybearer link --admin"
        )
    info = m.person_links(args.user, args.server)
    lines = [f"connections of {args.user}: {info['connections_url']}"]
    if "connect_url" in info:
        lines.append(f"connect {info['server']}: {info['connect_url']}")
    lines.append(f"(signed links are valid until {_when(info['expires_at'])} UTC)")
    _print(args, info, "\n".join(lines))
    return 0


async def keys_rotate(args: argparse.Namespace, m: Management) -> int:
    from proxy.rotation import rotate

    report = await rotate(m.registry, m.store, m.tokens)
    _print(args, report.__dict__, report.summary())
    return 1 if report.failed else 0


def _read_secret(what: str) -> str:
    if sys.stdin.isatty():
        print(f"Paste {what}, then press Enter:", file=sys.stderr)
    return sys.stdin.readline()


def _when(timestamp: float | None) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp)) if timestamp else "-"


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if getattr(args, "json", False) else text)


if __name__ == "__main__":
    sys.exit(main())
