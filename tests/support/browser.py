"""Headless Debian chromium driven by Playwright (tests and scripts/screenshot.py).

Playwright's own browser download cannot work on these machines: its Python package
drives /usr/bin/chromium (Debian's, installed by scripts/install.sh) instead."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def browser_problem() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (Debian package chromium; make install)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing (make install)"
    return None


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A Browser; the caller opens contexts and pages."""
    from playwright.sync_api import sync_playwright

    env_home = os.environ.get("HOME")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                    env={**os.environ, "HOME": env_home or "/tmp"})
        try:
            yield browser
        finally:
            browser.close()
