"""The admin API (proxy/admin.py) described in OpenAPI 3.1, served at GET /admin/openapi.json.

Kept beside the code it describes and checked against the running API by
tests/test_admin_openapi.py: every generated request must get an answer this
document allows, and a refused one must change nothing.
"""

from __future__ import annotations

from typing import Any

from proxy.settings import (
    ASSERTION_AUDIENCES,
    AUTH_TYPES,
    GRANTS,
    HEADER_NAME_PATTERN,
    ID_PATTERN,
    SERVER_ID_PATTERN,
)

JSON = "application/json"
Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def strings(**extra: Any) -> Schema:
    return {"type": "array", "items": {"type": "string", **extra}}


# The keys of a server definition, as written in YAML or sent to the admin API.
# api_key_env, api_key_file, client_secret_env and client_secret_file are the
# config file's only: they appear in answers, never in requests.
DEFINITION: dict[str, Schema] = {
    "url": {"type": "string", "maxLength": 2048, "description": "absolute http(s) URL of the MCP endpoint"},
    "auth": {"enum": list(AUTH_TYPES), "default": "none"},
    "api_key_header": {
        "type": "string",
        "pattern": f"^{HEADER_NAME_PATTERN.pattern}$",
        "description": "auth: api_key; not Host, Content-Length, Transfer-Encoding, Cookie, Expect, "
        "Proxy-* or a hop-by-hop header",
        "default": "Authorization",
    },
    "api_key_scheme": {
        "anyOf": [{"type": "string", "pattern": "^[A-Za-z0-9._-]{0,32}$"}, {"type": "null"}],
        "description": "auth: api_key; the word before the key; empty or null sends the bare key",
        "default": "Bearer",
    },
    "paths": {**strings(pattern="^/"), "description": "more upstream paths on the server's origin"},
    "grant": {
        "enum": list(GRANTS),
        "default": "authorization_code",
        "description": "auth: oauth; authorization_code: each person connects in the browser; "
        "client_credentials: one token for the server, as the proxy's client (needs client_id); "
        "identity_assertion: each person's token as the organisation's identity provider allows "
        "(needs client_id and the login_* settings)",
    },
    "client_id": {"type": "string", "description": "auth: oauth; a static client id"},
    "scopes": {
        "anyOf": [strings(), {"type": "string"}],
        "description": "auth: oauth; a list or a space-separated string",
    },
    "resource": {"type": "boolean", "default": True, "description": "send the RFC 8707 resource parameter"},
    "authorization_params": {"type": "object", "additionalProperties": {"type": "string"}},
}
OPERATOR_ONLY: dict[str, Schema] = {
    **{name: {"type": "string"} for name in ("api_key_env", "api_key_file", "client_secret_env",
                                              "client_secret_file", "client_private_key_file", "client_key_id")},
    "client_assertion_audience": {"enum": list(ASSERTION_AUDIENCES)},
}  # fmt: skip

