"""Copies of the shared fixture's site folders for tests that change them."""

from __future__ import annotations

import shutil
from pathlib import Path


def copy_site(src: Path, dest: Path) -> Path:
    """``src`` copied to ``dest`` without its site state (``.fedfuse``: ledger, budget, DP
    secret). Every simulation on the session's shared fixture writes that state into the
    fixture's folders, so a plain copy would start from whatever tests ran before."""
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".fedfuse"))
    return dest
