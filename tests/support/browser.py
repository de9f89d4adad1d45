"""A headless chromium for tests that load a page in a real browser."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
)


def chromium() -> tuple[str | None, str]:
    """(path to chromium, "") or (None, why not). Installs Debian's chromium when missing and
    this is a root shell with apt-get (as .ci/run does)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found, ""
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return None, "chromium is not installed and cannot be (no apt-get or not root)"
    res = subprocess.run(
        ["apt-get", "install", "-y", "-qq", "chromium"], capture_output=True, text=True, timeout=900
    )
    found = shutil.which("chromium")
    if found:
        return found, ""
    return None, f"chromium could not be installed: {res.stderr.strip()[-300:]}"


def load(
    exe: str, page: Path, tmp: Path, *, screenshot: Path, size: str = "1100,3200"
) -> tuple[str, str]:
    """Load ``page`` headless: (the DOM after load, chromium's stderr with console messages).
    Also saves a screenshot."""
    base = [
        exe,
        *FLAGS,
        f"--user-data-dir={tmp / 'chrome-profile'}",
        "--enable-logging=stderr",
        "--v=0",
        f"--window-size={size}",
    ]
    url = page.resolve().as_uri()
    dom = subprocess.run(
        [*base, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
    )
    shot = subprocess.run(
        [*base, f"--screenshot={screenshot}", url],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return dom.stdout, dom.stderr + shot.stderr
