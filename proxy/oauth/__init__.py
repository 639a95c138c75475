"""The OAuth protocol side of the proxy, as the MCP authorization spec
(2025-11-25) asks of a client. Pure protocol: no stores, no pages.

- `fetch`: `Fetcher`, the HTTP client for everything discovery hands the proxy;
  checks every URL and every address it connects to, follows no redirects,
  caps size and time.
- `discovery`: the 401 challenge, protected resource metadata (RFC 9728),
  authorization server metadata (RFC 8414 / OpenID), the canonical server URI.
- `client`: PKCE, the authorization URL, client registration (static, Client
  ID Metadata Document, RFC 7591), token exchange, refresh, revocation.
"""

from .client import (
    AuthServerUnavailable,
    ClientRegistration,
    OAuthClientError,
    OAuthError,
    TokenResponse,
    authorization_url,
    check_callback_issuer,
    choose_auth_method,
    cimd_registration,
    client_metadata_document,
    exchange_code,
    pkce_pair,
    refresh,
    register_client,
    revoke,
    static_registration,
)
from .discovery import (
    AuthServer,
    Challenge,
    Discovery,
    DiscoveryError,
    canonical_resource,
    discover,
    fetch_auth_server,
    parse_www_authenticate,
    probe_challenge,
)
from .fetch import Fetcher, FetchError, UnsafeURL

__all__ = [
    "AuthServer",
    "AuthServerUnavailable",
    "Challenge",
    "ClientRegistration",
    "Discovery",
    "DiscoveryError",
    "FetchError",
    "Fetcher",
    "OAuthClientError",
    "OAuthError",
    "TokenResponse",
    "UnsafeURL",
    "authorization_url",
    "canonical_resource",
    "check_callback_issuer",
    "choose_auth_method",
    "cimd_registration",
    "client_metadata_document",
    "discover",
    "exchange_code",
    "fetch_auth_server",
    "parse_www_authenticate",
    "pkce_pair",
    "probe_challenge",
    "refresh",
    "register_client",
    "revoke",
    "static_registration",
]
