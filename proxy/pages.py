"""Every HTML page the proxy shows a person, in one place.

Pages are small, self-contained (no scripts, no external assets) and escape
everything they interpolate. Each says what happened and what to do next, and
reads on a phone: tables turn into one card per row on narrow screens.
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
body{font-family:system-ui,sans-serif;max-width:44rem;margin:2rem auto;padding:0 1rem;color:#1d1d1f;line-height:1.45}
body.wide{max-width:64rem} h1{font-size:1.4rem} h2{font-size:1.1rem;margin-top:2rem}
.muted{color:#666} .box{border:1px solid #ddd;border-radius:8px;padding:1rem;margin:1rem 0}
.box>:first-child{margin-top:0} .box>:last-child{margin-bottom:0}
button,a.button{display:inline-block;font-size:1rem;padding:.5rem 1.2rem;border-radius:6px;border:1px solid #2b5ccf;
background:#2b5ccf;color:#fff;cursor:pointer;text-decoration:none;margin:.1rem 0}
button.secondary,a.secondary{background:#fff;color:#2b5ccf} button.danger{background:#a40000;border-color:#a40000}
table{border-collapse:collapse;width:100%} td,th{text-align:left;padding:.4rem;border-bottom:1px solid #eee;vertical-align:top}
code{background:#f4f4f4;padding:0 .2rem;overflow-wrap:anywhere} form.inline{display:inline}
.error{color:#a40000} .done{border-color:#2f8f46;background:#f2fbf4}
nav{display:flex;flex-wrap:wrap;gap:.4rem 1rem;align-items:center;justify-content:space-between;
border-bottom:1px solid #eee;padding-bottom:.6rem} nav .who{display:flex;flex-wrap:wrap;gap:.4rem .8rem;align-items:center}
label{display:block;margin:.6rem 0 .2rem} input,select{font-size:1rem;padding:.4rem;border:1px solid #bbb;border-radius:6px;
width:100%;max-width:24rem;box-sizing:border-box}
@media (max-width:600px){body{margin:1rem auto}
table.cards tr{display:block;border-bottom:1px solid #ddd;padding:.5rem 0} table.cards th{display:none}
table.cards td{display:block;border:0;padding:.15rem 0} table.cards td[data-label]::before{content:attr(data-label) ": ";color:#666}}
"""


@dataclass(frozen=True)
class Person:
    """Who is signed in, for the bar at the top of their pages."""

    name: str
    user: str | None  # None: an operator who came in through a console link
    logout_csrf: str
    admin: bool = False


def page(
    title: str, body: str, status: int = 200, *, person: Person | None = None, wide: bool = False
) -> HTMLResponse:
    html = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)} · Keybearer</title><style>{_STYLE}</style></head>"
        f"<body{' class=wide' if wide else ''}>{_nav(person)}{body}</body></html>"
    )
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)


def _nav(person: Person | None) -> str:
    if person is None:
        return ""
    who = escape(person.name) + (
        f" <span class=muted>({escape(person.user)})</span>"
        if person.user and person.user != person.name
        else ""
    )
    links = ['<a href="/">Your connections</a>'] if person.user else []
    if person.admin:
        links.append('<a href="/admin/console">Operator console</a>')
    return (
        f'<nav><strong>Keybearer</strong><span class="who"><span>Signed in as {who}</span>{"".join(links)}'
        f'<form class="inline" method="post" action="/logout"><input type="hidden" name="csrf" '
        f'value="{escape(person.logout_csrf)}"><button class="secondary" type="submit">Sign out</button></form>'
        "</span></nav>"
    )


def _button_link(label: str, url: str, *, secondary: bool = False) -> str:
    return f'<a class="button{" secondary" if secondary else ""}" href="{escape(url)}">{escape(label)}</a>'


def _when(timestamp: float | None) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M UTC") if timestamp else "—"


