"""Every HTML page the proxy shows a person, in one place.

Pages are small, self-contained (no scripts, no external assets) and escape
everything they interpolate. Each says what happened and what to do next.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape

from starlette.responses import HTMLResponse

# No scripts and no frames: the connect page holds a CSRF token and must not be
# embeddable by another site. No form-action: browsers apply it to the redirect
# that follows Continue, and that redirect goes to the authorization server.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:40rem;margin:3rem auto;padding:0 1rem;color:#1d1d1f}
h1{font-size:1.4rem} .muted{color:#666} .box{border:1px solid #ddd;border-radius:8px;padding:1rem;margin:1rem 0}
button{font-size:1rem;padding:.5rem 1.2rem;border-radius:6px;border:1px solid #2b5ccf;background:#2b5ccf;color:#fff;cursor:pointer}
button.secondary{background:#fff;color:#2b5ccf} table{border-collapse:collapse;width:100%}
td,th{text-align:left;padding:.4rem;border-bottom:1px solid #eee;vertical-align:top} code{background:#f4f4f4;padding:0 .2rem}
form.inline{display:inline} .error{color:#a40000}
"""


def page(title: str, body: str, status: int = 200) -> HTMLResponse:
    html = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)} · Keybearer</title><style>{_STYLE}</style></head>"
        f"<body>{body}</body></html>"
    )
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)


def connect(
    user: str, server: str, upstream_host: str, action: str, csrf: str, scopes: Sequence[str]
) -> HTMLResponse:
    scope_line = (
        f"<p>Permissions asked for: {', '.join(f'<code>{escape(s)}</code>' for s in scopes)}</p>"
        if scopes
        else ""
    )
    return page(
        f"Connect {server}",
        f"""<h1>Connect <strong>{escape(server)}</strong> for <strong>{escape(user)}</strong></h1>
<div class="box">
<p>Your agent wants to use the MCP server <strong>{escape(server)}</strong> at
<code>{escape(upstream_host)}</code> on behalf of the user id <strong>{escape(user)}</strong>.</p>
{scope_line}
<p>Continue to sign in at that service's provider and allow access. The tokens it gives are kept by
Keybearer, encrypted; your agent never sees them.</p>
<p class="muted">If you did not ask your agent for this, or <strong>{escape(user)}</strong> is not you,
close this page: whoever completes it connects <em>their</em> account to that user id.</p>
</div>
<form method="post" action="{escape(action)}">
<input type="hidden" name="csrf" value="{escape(csrf)}">
<button type="submit">Continue</button>
</form>""",
    )


def connected(user: str, server: str) -> HTMLResponse:
    return page(
        f"{server} connected",
        f"""<h1>Connected</h1>
<div class="box"><p><strong>{escape(server)}</strong> is now connected for <strong>{escape(user)}</strong>.</p>
<p>Go back to your agent and retry what it was doing; it will work now. You can close this page.</p></div>""",
    )


def problem(title: str, what: str, next_step: str, status: int = 400) -> HTMLResponse:
    return page(
        title,
        f"""<h1>{escape(title)}</h1>
<div class="box"><p class="error">{escape(what)}</p><p>{escape(next_step)}</p></div>""",
        status=status,
    )


@dataclass(frozen=True)
class ConnectionRow:
    server: str
    host: str
    state: str  # "connected", "expired", "must reconnect", "not connected"
    expires_at: float | None
    last_error: str | None
    connect_url: str
    disconnect_action: str | None
    refreshable: bool = True


def connections(user: str, rows: Sequence[ConnectionRow], csrf: str) -> HTMLResponse:
    body_rows = []
    for row in rows:
        expires = (
            datetime.fromtimestamp(row.expires_at, UTC).strftime("%Y-%m-%d %H:%M UTC")
            if row.expires_at
            else "—"
        )
        actions = [
            f'<a href="{escape(row.connect_url)}">{"Reconnect" if row.state != "not connected" else "Connect"}</a>'
        ]
        if row.disconnect_action:
            actions.append(
                f'<form class="inline" method="post" action="{escape(row.disconnect_action)}">'
                f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
                f'<button class="secondary" type="submit">Disconnect</button></form>'
            )
        # The provider gave no refresh token: the person will have to come back.
        no_refresh = (
            "<br><span class='muted'>expires without refresh; reconnect then</span>"
            if row.expires_at and not row.refreshable
            else ""
        )
        error = f'<br><span class="error">{escape(row.last_error)}</span>' if row.last_error else ""
        body_rows.append(
            f"<tr><td><strong>{escape(row.server)}</strong><br><span class='muted'>{escape(row.host)}</span></td>"
            f"<td>{escape(row.state)}{error}</td><td>{escape(expires)}{no_refresh}</td><td>{' '.join(actions)}</td></tr>"
        )
    table = "".join(body_rows) or "<tr><td colspan=4>No OAuth servers are configured.</td></tr>"
    return page(
        f"Connections of {user}",
        f"""<h1>Connections of <strong>{escape(user)}</strong></h1>
<table><tr><th>Server</th><th>State</th><th>Access token expires</th><th></th></tr>{table}</table>""",
    )
