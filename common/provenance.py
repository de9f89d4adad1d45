"""Which code ran: a SHA-256 over fedfuse's own source files, for run directories and model
cards."""

from __future__ import annotations

import hashlib
from pathlib import Path

_APP_FOLDERS = ("fedfuse", "common", "client", "server", "simulations")


def code_digest(base: Path | None = None) -> str:
    """SHA-256 over every ``.py`` file of fedfuse (relative path and bytes, sorted).

    ``base`` is the folder holding ``common/``: the repository root in a source tree, the
    installed ``fedfuse`` package in a wheel (whose command-line modules sit directly in it).
    """
    base = base or Path(__file__).resolve().parents[1]
    files: set[tuple[str, Path]] = set()
    for sub in _APP_FOLDERS:
        if (base / sub).is_dir():
            files |= {(p.relative_to(base).as_posix(), p) for p in (base / sub).rglob("*.py")}
    if not (base / "fedfuse").is_dir():  # a wheel: the command line is base/*.py
        files |= {(p.name, p) for p in base.glob("*.py")}
    h = hashlib.sha256()
    for rel, p in sorted(files):
        h.update(rel.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()
