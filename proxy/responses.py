"""The answers the proxy gives itself, rather than relaying from upstream.

When the agent's request was JSON-RPC, the body is a JSON-RPC error object
carrying the request's id, because that is what an MCP client shows its user;
otherwise it is a plain JSON error. Both say what happened and what to do.
Nothing here carries a `WWW-Authenticate` header: that would send an MCP
client into its own OAuth discovery against the proxy.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from starlette.types import Send

from proxy.jsonbody import parse_json

# JSON-RPC codes: -32000 is the implementation-defined server error range.
RPC_SERVER_ERROR = -32000
RPC_INVALID_REQUEST = -32600
URL_ELICITATION_REQUIRED = -32042


def jsonrpc_id(body: bytes | None) -> tuple[bool, Any]:
    """(is the body a JSON-RPC request, its id)."""
    if not body or body[:1] not in (b"{", b"["):
        return False, None
    try:
        message = parse_json(body)
    except ValueError:
        return False, None
    if isinstance(message, list):
        message = message[0] if message and isinstance(message[0], dict) else {}
    if isinstance(message, dict) and message.get("jsonrpc") == "2.0" and "method" in message:
        return True, message.get("id")
    return False, None


def error_body(
    code: str, message: str, *, body: bytes | None = None, rpc_code: int = RPC_SERVER_ERROR, **data: Any
) -> bytes:
    is_rpc, request_id = jsonrpc_id(body)
    if is_rpc:
        payload: dict[str, Any] = {
            "jsonrpc": "2.0",
            "id": request_id,
            "error": {"code": rpc_code, "message": message, "data": {"error": code, **data}},
        }
    else:
        payload = {"error": code, "message": message, **data}
    return json.dumps(payload).encode()


def elicitation_required(body: bytes | None, server: str, url: str, message: str) -> bytes | None:
    """The -32042 URL-elicitation error (MCP 2025-11-25), or None when the
    request was not a JSON-RPC request that can carry an answer."""
    is_rpc, request_id = jsonrpc_id(body)
    if not is_rpc or request_id is None:
        return None
    elicitation = {
        "mode": "url",
        "elicitationId": f"connect-{server}-{secrets.token_hex(6)}",
        "url": url,
        "message": message,
    }
    payload = {
        "jsonrpc": "2.0",
        "id": request_id,
        "error": {
            "code": URL_ELICITATION_REQUIRED,
            "message": message,
            "data": {"elicitations": [elicitation]},
        },
    }
    return json.dumps(payload).encode()


async def send_json(
    send: Send, status: int, content: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(content)).encode()),
                (b"cache-control", b"no-store"),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": content})


async def send_error(
    send: Send,
    status: int,
    code: str,
    message: str,
    *,
    body: bytes | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
    **data: Any,
) -> int:
    content = error_body(code, message, body=body, **data)
    await send_json(send, status, content, headers)
    return len(content)
