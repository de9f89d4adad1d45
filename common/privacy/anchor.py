"""The site's authenticated ledger head: what its ledger held last, under an HMAC only it can make.

A hash chain in one unkeyed file cannot reveal a consistent rewrite: delete the last entry,
rewrite the ``head`` row, re-create the triggers, and the file verifies. So after every append
the site writes ``<data>/.fedfuse/ledger-head`` (JSON: the entry count, the last entry's hash
and the history of deliberate resets) with an HMAC-SHA256 under a key derived from the site's
secret (``common/privacy/site_secret.py``). The file is also the record that the site has
trained: a site folder whose head says it holds entries refuses to train without its ledger,
and ``fedfuse audit <site folder>`` reports a ledger that is missing, shorter than its head or
different from it. A deliberate reset (``fedfuse ledger reset``) keeps the old file, starts a
new ledger and records itself here and in the new ledger.

Limits: removing the ledger AND this file together is caught only by the coordinator's record
of the site's ledger heads (``privacy.json``; ``fedfuse audit <run dir>``); a synthetic site's
secret derives from a public seed, so its head authenticates nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedfuse.common.errors import FedfuseError
from fedfuse.common.privacy.ledger import GENESIS_HASH, Ledger, LedgerEntry, LedgerError
from fedfuse.common.privacy.site_secret import ledger_key, load_or_create_secret_file
from fedfuse.common.site_state import HEAD_NAME, LEDGER_NAME, SECRET_NAME

# Set in the ledger's meta table, to the head file's path, once a head was written: a head
# removed later is then noticed, and found when the ledger lives apart from the site folder.
HEAD_META = "authenticated-head"
_FORMAT = 1


@dataclass(frozen=True)
class LedgerReset:
    """One deliberate reset: when, why, and what the ledger held before."""

    time: str
    reason: str
    previous_count: int
    previous_hash: str
    kept_as: str


@dataclass(frozen=True)
class LedgerHead:
    """The authenticated head: ``count`` entries ending in ``hash``, after ``resets``."""

    count: int
    hash: str
    resets: tuple[LedgerReset, ...] = field(default_factory=tuple)

    @property
    def trained(self) -> bool:
        """Whether a ledger must exist: the site has trained, or reset one on purpose."""
        return self.count > 0 or bool(self.resets)

    def body(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "count": self.count,
            "hash": self.hash,
            "resets": [asdict(r) for r in self.resets],
        }


def anchor_path(site_dir: Path) -> Path:
    """The head file in a site's ``.fedfuse`` folder (the folder that holds its secret)."""
    return Path(site_dir) / HEAD_NAME


def _mac(key: bytes, body: dict[str, Any]) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def write_head(path: Path, head: LedgerHead, *, key: bytes) -> None:
    """Write ``head`` with its HMAC, atomically (a crash leaves the old head or the new one)."""
    body = head.body()
    text = json.dumps({**body, "mac": _mac(key, body)}, indent=1, sort_keys=True) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_head(path: Path, *, key: bytes | None) -> LedgerHead | None:
    """The head in ``path`` (None if there is none), its HMAC checked when ``key`` is given.

    Raises :class:`LedgerError` for a malformed file or a wrong HMAC.
    """
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        mac = str(raw.pop("mac"))
        head = LedgerHead(
            count=int(raw["count"]),
            hash=str(raw["hash"]),
            resets=tuple(LedgerReset(**r) for r in raw.get("resets", [])),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LedgerError(f"{path}: not a readable ledger head ({exc})") from None
    if key is not None and not hmac.compare_digest(mac, _mac(key, raw)):
        raise LedgerError(
            f"{path}: its HMAC does not match the site's secret (the head was rewritten, or the "
            "secret replaced)"
        )
    return head


def head_problems(head: LedgerHead | None, entries: Sequence[LedgerEntry]) -> list[str]:
    """How ``entries`` (a ledger, in chain order) disagree with the authenticated ``head``.

    The ledger may run ahead of the head (a crash between the append and the head's write
    loses no spend); it may not fall behind it or hold another entry at the head's position.
    """
    if head is None:
        return []
    if head.count > len(entries):
        return [
            f"the authenticated ledger head records {head.count} entries ending in "
            f"{head.hash[:12]}..., but the ledger holds {len(entries)} (entries were removed "
            "from the end)"
        ]
    at = entries[head.count - 1].hash if head.count else GENESIS_HASH
    if at != head.hash:
        return [
            f"entry #{head.count}: its hash {at[:12]}... differs from the authenticated ledger "
            f"head {head.hash[:12]}... (the ledger was rewritten)"
        ]
    return []


def reset_ledger(
    site_dir: Path, *, reason: str, ledger_path: Path | None = None, now: str | None = None
) -> LedgerReset:
    """Start a new, empty ledger for a site on purpose, and record that it did.

    ``site_dir`` is the site's ``.fedfuse`` folder. The old ledger (if any) is kept, renamed
    ``ledger.sqlite.reset-<time>``; the new ledger's meta table and the authenticated head both
    record the reset (time, reason, what the old ledger held). ``fedfuse audit`` shows it.
    """
    reason = reason.strip()
    if not reason:
        raise FedfuseError("ledger reset: --reason must say why the ledger is reset (recorded)")
    site_dir = Path(site_dir)
    ledger_path = Path(ledger_path) if ledger_path is not None else site_dir / LEDGER_NAME
    now = now or datetime.now(UTC).isoformat(timespec="seconds")
    head_file = anchor_path(site_dir)
    try:
        old_head = read_head(head_file, key=None)  # a reset is the remedy for a bad head too
    except LedgerError:
        old_head = None
    count, last, kept = 0, GENESIS_HASH, ""
    if ledger_path.exists():
        entries = Ledger(ledger_path, create=False).entries()
        count, last = len(entries), entries[-1].hash if entries else GENESIS_HASH
        kept_path = ledger_path.with_name(f"{ledger_path.name}.reset-{now.replace(':', '')}")
        os.replace(ledger_path, kept_path)
        kept = kept_path.name
    elif old_head is not None:
        count, last = old_head.count, old_head.hash
    reset = LedgerReset(now, reason, count, last, kept)
    ledger = Ledger(ledger_path)
    ledger.set_meta("reset", json.dumps(asdict(reset), sort_keys=True))
    ledger.set_meta(HEAD_META, str(head_file.resolve()))
    key = ledger_key(load_or_create_secret_file(site_dir / SECRET_NAME))
    resets = (*(old_head.resets if old_head else ()), reset)
    write_head(head_file, LedgerHead(0, GENESIS_HASH, resets), key=key)
    return reset