def connect(
    user: str, server: str, upstream_host: str, action: str, csrf: str, scopes: Sequence[str],
    person: Person | None = None,
) -> HTMLResponse:  # fmt: skip
    scope_line = (
        f"<p>Permissions asked for: {', '.join(f'<code>{escape(s)}</code>' for s in scopes)}</p>"
        if scopes
        else ""
    )
    warning = (
        ""
        if person is not None
        else f"""<p class="muted">If you did not ask your agent for this, or <strong>{escape(user)}</strong> is not you,
close this page: whoever completes it connects <em>their</em> account to that user id.</p>"""
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
{warning}
</div>
<form method="post" action="{escape(action)}">
<input type="hidden" name="csrf" value="{escape(csrf)}">
<button type="submit">Continue</button>
</form>""",
        person=person,
    )


def connected(user: str, server: str, connections_url: str, person: Person | None = None) -> HTMLResponse:
    return page(
        f"{server} connected",
        f"""<h1>Connected</h1>
<div class="box"><p><strong>{escape(server)}</strong> is now connected for <strong>{escape(user)}</strong>.</p>
<p>Go back to your agent and retry what it was doing; it will work now. You can close this page.</p></div>
<p>{_button_link("See your connections", connections_url, secondary=True)}</p>""",
        person=person,
    )


def problem(
    title: str, what: str, next_step: str, status: int = 400, action: tuple[str, str] | None = None
) -> HTMLResponse:
    button = f"<p>{_button_link(*action)}</p>" if action else ""
    return page(
        title,
        f"""<h1>{escape(title)}</h1>
<div class="box"><p class="error">{escape(what)}</p><p>{escape(next_step)}</p></div>{button}""",
        status=status,
    )


@dataclass(frozen=True)
class ConnectionRow:
    server: str
    host: str
    state: str  # "connected", "expired", "must reconnect", "not connected", or a managed server's state
    expires_at: float | None
    last_error: str | None
    connect_url: str | None  # None: nothing to connect (the organisation manages the server)
    disconnect_action: str | None
    refreshable: bool = True
    managed: bool = False  # by the organisation (grant: identity_assertion)
    since: float | None = None  # when a refusal was recorded
    sign_in_url: str | None = None  # the person must sign in again for it


def connections(
    user: str, rows: Sequence[ConnectionRow], csrf: str, person: Person | None = None
) -> HTMLResponse:
    body_rows = []
    for row in rows:
        actions = []
        if row.connect_url:
            actions.append(_button_link("Connect" if row.state == "not connected" else "Reconnect",
                                        row.connect_url, secondary=row.state == "connected"))  # fmt: skip
        if row.sign_in_url:
            actions.append(_button_link("Sign in again", row.sign_in_url))
        if row.disconnect_action:
            # A managed server's token is only forgotten: the next use obtains another.
            label = "Forget token" if row.managed else "Disconnect"
            actions.append(
                f'<form class="inline" method="post" action="{escape(row.disconnect_action)}">'
                f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
                f'<button class="secondary" type="submit">{label}</button></form>'
            )
        # The provider gave no refresh token: the person will have to come back.
        no_refresh = (
            "<br><span class='muted'>expires without refresh; reconnect then</span>"
            if row.expires_at and not row.refreshable and not row.managed
            else ""
        )
        managed = "<br><span class='muted'>managed by your organisation</span>" if row.managed else ""
        since = f" <span class='muted'>(since {escape(_when(row.since))})</span>" if row.since else ""
        error = f'<br><span class="error">{escape(row.last_error)}</span>' if row.last_error else ""
        body_rows.append(
            f"<tr><td><strong>{escape(row.server)}</strong><br><span class='muted'>{escape(row.host)}</span>"
            f"{managed}</td><td data-label='State'>{escape(row.state)}{since}{error}</td>"
            f"<td data-label='Access token expires'>{escape(_when(row.expires_at))}{no_refresh}</td>"
            f"<td>{' '.join(actions)}</td></tr>"
        )
    table = (
        "".join(body_rows) or "<tr><td colspan=4>No server here needs you to connect an account.</td></tr>"
    )
    mine = person is not None and person.user == user
    heading = "Your connections" if mine else f"Connections of <strong>{escape(user)}</strong>"
    intro = (
        f"<p class='muted'>Your agents reach these MCP servers through Keybearer as <strong>{escape(user)}</strong>. "
        "Connect one here, or open the link your agent shows when a server needs you."
        + (
            " Servers managed by your organisation need no connecting: Keybearer obtains your access when "
            "your agent uses them, as your organisation allows."
            if any(row.managed for row in rows)
            else ""
        )
        + "</p>"
    )
    return page(
        "Your connections" if mine else f"Connections of {user}",
        f"""<h1>{heading}</h1>{intro}
<table class="cards"><tr><th>Server</th><th>State</th><th>Access token expires</th><th></th></tr>{table}</table>""",
        person=person,
    )


def welcome(public_url: str) -> HTMLResponse:
    """`/` when nobody signs in here: how a person gets to their pages."""
    return page(
        "Keybearer",
        f"""<h1>Keybearer</h1>
<div class="box">
<p>Keybearer keeps the credentials your agents use for MCP servers; the agents never see them.</p>
<p><strong>To connect an account</strong>, open the link your agent shows when a server needs you. It starts
with <code>{escape(public_url)}/connect/</code>.</p>
<p><strong>To see and disconnect your connections</strong>, ask the proxy's operator for a link to your page:
they make one with <code>keybearer link YOUR-USER-ID</code>.</p>
</div>
<p class="muted">Operators: <code>keybearer link --admin</code> prints a link to the operator console. To let people
sign in with your organisation's identity provider instead of links, set the <code>login_*</code> settings.</p>""",
    )


