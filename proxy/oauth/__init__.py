"""The OAuth protocol, as the MCP authorization spec (2025-11-25) asks of a
client. Protocol only: no stores, no pages, no settings (the application that
uses it is proxy/connect/).

- `fetch`: `Fetcher`, the one HTTP client for everything discovery hands the
  proxy and for the JWKS of inbound JWTs; checks every URL and every address
  it connects to, follows no redirects, caps size and time.
- `discovery`: the 401 challenge, protected resource metadata (RFC 9728),
  authorization server metadata (RFC 8414 / OpenID), the canonical server URI.
- `client`: PKCE, the authorization URL, client registration (static, Client
  ID Metadata Document, RFC 7591), token exchange, refresh, revocation.
"""
