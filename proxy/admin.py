"""The admin HTTP API under /admin/: bearer-token protected, off when no token is set.

401 means "no credential presented", 403 "the credential is wrong". Every
answer is JSON; every refusal says what to change. Bodies are capped and
unknown fields refused before anything is stored.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy import errors
from proxy.errors import Answer, InvalidInput, KeybearerError, NotFound, TooLarge
from proxy.jsonbody import JSONBodyError, parse_json
from proxy.management import Management
from proxy.openapi import DOCUMENT
from proxy.settings import ID_PATTERN, SERVER_ID_PATTERN, ConfigError
from proxy.stores import StoreUnavailable

log = structlog.get_logger("keybearer.admin")

MAX_BODY = 64 * 1024
Handler = Callable[[Request, Management], Awaitable[Response]]


def routes(admin_token: str | None, management: Callable[[], Management]) -> list[Route]:
    async def openapi(request: Request) -> Response:
        # Served without the token: it describes the API and holds no secret.
        return JSONResponse(DOCUMENT) if admin_token else disabled()

    def guarded(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            if not admin_token:
                return disabled()
            refused = check_token(request, admin_token)
            if refused is not None:
                return refused
            try:
                return await handler(request, management())
            except StoreUnavailable as exc:
                log.error("admin request failed: store unavailable", reason=exc.message)
                # Writes validate first and touch the store last: a refusal here changed
                # nothing, unless a write was cut off by the deadline after it was sent.
                next_step = (
                    "the change may still be made when the store answers again: look before retrying"
                    if exc.maybe_applied
                    else "nothing was changed, retry when it is back"
                )
                return errors.json_response(replace(exc.answer(), next_step=next_step))
            except KeybearerError as exc:
                if exc.status >= 500:
                    log.error("admin request failed", code=exc.code, reason=exc.message)
                return errors.json_response(exc.answer())

        return endpoint

    return [
        Route("/admin/servers", guarded(list_servers), methods=["GET"]),
        Route("/admin/servers", guarded(create_server), methods=["POST"]),
        Route("/admin/servers/{server}", guarded(get_server), methods=["GET"]),
        Route("/admin/servers/{server}", guarded(update_server), methods=["PUT"]),
        Route("/admin/servers/{server}", guarded(delete_server), methods=["DELETE"]),
        Route("/admin/servers/{server}/api-key", guarded(get_api_key), methods=["GET"]),
        Route("/admin/servers/{server}/api-key", guarded(set_api_key), methods=["PUT"]),
        Route("/admin/servers/{server}/api-key", guarded(clear_api_key), methods=["DELETE"]),
        Route("/admin/servers/{server}/oauth-client", guarded(get_oauth_client), methods=["GET"]),
        Route("/admin/servers/{server}/oauth-client", guarded(set_oauth_client), methods=["PUT"]),
        Route("/admin/servers/{server}/oauth-client", guarded(clear_oauth_client), methods=["DELETE"]),
        Route("/admin/servers/{server}/connections", guarded(list_connections), methods=["GET"]),
        Route("/admin/servers/{server}/connections/{user}", guarded(delete_connection), methods=["DELETE"]),
        Route("/admin/servers/{server}/reset", guarded(reset), methods=["POST"]),
        Route("/admin/tokens", guarded(list_tokens), methods=["GET"]),
        Route("/admin/tokens", guarded(create_token), methods=["POST"]),
        Route("/admin/tokens/{token}", guarded(revoke_token), methods=["DELETE"]),
        Route("/admin/links", guarded(create_links), methods=["POST"]),
        Route("/admin/openapi.json", openapi, methods=["GET"]),
        Route("/admin/{rest:path}", guarded(unknown), methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
    ]


def check_token(request: Request, expected: str) -> Response | None:
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        # The admin API's own challenge: admin clients are not MCP clients.
        return errors.json_response(Answer(
            401, "unauthorized", "no admin token was sent", "send it as `Authorization: Bearer <token>`",
            headers=(("www-authenticate", 'Bearer realm="keybearer-admin"'),),
        ))  # fmt: skip
    if not hmac.compare_digest(presented.strip().encode(), expected.encode()):
        log.warning(
            "admin request with a wrong token", client=request.client.host if request.client else None
        )
        return errors.json_response(Answer(403, "forbidden", "the admin token is wrong"))
    return None


def disabled() -> Response:
    return errors.json_response(
        Answer(404, "admin_disabled", "the admin API is off", "set KEYBEARER_ADMIN_TOKEN to turn it on")
    )


class BadRequest(InvalidInput):
    pass


def _too_large() -> TooLarge:
    return TooLarge(f"admin request bodies are limited to {MAX_BODY} bytes")


async def body(request: Request) -> Any:
    declared = request.headers.get("content-length")
    if declared and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise _too_large()
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise _too_large()
    try:
        data = parse_json(raw)
        # A lone surrogate escape ("\ud800") is valid JSON but not text: stored,
        # it would break every later answer that shows it.
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise BadRequest("the body holds a lone surrogate escape such as \\ud800: send text") from None
    except JSONBodyError as exc:
        raise BadRequest(str(exc)) from None
    return data


def path_param(request: Request, name: str) -> str:
    value = str(request.path_params[name])
    if not ID_PATTERN.fullmatch(value):
        raise BadRequest(f"{name} {value!r} is not a valid id")
    return value


async def list_servers(request: Request, m: Management) -> Response:
    return JSONResponse({"servers": m.list_servers()})


async def get_server(request: Request, m: Management) -> Response:
    return JSONResponse(m.describe(m.server(path_param(request, "server"))))


async def create_server(request: Request, m: Management) -> Response:
    data = await body(request)
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        raise BadRequest("send a JSON object with `id`, `url` and `auth`")
    server_id = data.pop("id")
    if not SERVER_ID_PATTERN.fullmatch(server_id):
        raise ConfigError("id", "must be 1-64 characters of a-z, 0-9, '-' and '_', starting alphanumeric")
    server = await m.create_server(server_id, data)
    return JSONResponse(m.describe(server), status_code=201)


async def update_server(request: Request, m: Management) -> Response:
    data = await body(request)
    if (
        isinstance(data, dict)
        and data.get("id", request.path_params["server"]) != request.path_params["server"]
    ):
        raise BadRequest("the id in the body differs from the one in the path; ids cannot be changed")
    if isinstance(data, dict):
        data.pop("id", None)
    server = await m.update_server(path_param(request, "server"), data)
    return JSONResponse(m.describe(server))


async def delete_server(request: Request, m: Management) -> Response:
    await m.delete_server(path_param(request, "server"))
    return Response(status_code=204)


async def get_api_key(request: Request, m: Management) -> Response:
    server = m.server(path_param(request, "server"))
    return JSONResponse(m.describe(server).get("api_key", {"set": False}))


async def set_api_key(request: Request, m: Management) -> Response:
    server_id = path_param(request, "server")
    data = await body(request)
    if not isinstance(data, dict) or set(data) != {"api_key"}:
        raise BadRequest('send {"api_key": "<key>"} and nothing else')
    await m.set_api_key(server_id, data["api_key"])
    return Response(status_code=204)


async def clear_api_key(request: Request, m: Management) -> Response:
    if not await m.clear_api_key(path_param(request, "server")):
        raise NotFound("no stored API key for this server")
    return Response(status_code=204)


async def get_oauth_client(request: Request, m: Management) -> Response:
    return JSONResponse(await m.oauth_client(path_param(request, "server")))


async def set_oauth_client(request: Request, m: Management) -> Response:
    server_id = path_param(request, "server")
    return JSONResponse(await m.set_oauth_client(server_id, await body(request)))


async def clear_oauth_client(request: Request, m: Management) -> Response:
    if not await m.clear_oauth_client(path_param(request, "server")):
        raise NotFound("no static OAuth client is stored for this server")
    return Response(status_code=204)


async def list_connections(request: Request, m: Management) -> Response:
    server_id = path_param(request, "server")
    return JSONResponse({"server": server_id, "connections": await m.connections(server_id)})


async def delete_connection(request: Request, m: Management) -> Response:
    server_id, user = path_param(request, "server"), path_param(request, "user")
    if not await m.delete_connection(server_id, user):
        raise NotFound(f"user {user!r} has no connection to {server_id!r}")
    return Response(status_code=204)


async def reset(request: Request, m: Management) -> Response:
    return JSONResponse(
        {"server": request.path_params["server"], "deleted": await m.reset(path_param(request, "server"))}
    )


async def list_tokens(request: Request, m: Management) -> Response:
    return JSONResponse({"tokens": await m.list_tokens()})


async def create_token(request: Request, m: Management) -> Response:
    data = await body(request)
    if not isinstance(data, dict) or not set(data) <= {"users", "label"} or "users" not in data:
        raise BadRequest('send {"users": ["<user id>", …], "label": "<what it is for>"}')
    value, info = await m.create_token(data["users"], data.get("label", ""))
    # The only time the token is ever shown.
    return JSONResponse({"token": value, **info}, status_code=201, headers={"Cache-Control": "no-store"})


async def revoke_token(request: Request, m: Management) -> Response:
    token_id = str(request.path_params["token"])
    if not token_id.isalnum() or len(token_id) > 32:
        raise BadRequest("not a token id")
    await m.revoke_token(token_id)
    return Response(status_code=204)


async def create_links(request: Request, m: Management) -> Response:
    data = await body(request)
    if isinstance(data, dict) and set(data) == {"console"} and data["console"] is True:
        return JSONResponse(m.console_link(), headers={"Cache-Control": "no-store"})
    if not isinstance(data, dict) or "user" not in data or not set(data) <= {"user", "server"}:
        raise BadRequest(
            'send {"user": "<user id>", "server": "<oauth server id>"} (server optional) or {"console": true}'
        )
    # Links are credentials for a while: never cached on the way.
    return JSONResponse(
        m.person_links(data["user"], data.get("server")), headers={"Cache-Control": "no-store"}
    )


async def unknown(request: Request, m: Management) -> Response:
    raise NotFound(
        f"no admin endpoint {request.method} {request.url.path}", next_step="see README's admin API section"
    )