def operator_only(person: Person) -> HTMLResponse:
    """`/` for an operator who came in through a console link: there is no user id to show."""
    return page(
        "Keybearer",
        """<h1>Keybearer</h1><div class="box"><p>You came in through an operator link: it opens the operator
console, and belongs to no user id.</p></div><p><a class="button" href="/admin/console">Operator console</a></p>""",
        person=person,
    )


def sign_out(csrf: str, person: Person) -> HTMLResponse:
    return page(
        "Sign out",
        f"""<h1>Sign out</h1><div class="box"><p>Sign out of Keybearer in this browser?</p></div>
<form method="post" action="/logout"><input type="hidden" name="csrf" value="{escape(csrf)}">
<button type="submit">Sign out</button></form>""",
        person=person,
    )


def signed_out(signs_in: bool) -> HTMLResponse:
    again = f"<p>{_button_link('Sign in again', '/login')}</p>" if signs_in else ""
    return page(
        "Signed out",
        f"""<h1>Signed out</h1><div class="box"><p>You are signed out of Keybearer in this browser.</p>
<p>Your connections stay as they are: your agents keep working. On a shared computer, also sign out of
your organisation's sign-in page.</p></div>{again}""",
    )


# -- the operator console ----------------------------------------------------------------


@dataclass(frozen=True)
class ConsoleServer:
    id: str
    auth: str
    host: str
    source: str
    connected: int  # users with a connection
    errors: tuple[str, ...]  # "user: last error", most recent first
    managed_by: str | None = None  # "organisation" (identity_assertion), "operator" (client_credentials)


def console(servers: Sequence[ConsoleServer], person: Person, done: str = "") -> HTMLResponse:
    rows = []
    for s in servers:
        errors = "<br>".join(f'<span class="error">{escape(e)}</span>' for e in s.errors) or "—"
        users = str(s.connected) if s.auth == "oauth" else "—"
        managed = f"<br><span class=muted>{escape(MANAGED[s.managed_by])}</span>" if s.managed_by else ""
        rows.append(
            f'<tr><td><a href="/admin/console/servers/{escape(s.id)}"><strong>{escape(s.id)}</strong></a>'
            f"<br><span class=muted>{escape(s.source)}</span></td><td data-label='Auth'>{escape(s.auth)}{managed}</td>"
            f"<td data-label='Host'><code>{escape(s.host)}</code></td><td data-label='Connected users'>{users}</td>"
            f"<td data-label='Recent errors'>{errors}</td></tr>"
        )
    table = "".join(rows) or "<tr><td colspan=5>No servers are configured.</td></tr>"
    return page(
        "Operator console",
        f"""<h1>Operator console</h1>{_done(done)}
<table class="cards"><tr><th>Server</th><th>Auth</th><th>Host</th><th>Connected users</th><th>Recent errors</th></tr>
{table}</table>""",
        person=person,
        wide=True,
    )


@dataclass(frozen=True)
class ConsoleConnection:
    user: str
    state: str
    expires_at: float | None
    last_error: str | None
    since: float | None = None  # when a refusal (or a sign-in needed) was recorded