SCHEMAS: dict[str, Schema] = {
    "Error": {
        "type": "object",
        "properties": {
            "error": {"type": "string", "description": "a stable code, e.g. invalid_request, not_found"},
            "message": {"type": "string", "description": "what happened and what to do"},
        },
        "required": ["error", "message"],
        "additionalProperties": False,
    },
    "NewServer": {
        "type": "object",
        "properties": {"id": {"type": "string", "pattern": f"^{SERVER_ID_PATTERN.pattern}$"}, **DEFINITION},
        "required": ["id", "url"],
        "additionalProperties": False,
    },
    "ServerDefinition": {
        "type": "object",
        "properties": {"id": {"type": "string", "description": "if given, the id in the path"}, **DEFINITION},
        "required": ["url"],
        "additionalProperties": False,
    },
    "Server": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "source": {"enum": ["config", "store"], "description": "config-file servers are read-only"},
            "read_only": {"type": "boolean"},
            **DEFINITION,
            "scopes": strings(),
            "api_key_scheme": {"type": "string"},
            **OPERATOR_ONLY,
            "api_key": ref("ApiKeyInfo"),
            "managed_by": {
                "enum": ["organisation", "operator"],
                "description": "no person connects this server: its tokens are obtained as the organisation's "
                "identity provider allows (identity_assertion) or as the operator's client (client_credentials)",
            },
        },
        "required": ["id", "source", "read_only", "url", "auth"],
        "additionalProperties": False,
    },
    "ServerList": {
        "type": "object",
        "properties": {"servers": {"type": "array", "items": ref("Server")}},
        "required": ["servers"],
        "additionalProperties": False,
    },
    "ApiKey": {
        "type": "object",
        "properties": {"api_key": {"type": "string", "minLength": 1, "maxLength": 4096}},
        "required": ["api_key"],
        "additionalProperties": False,
    },
    "ApiKeyInfo": {
        "type": "object",
        "description": "never the key itself; last4 only for keys of 12 characters or more",
        "properties": {
            "set": {"type": "boolean"},
            "source": nullable({"enum": ["stored", "env", "file"]}),
            "last4": nullable({"type": "string"}),
            "length": nullable({"type": "integer"}),
        },
        "required": ["set"],
        "additionalProperties": False,
    },
    "OAuthClientRequest": {
        "type": "object",
        "properties": {
            "client_id": {"type": "string", "minLength": 1, "maxLength": 512},
            "client_secret": nullable({"type": "string", "minLength": 1, "maxLength": 4096}),
            "auth_method": nullable({"enum": ["client_secret_basic", "client_secret_post", "none"]}),
        },
        "required": ["client_id"],
        "additionalProperties": False,
    },
    "OAuthClient": {
        "type": "object",
        "description": "never the secret",
        "properties": {
            "server": {"type": "string"},
            "set": {"type": "boolean"},
            "client_id": {"type": "string"},
            "auth_method": {"enum": ["client_secret_basic", "client_secret_post", "none"]},
            "client_secret_set": {"type": "boolean"},
        },
        "required": ["server", "set"],
        "additionalProperties": False,
    },
    "Connection": {
        "type": "object",
        "properties": {
            "user": {"type": "string"},
            "server": {"type": "string"},
            "state": {
                "enum": ["connected", "must_reconnect", "refused", "not_allowed", "sign_in_required"],
                "description": "refused: the server's authorization server refused the proxy's grant (the "
                "operator's to fix); not_allowed: the organisation's identity provider refused this person this "
                "server (identity_assertion), asked again after token_endpoint_cooldown; sign_in_required: the "
                "token ran out and the person has no current sign-in. For these three, obtained_at is when",
            },
            "issuer": nullable({"type": "string"}),
            "scopes": strings(),
            "expires_at": nullable({"type": "number"}),
            "obtained_at": {"type": "number"},
            "last_error": nullable({"type": "string"}),
            # False when the authorization server issued no refresh token: reconnect at expiry.
            "refreshable": {"type": "boolean"},
        },
        "required": [
            "user",
            "server",
            "state",
            "issuer",
            "scopes",
            "expires_at",
            "obtained_at",
            "last_error",
            "refreshable",
        ],
        "additionalProperties": False,
    },
    "ConnectionList": {
        "type": "object",
        "properties": {
            "server": {"type": "string"},
            "connections": {"type": "array", "items": ref("Connection")},
        },
        "required": ["server", "connections"],
        "additionalProperties": False,
    },
    "ResetResult": {
        "type": "object",
        "properties": {
            "server": {"type": "string"},
            "deleted": {
                "type": "object",
                "properties": {
                    k: {"type": "integer"} for k in ("connections", "registrations", "cache_entries")
                },
                "required": ["connections", "registrations", "cache_entries"],
                "additionalProperties": False,
            },
        },
        "required": ["server", "deleted"],
        "additionalProperties": False,
    },
    "TokenRequest": {
        "type": "object",
        "properties": {
            "users": strings(pattern=f"^{ID_PATTERN.pattern}$") | {"minItems": 1},
            "label": nullable({"type": "string", "maxLength": 200}),
        },
        "required": ["users"],
        "additionalProperties": False,
    },
    "Token": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "users": strings(),
            "label": {"type": "string"},
            "created": {"type": "number"},
        },
        "required": ["id", "users", "label", "created"],
        "additionalProperties": False,
    },
    "NewToken": {
        "type": "object",
        "description": "the only answer that ever shows the token",
        "properties": {
            "token": {"type": "string", "pattern": "^kbp_"},
            "id": {"type": "string"},
            "users": strings(),
            "label": {"type": "string"},
            "created": {"type": "number"},
        },
        "required": ["token", "id", "users", "label", "created"],
        "additionalProperties": False,
    },
    "LinkRequest": {
        "oneOf": [
            {
                "type": "object",
                "description": "a person's links",
                "properties": {
                    "user": {"type": "string", "pattern": f"^{ID_PATTERN.pattern}$"},
                    "server": {"type": "string", "description": "an oauth server: also a connect link"},
                },
                "required": ["user"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "description": "an operator console link",
                "properties": {"console": {"const": True}},
                "required": ["console"],
                "additionalProperties": False,
            },
        ]
    },
    "Links": {
        "type": "object",
        "description": "signed links, valid until expires_at (with sign-in on, connections_url is the home page)",
        "properties": {
            "user": {"type": "string"},
            "server": {"type": "string"},
            "connections_url": {"type": "string"},
            "connect_url": {"type": "string"},
            "console_url": {"type": "string"},
            "expires_at": {"type": "integer"},
        },
        "required": ["expires_at"],
        "additionalProperties": False,
    },
    "TokenList": {
        "type": "object",
        "properties": {"tokens": {"type": "array", "items": ref("Token")}},
        "required": ["tokens"],
        "additionalProperties": False,
    },
}

