"""Debian's Chromium, headless and offline, as the browser tests and ``bench/ui_paint.py`` run it."""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # playwright is a dev extra: importing this module does not need it
    from playwright.sync_api import Browser, Playwright

CHROMIUM = os.environ.get("KVM_MEMATTR_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def launch(p: Playwright) -> Browser:
    """Chromium, headless, with ``ARGS``."""
    return p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