# What the console says of a server no person connects, by who manages it.
MANAGED = {"organisation": "managed by the organisation", "operator": "one token, as the proxy's client"}
MANAGED_NOTE = {
    "organisation": "Managed by the organisation (grant identity_assertion): nobody connects it. Each person's "
    "token is obtained when their agent first uses it, by exchanging their sign-in at the organisation's "
    "identity provider, whose policy decides. Removing a connection or a reset only makes the next use "
    "obtain a new one. Setting or clearing the static client drops every token obtained with the old one.",
    "operator": "One token for every user (grant client_credentials), obtained as the proxy's own client. "
    "Setting or clearing the static client drops it.",
}


def console_server(
    server: ConsoleServer,
    url: str,
    connections_: Sequence[ConsoleConnection],
    api_key: str | None,  # how the key is set, never the key; None unless auth is api_key
    oauth_client: str | None,  # the static client, never its secret; None unless auth is oauth
    csrf: str,
    person: Person,
    done: str = "",
) -> HTMLResponse:
    base = f"/admin/console/servers/{server.id}"
    token = f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
    sections = [f"<p><code>{escape(url)}</code> · auth <strong>{escape(server.auth)}</strong> · from the "
                f"{escape(server.source)}</p>"]  # fmt: skip
    if server.managed_by:
        sections.append(f'<div class="box"><p>{escape(MANAGED_NOTE[server.managed_by])}</p></div>')
    nobody = (
        "No token has been obtained yet." if server.managed_by else "Nobody has connected this server yet."
    )
    must = "Each is obtained again on next use." if server.managed_by else "Every user must connect again."
    if server.auth == "oauth":
        rows = "".join(
            f"<tr><td><strong>{escape(c.user)}</strong></td><td data-label='State'>{escape(c.state)}"
            + (f" <span class=muted>(since {escape(_when(c.since))})</span>" if c.since else "")
            + (f'<br><span class="error">{escape(c.last_error)}</span>' if c.last_error else "")
            + f"</td><td data-label='Access token expires'>{escape(_when(c.expires_at))}</td><td>"
            f'<form class="inline" method="post" action="{escape(base)}/connections/{escape(c.user)}/delete">'
            f'{token}<button class="secondary" type="submit">Remove</button></form></td></tr>'
            for c in connections_
        )
        sections.append(
            f"""<h2>Connections</h2><table class="cards"><tr><th>User</th><th>State</th><th>Access token expires</th>
<th></th></tr>{rows or f"<tr><td colspan=4>{nobody}</td></tr>"}</table>
<h2>Reset</h2><div class="box"><p>Deletes every user's tokens for {escape(server.id)}, the proxy's client
registrations at its provider and the cached discovery. {must}</p>
<form method="post" action="{escape(base)}/reset">{token}<button class="danger" type="submit">Reset {escape(server.id)}</button></form></div>
<h2>Static OAuth client</h2><div class="box"><p>{escape(oauth_client or "none")}</p>
<form method="post" action="{escape(base)}/oauth-client">{token}
<label for="client_id">Client id</label><input id="client_id" name="client_id" autocomplete="off" required>
<label for="client_secret">Client secret (leave empty for a public client)</label>
<input id="client_secret" name="client_secret" type="password" autocomplete="new-password">
<p><button type="submit">Save client</button></p></form>
<form method="post" action="{escape(base)}/oauth-client/clear">{token}<button class="secondary" type="submit">Clear</button></form></div>"""
        )
    if server.auth == "api_key":
        sections.append(
            f"""<h2>API key</h2><div class="box"><p>{escape(api_key or "not set")}</p>
<form method="post" action="{escape(base)}/api-key">{token}
<label for="api_key">New API key (stored encrypted; never shown again)</label>
<input id="api_key" name="api_key" type="password" autocomplete="new-password" required>
<p><button type="submit">Save key</button></p></form>
<form method="post" action="{escape(base)}/api-key/clear">{token}<button class="secondary" type="submit">Clear the stored key</button></form></div>"""
        )
    return page(
        f"{server.id} · Operator console",
        f"""<p><a href="/admin/console">← Operator console</a></p><h1>{escape(server.id)}</h1>{_done(done)}
{"".join(sections)}""",
        person=person,
        wide=True,
    )


def _done(text: str) -> str:
    return f'<div class="box done"><p>{escape(text)}</p></div>' if text else ""