ERRORS = {
    "400": "invalid_request: the body, a field or an id in the path is wrong; the message names it",
    "401": "unauthorized: no admin token was sent",
    "403": "forbidden: the admin token is wrong",
    "404": "not_found: no such server, key, client, connection or token (admin_disabled: the API is off)",
    "409": "conflict: the server is in the config file (read-only), or exists already",
    "413": "body_too_large: request bodies are limited to 64 KiB",
    "503": "store_unavailable: a store cannot be reached; nothing was changed, retry later",
}


def error(status: str) -> Schema:
    response: Schema = {"description": ERRORS[status], "content": {JSON: {"schema": ref("Error")}}}
    if status == "401":
        response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    if status == "503":
        response["headers"] = {"Retry-After": {"schema": {"type": "string"}}}
    return response


def answer(description: str, schema: str | None = None) -> Schema:
    if schema is None:
        return {"description": description}
    return {"description": description, "content": {JSON: {"schema": ref(schema)}}}


def body(schema: str) -> Schema:
    return {"required": True, "content": {JSON: {"schema": ref(schema)}}}


def param(name: str, pattern: str) -> Schema:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": f"^{pattern}$"},
    }


SERVER = param("server", ID_PATTERN.pattern)
USER = param("user", ID_PATTERN.pattern)
TOKEN = param("token", "[A-Za-z0-9]{1,32}")


def operation(
    summary: str,
    ok: dict[str, Schema],
    errors: str,
    *,
    params: tuple[Schema, ...] = (),
    request: str | None = None,
) -> Schema:
    """One operation; `errors` lists the error statuses it can answer besides 401 and 403."""
    responses = {**ok, **{s: error(s) for s in ("401", "403", *errors.split())}}
    out: Schema = {"summary": summary, "responses": dict(sorted(responses.items()))}
    if params:
        out["parameters"] = list(params)
    if request is not None:
        out["requestBody"] = body(request)
    return out


