"""The playground in a real headless Chromium (Debian's, installed by `make browser-setup`), driven by
Playwright against the loopback test servers of tests/api/conftest.py (re-exported here).

`browser` is one Chromium for the whole session; `page` is a fresh browser context (own localStorage) and tab
per test, whose screenshot lands in test-output/web/<test>.png for review and whose uncaught script errors
fail the test. `lora_server` (tests/api/test_loras.py's) serves the adapters of the `lora_dir` fixture that a
test module defines.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from tests.api.conftest import server, server_pipeline, start_server  # noqa: F401  (fixtures)
from tests.api.test_loras import lora_pipeline, lora_server  # noqa: F401  (fixtures)

CHROMIUM = Path("/usr/bin/chromium")
# Without the networking flags Chromium reaches out to Google's hosts at start and hangs on a closed network;
# --no-sandbox because the tests run as root.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
OUTPUT_DIR = Path(__file__).resolve().parents[2] / "test-output" / "web"
DESKTOP = {"width": 1280, "height": 900}
TIMEOUT_MS = 30_000  # generous: the machine running the tests may be busy

expect.set_options(timeout=TIMEOUT_MS)


def snapshot(page: Page, name: str) -> Path:
    """A full-page screenshot at test-output/web/<name>.png (besides the one every test gets at its end)."""
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUTPUT_DIR / (re.sub(r"[^\w.-]+", "_", name) + ".png")
    page.screenshot(path=path, full_page=True)
    return path


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make browser-setup` (Debian's chromium package)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def open_page(browser: Browser, request: pytest.FixtureRequest, **context_options: object) -> Iterator[Page]:
    """A new context and tab; on teardown a full-page screenshot, then fail on uncaught script errors."""
    context = browser.new_context(**{"viewport": DESKTOP, **context_options})  # type: ignore[arg-type]
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))

    def on_console(message: ConsoleMessage) -> None:
        # Failed requests are logged by the browser itself; the tests check what the page shows for them.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            errors.append(f"console: {message.text}")

    page.on("console", on_console)
    try:
        yield page
    finally:
        snapshot(page, request.node.name)
        context.close()
    assert not errors, errors


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    yield from open_page(browser, request)
