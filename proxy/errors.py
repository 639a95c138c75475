"""The proxy's own answers, and the one root of the errors that carry them.

Every error the proxy raises on purpose is a `KeybearerError`; each knows its
`Answer`: a status, a code, a message that says what happened and what to do
next, and the headers that go with it. An answer is rendered here and nowhere
else, for whoever asked:

- an agent: a JSON-RPC error carrying the request's id when the request was
  JSON-RPC (that is what an MCP client shows its user), else a JSON object;
  a consent answer becomes the -32042 URL elicitation (MCP 2025-11-25);
- the admin API: the JSON object;
- a person's browser: a page (`pages.problem`).

Nothing here carries a `WWW-Authenticate` header: that would send an MCP
client into its own OAuth discovery against the proxy.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.types import Send

from proxy import jsonbody, pages

# JSON-RPC codes: -32000 is the implementation-defined server error range.
RPC_SERVER_ERROR = -32000
URL_ELICITATION_REQUIRED = -32042


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    code: str
    message: str  # what happened
    next_step: str | None = None  # what to do about it
    headers: tuple[tuple[str, str], ...] = ()
    data: Mapping[str, Any] = field(default_factory=dict)
    title: str | None = None  # a page's heading
    # Set on consent answers: the link a person must open. A JSON-RPC request
    # then gets the -32042 elicitation carrying it.
    elicitation_url: str | None = None
    # A page's button for the next step: (label, URL).
    action: tuple[str, str] | None = None

    @property
    def text(self) -> str:
        return self.message if not self.next_step else f"{self.message}; {self.next_step}"


class KeybearerError(Exception):
    """The root of every error the proxy raises on purpose."""

    status = 500
    code = "internal_error"
    title = "Something went wrong"

    def __init__(
        self,
        message: str,
        *,
        next_step: str | None = None,
        status: int | None = None,
        code: str | None = None,
        title: str | None = None,
        retry_after: int | None = None,
        action: tuple[str, str] | None = None,
        **data: Any,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.next_step = next_step
        self.status = status or type(self).status
        self.code = code or type(self).code
        self.title = title or type(self).title
        self.retry_after = retry_after
        self.action = action
        self.data = data

    def answer(self) -> Answer:
        headers = (("retry-after", str(self.retry_after)),) if self.retry_after else ()
        return Answer(
            self.status, self.code, self.message, self.next_step, headers, self.data, self.title,
            action=self.action,
        )  # fmt: skip

    def __str__(self) -> str:
        return self.message if not self.next_step else f"{self.message}; {self.next_step}"


class InvalidInput(KeybearerError):
    """The request or the command line is wrong; nothing was changed."""

    status = 400
    code = "invalid_request"
    title = "Bad request"


class NotFound(KeybearerError):
    status = 404
    code = "not_found"
    title = "Not found"


class Conflict(KeybearerError):
    status = 409
    code = "conflict"
    title = "Not possible now"


class TooLarge(KeybearerError):
    status = 413
    code = "body_too_large"
    title = "Too large"


class Forbidden(KeybearerError):
    status = 403
    code = "forbidden"
    title = "Not allowed"


class Unavailable(KeybearerError):
    """Something the proxy depends on is down; the same request may work later."""

    status = 503
    code = "temporarily_unavailable"
    title = "Temporarily unavailable"

    def __init__(self, message: str, retry_after: int = 10, **kwargs: Any) -> None:
        super().__init__(message, retry_after=retry_after, **kwargs)


class UpstreamFailed(KeybearerError):
    status = 502
    code = "bad_gateway"
    title = "The server failed"


# -- rendering -------------------------------------------------------------------------


def jsonrpc_id(body: bytes | None) -> tuple[bool, Any]:
    """(is the body a JSON-RPC request, its id)."""
    if not body or body[:1] not in (b"{", b"["):
        return False, None
    message = parse_json(body)
    if isinstance(message, list):
        message = message[0] if message and isinstance(message[0], dict) else {}
    if isinstance(message, dict) and message.get("jsonrpc") == "2.0" and "method" in message:
        return True, message.get("id")
    return False, None


def parse_json(body: bytes) -> Any:
    """The JSON value, or None when it is not JSON or nests too deeply."""
    try:
        return jsonbody.parse_json(body)
    except jsonbody.JSONBodyError:
        return None


def json_content(answer: Answer, request_body: bytes | None = None) -> tuple[int, bytes]:
    """The status and JSON body an agent (or the admin API) gets for `answer`."""
    is_rpc, request_id = jsonrpc_id(request_body)
    if answer.elicitation_url is not None and is_rpc and request_id is not None:
        elicitation = {
            "mode": "url",
            "elicitationId": f"connect-{answer.data.get('server', '')}-{secrets.token_hex(6)}",
            "url": answer.elicitation_url,
            "message": answer.text,
        }
        error = {
            "code": URL_ELICITATION_REQUIRED,
            "message": answer.text,
            "data": {"elicitations": [elicitation]},
        }
        # The answer to the request is the error: HTTP itself went fine.
        return 200, json.dumps({"jsonrpc": "2.0", "id": request_id, "error": error}).encode()
    if is_rpc:
        error = {
            "code": RPC_SERVER_ERROR,
            "message": answer.text,
            "data": {"error": answer.code, **answer.data},
        }
        payload: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "error": error}
    else:
        payload = {"error": answer.code, "message": answer.text, **answer.data}
    return answer.status, json.dumps(payload).encode()


def _json_headers(answer: Answer, length: int) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", b"application/json"),
        (b"content-length", str(length).encode()),
        (b"cache-control", b"no-store"),
        *((k.encode(), v.encode()) for k, v in answer.headers),
    ]


async def send_answer(send: Send, answer: Answer, request_body: bytes | None = None) -> tuple[int, int]:
    """Send `answer` on a raw ASGI channel; return (status, bytes sent)."""
    status, content = json_content(answer, request_body)
    await send(
        {"type": "http.response.start", "status": status, "headers": _json_headers(answer, len(content))}
    )
    await send({"type": "http.response.body", "body": content})
    return status, len(content)


def json_response(answer: Answer) -> Response:
    status, content = json_content(answer)
    response = Response(content, status_code=status)
    response.raw_headers = _json_headers(answer, len(content))
    return response


def page_response(answer: Answer) -> HTMLResponse:
    response = pages.problem(
        answer.title or "Something went wrong", answer.message, answer.next_step or "", answer.status,
        answer.action,
    )  # fmt: skip
    for name, value in answer.headers:
        response.headers[name] = value
    return response


def page_endpoint(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """A browser page's handler, its errors answered with a page."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except KeybearerError as exc:
            return page_response(exc.answer())

    return endpoint