PATHS: dict[str, Schema] = {
    "/admin/servers": {
        "get": operation("every server, from the config file and the store", {"200": answer("the servers", "ServerList")}, ""),
        "post": operation(
            "add a server (not naming environment variables or files; its host must resolve to an allowed address)",
            {"201": answer("created", "Server")}, "400 409 413 503", request="NewServer",
        ),
    },
    "/admin/servers/{server}": {
        "get": operation("one server", {"200": answer("the server", "Server")}, "400 404", params=(SERVER,)),
        "put": operation(
            "replace a stored server's definition; a new url or auth drops every user's tokens for it",
            {"200": answer("updated", "Server")}, "400 404 409 413 503", params=(SERVER,), request="ServerDefinition",
        ),
        "delete": operation(
            "delete a stored server, its secrets and every user's tokens for it",
            {"204": answer("deleted")}, "400 404 409 503", params=(SERVER,),
        ),
    },
    "/admin/servers/{server}/api-key": {
        "get": operation("whether an API key is set (never the key)", {"200": answer("the key's state", "ApiKeyInfo")},
                         "400 404", params=(SERVER,)),
        "put": operation("store the server's API key (auth: api_key), encrypted", {"204": answer("stored")},
                         "400 404 413 503", params=(SERVER,), request="ApiKey"),
        "delete": operation("delete the stored API key", {"204": answer("deleted")}, "400 404 503", params=(SERVER,)),
    },
    "/admin/servers/{server}/oauth-client": {
        "get": operation("the static OAuth client (never its secret)", {"200": answer("the client", "OAuthClient")},
                         "400 404 409 503", params=(SERVER,)),
        "put": operation(
            "store a static OAuth client (auth: oauth); earlier dynamic registrations are dropped",
            {"200": answer("stored", "OAuthClient")}, "400 404 413 503", params=(SERVER,), request="OAuthClientRequest",
        ),
        "delete": operation("delete the static OAuth client", {"204": answer("deleted")}, "400 404 503", params=(SERVER,)),
    },
    "/admin/servers/{server}/connections": {
        "get": operation("users' connections, with state and expiry (never tokens)",
                         {"200": answer("the connections", "ConnectionList")}, "400 404 503", params=(SERVER,)),
    },
    "/admin/servers/{server}/connections/{user}": {
        "delete": operation("delete one user's connection", {"204": answer("deleted")}, "400 404 503",
                            params=(SERVER, USER)),
    },
    "/admin/servers/{server}/reset": {
        "post": operation("wipe the server's OAuth state: tokens, registrations, cached metadata",
                          {"200": answer("what was deleted", "ResetResult")}, "400 404 503", params=(SERVER,)),
    },
    "/admin/tokens": {
        "get": operation("caller tokens (never the tokens themselves)", {"200": answer("the tokens", "TokenList")}, ""),
        "post": operation("a new caller token for inbound_auth: tokens, shown this once",
                          {"201": answer("created", "NewToken")}, "400 413 503", request="TokenRequest"),
    },
    "/admin/tokens/{token}": {
        "delete": operation("revoke a caller token", {"204": answer("revoked")}, "400 404 503", params=(TOKEN,)),
    },
    "/admin/links": {
        "post": operation(
            "a person's connections link and, with an oauth server, a connect link; or an operator console link "
            "(10 minutes)",
            {"200": answer("the links", "Links")}, "400 404 413", request="LinkRequest",
        ),
    },
}  # fmt: skip

DOCUMENT: Schema = {
    "openapi": "3.1.0",
    "info": {
        "title": "Keybearer admin API",
        "version": "1",
        "description": "Off (404 admin_disabled everywhere) unless an admin token is set. Every error is "
        '{"error": code, "message": text}; a refused request changes nothing. Paths under /admin/ '
        "not listed here answer 404 not_found.",
    },
    "security": [{"adminToken": []}],
    "paths": {
        **PATHS,
        "/admin/openapi.json": {
            "get": {
                "summary": "this document (no token needed: it holds no secret)",
                "security": [],
                "responses": {
                    "200": {"description": "OpenAPI 3.1", "content": {JSON: {"schema": {"type": "object"}}}}
                },
            }
        },
    },
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}},
    },
}
