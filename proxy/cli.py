"""`keybearer`: serve, check the config, and manage what the store holds.

Exit codes: 0 done, 1 the operation failed (store down, nothing to delete),
2 the input or configuration is wrong. Errors go to stderr in one line that
names the bad key or argument and what to do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from proxy import logs
from proxy.crypto import Keyring, SecretError, check_salt
from proxy.registry import Registry, RegistryError
from proxy.settings import ConfigError, Settings, load_settings, parse_server
from proxy.stores import StoreUnavailable, open_store


class Failure(Exception):
    """A failed operation (exit 1), as opposed to bad input (exit 2)."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(flags=_flags(args))
        return int(args.run(args, settings) or 0)
    except (ConfigError, SecretError, RegistryError, ValueError) as exc:
        print(f"keybearer: error: {exc}", file=sys.stderr)
        return 2
    except (Failure, StoreUnavailable) as exc:
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
    migrate.set_defaults(run=_store_command(migrate_command))

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
    p = srv_sub.add_parser("remove", parents=[common], help="delete a stored server and its secrets")
    p.add_argument("server")
    p.set_defaults(run=_store_command(servers_remove))
    return parser


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    names = ("config", "database_url", "listen", "public_url", "log_level")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def serve_command(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from proxy.app import Keybearer

    logs.configure(settings.log_level)
    app = Keybearer(settings)
    uvicorn.run(
        app,
        host=settings.listen_host,
        port=settings.listen_port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        date_header=False,
        timeout_graceful_shutdown=10,
    )
    return 0


def check_command(args: argparse.Namespace, settings: Settings) -> int:
    check_salt(settings.salt)
    for previous in settings.salt_previous:
        check_salt(previous, "KEYBEARER_SALT_PREVIOUS")
    open_store(settings.database_url)
    _print(args, {"ok": True, "servers": sorted(settings.servers)},
           f"configuration OK: {len(settings.servers)} server(s): {', '.join(sorted(settings.servers)) or 'none'}")  # fmt: skip
    return 0


StoreCommand = Callable[[argparse.Namespace, Registry], Awaitable[int | None]]


def _store_command(fn: StoreCommand) -> Callable[[argparse.Namespace, Settings], int]:
    def run(args: argparse.Namespace, settings: Settings) -> int:
        async def go() -> int:
            store = open_store(settings.database_url)
            await store.open()
            try:
                await store.migrate()
                registry = Registry(
                    settings.servers, store, Keyring(settings.salt or "", settings.salt_previous)
                )
                await registry.load()
                return int(await fn(args, registry) or 0)
            finally:
                await store.close()

        return asyncio.run(go())

    return run


async def migrate_command(args: argparse.Namespace, registry: Registry) -> int:
    _print(args, {"ok": True}, "database schema is up to date")
    return 0


async def api_key_set(args: argparse.Namespace, registry: Registry) -> int:
    if sys.stdin.isatty():
        print(f"Paste the API key for {args.server}, then press Enter:", file=sys.stderr)
    key = sys.stdin.readline()
    await registry.set_api_key(args.server, key)
    _print(args, {"ok": True, "server": args.server}, f"API key for {args.server} stored (encrypted)")
    return 0


async def api_key_clear(args: argparse.Namespace, registry: Registry) -> int:
    if not await registry.clear_api_key(args.server):
        raise Failure(f"server {args.server!r} has no stored API key")
    _print(args, {"ok": True, "server": args.server}, f"API key for {args.server} deleted")
    return 0


async def api_key_show(args: argparse.Namespace, registry: Registry) -> int:
    server = registry.get(args.server)
    if server is None:
        raise RegistryError(f"no server {args.server!r}")
    info = registry.key_info(server)
    text = f"{args.server}: " + (
        f"set ({info.source}), {info.length} characters, ending …{info.last4 or '(hidden)'}"
        if info.set
        else "not set"
    )
    _print(args, {"server": args.server, **info.__dict__}, text)
    return 0


async def servers_list(args: argparse.Namespace, registry: Registry) -> int:
    rows = [
        {"id": s.id, "source": s.source, **s.to_dict()}
        for s in sorted(registry.servers.values(), key=lambda s: s.id)
    ]
    text = (
        "\n".join(f"{r['id']:<24} {r['auth']:<8} {r['source']:<7} {r['url']}" for r in rows) or "no servers"
    )
    _print(args, rows, text)
    return 0


async def servers_add(args: argparse.Namespace, registry: Registry) -> int:
    raw: dict[str, Any] = {"url": args.url, "auth": args.auth}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: write KEY=VALUE")
        raw[key] = value
    server = parse_server(args.server, raw, key=args.server, source="store")
    await registry.put_server(server)
    _print(args, {"ok": True, "id": server.id, **server.to_dict()}, f"server {server.id} saved")
    return 0


async def servers_remove(args: argparse.Namespace, registry: Registry) -> int:
    if not await registry.delete_server(args.server):
        raise Failure(f"no stored server {args.server!r}")
    _print(args, {"ok": True, "id": args.server}, f"server {args.server} and its secrets deleted")
    return 0


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if getattr(args, "json", False) else text)


if __name__ == "__main__":
    sys.exit(main())
