"""Headless Chromium (Debian's chromium driven by playwright) for view and app tests."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class Opened:
    """A page with everything it logged, requested and tried to pop up."""

    page: Any
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def external_requests(self, allowed_prefixes: tuple[str, ...] = ()) -> list[str]:
        local = ("data:", "about:", "blob:", *allowed_prefixes)
        return [url for url in self.requests if not url.startswith(local)]

    def assert_clean(self, allowed_prefixes: tuple[str, ...] = ()) -> None:
        assert self.errors == [], f"console errors: {self.errors}"
        assert self.dialogs == [], f"dialogs opened (script ran): {self.dialogs}"
        assert self.external_requests(allowed_prefixes) == [], f"network requests: {self.requests}"


def watch(page: Any) -> Opened:
    opened = Opened(page)
    page.on("console", lambda m: opened.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: opened.errors.append(str(e)))
    page.on("request", lambda r: opened.requests.append(r.url))

    def on_dialog(dialog: Any) -> None:
        opened.dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    return opened


def open_html(browser: Any, html: str) -> Opened:
    """Load a standalone HTML page into a new tab and wait until it has drawn."""
    page = browser.new_page()
    opened = watch(page)
    page.set_content(html, wait_until="load")
    return opened


@pytest.fixture(scope="session")
def browser() -> Any:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()
