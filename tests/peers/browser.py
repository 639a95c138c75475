"""Test helpers: a real browser (Debian's Chromium driven by Playwright) for OAuth flows.

Playwright's own browser download is not used (``playwright install`` cannot download here and
is not needed): the Python ``playwright`` package drives ``/usr/bin/chromium`` (``apt-get install
chromium``, done by ``tests/system-deps.sh``)::

    from peers.browser import launch_browser, new_page, browser_page, complete_login_and_consent

    async with launch_browser() as browser:           # one Chromium (session-scoped fixture)
        async with new_page(browser) as page:         # a fresh context: no cookies, own session
            await page.goto(authorize_url)
            final_url = await complete_login_and_consent(page, "alice")

    async with browser_page() as page: ...            # both at once, for a one-off

Every request to a non-loopback address is aborted (the machine has no network and tests must
never leave it), so pages that ``@import`` web fonts (oidc-provider's do) load at once.

``complete_login_and_consent(page, username)`` drives oidc-provider's devInteractions pages
(login: any login + any password, the login becomes ``sub``; consent: one "Continue" button)
until the browser leaves them, and returns the URL it ended on (e.g. the client's
``redirect_uri?code=...&state=...&iss=...``, or what the proxy's callback redirected to). A page
that is already past login (the AS session cookie of that context) or consent (a grant exists)
is handled too. ``consent=False`` presses "Cancel" on the consent page instead, which sends
``error=access_denied`` to the redirect URI.

``callback_server()`` (sync context manager) serves a redirect URI on a free loopback port and
records what arrives, for tests that play the OAuth client themselves (Playwright's routing
cannot stand in for it: it does not see the end of a redirect chain). Note that Chromium refuses
some ports outright (``ERR_UNSAFE_PORT``: 1, 7, 9, ..., 6000, 6665-6669, ...): use free ports.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from playwright.async_api import Browser, BrowserContext, Page, Route, async_playwright

CHROMIUM = os.environ.get("KEYBEARER_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
# Anything but loopback is aborted.
NOT_LOOPBACK = re.compile(
    r"^(?!(?:https?|wss?)://(?:127\.\d+\.\d+\.\d+|localhost|\[::1\])(?::\d+)?(?:[/?#]|$))"
)
DEFAULT_TIMEOUT_MS = 15_000

LOGIN_FORM = 'form:has(input[name="prompt"][value="login"])'
CONSENT_FORM = 'form:has(input[name="prompt"][value="consent"])'


def chromium_available() -> bool:
    return Path(CHROMIUM).exists()


@contextlib.asynccontextmanager
async def launch_browser(*, headless: bool = True) -> AsyncIterator[Browser]:
    """One headless Chromium for as many pages as needed; closed on exit."""
    if not chromium_available():
        raise RuntimeError(f"{CHROMIUM} is missing: run tests/system-deps.sh (apt-get install chromium)")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=headless)
        try:
            yield browser
        finally:
            await browser.close()


async def _abort(route: Route) -> None:
    await route.abort("internetdisconnected")


@contextlib.asynccontextmanager
async def new_context(browser: Browser, **kw: Any) -> AsyncIterator[BrowserContext]:
    """A fresh browser context (its own cookies), with non-loopback requests aborted."""
    context = await browser.new_context(**kw)
    context.set_default_timeout(DEFAULT_TIMEOUT_MS)
    await context.route(NOT_LOOPBACK, _abort)
    try:
        yield context
    finally:
        await context.close()


@contextlib.asynccontextmanager
async def new_page(browser: Browser, **kw: Any) -> AsyncIterator[Page]:
    """A page in a fresh context (see ``new_context``)."""
    async with new_context(browser, **kw) as context:
        yield await context.new_page()


@contextlib.asynccontextmanager
async def browser_page(**kw: Any) -> AsyncIterator[Page]:
    """Launch Chromium and yield one page; everything is closed on exit."""
    async with launch_browser() as browser, new_page(browser, **kw) as page:
        yield page


@dataclass
class CallbackServer:
    """A loopback HTTP server standing in for an OAuth client's redirect URI."""

    port: int
    path: str
    requests: list[str] = field(default_factory=list)  # request targets (path + query) received

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def last_query(self) -> dict[str, str]:
        """The query parameters of the last request (``code``, ``state``, ``iss`` or ``error``)."""
        if not self.requests:
            raise AssertionError("the redirect URI was never called")
        return {k: v[-1] for k, v in parse_qs(urlsplit(self.requests[-1]).query).items()}


@contextlib.contextmanager
def callback_server(path: str = "/callback") -> Iterator[CallbackServer]:
    """Serve ``http://127.0.0.1:<free port><path>``: every GET is recorded and answered 200.

    For tests that play the OAuth client themselves (Playwright's routing cannot intercept the
    end of a redirect chain, so the browser needs something real to land on).
    """
    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            body = b"<!doctype html><title>callback</title><p>redirect received</p>"
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield CallbackServer(httpd.server_address[1], path, requests)
    finally:
        httpd.shutdown()
        httpd.server_close()


async def _which_form(page: Page) -> str | None:
    if await page.locator(LOGIN_FORM).count():
        return "login"
    if await page.locator(CONSENT_FORM).count():
        return "consent"
    return None


async def complete_login_and_consent(
    page: Page,
    username: str,
    *,
    password: str = "any-password",
    consent: bool = True,
    max_steps: int = 6,
) -> str:
    """Drive oidc-provider's devInteractions login and consent pages; return the final URL.

    Call it once the page has navigated to the authorization endpoint (or to whatever leads
    there). Each form submission is awaited as one navigation (redirect chains included).
    """
    await page.wait_for_load_state("domcontentloaded")
    for _ in range(max_steps):
        form = await _which_form(page)
        if form is None:
            return page.url
        if form == "login":
            await page.fill(f'{LOGIN_FORM} input[name="login"]', username)
            await page.fill(f'{LOGIN_FORM} input[name="password"]', password)
            async with page.expect_navigation(wait_until="domcontentloaded"):
                await page.click(f'{LOGIN_FORM} button[type="submit"]')
        elif consent:
            async with page.expect_navigation(wait_until="domcontentloaded"):
                await page.click(f'{CONSENT_FORM} button[type="submit"]')
        else:
            async with page.expect_navigation(wait_until="domcontentloaded"):
                await page.click('a[href*="/abort"]')
    raise RuntimeError(f"still on the authorization server's pages after {max_steps} steps: {page.url}")


__all__ = [
    "CHROMIUM",
    "CHROMIUM_ARGS",
    "CallbackServer",
    "browser_page",
    "callback_server",
    "chromium_available",
    "complete_login_and_consent",
    "launch_browser",
    "new_context",
    "new_page",
]
