"""The site's privacy ledger: an append-only, hash-chained SQLite file of privacy events.

Every entry records one round of DP-SGD on the site's data as *data* (mechanism, noise
multiplier, sampling rate, steps, clipping norm, delta), together with the site's cumulative
epsilon over ALL entries (every run on this data), the budget in force, a hash of the global
model the round started from, and a SHA-256 chain hash over the previous entry's hash and this
entry's content. Epsilon is always recomputable from the stored events
(:func:`fedfuse.common.privacy.accounting.epsilon_from_events`).

Appends run in ``BEGIN IMMEDIATE`` transactions: the read of the chain head, the epsilon
computed over every earlier event, the budget check and the insert are one atomic step, so two
processes appending at once lose nothing and fork nothing. SQLite triggers reject UPDATE and
DELETE on entries; someone who removes them and edits the file breaks the chain, which
:meth:`Ledger.verify` reports, naming the first broken entry. A chain alone cannot reveal a
consistent rewrite of the whole file: for that, compare with heads recorded elsewhere (the
site's HMAC-authenticated head beside its secret, ``common/privacy/anchor.py``; the server's
``privacy.json`` keeps each site's entry hash per round; ``fedfuse audit`` checks both).
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

from fedfuse.common.errors import FedfuseError, PrivacyBudgetExhaustedError
from fedfuse.common.privacy.accounting import DpSgdEvent, epsilon_from_events
from fedfuse.common.privacy.ddgauss import MECHANISM as DDGAUSS
from fedfuse.common.privacy.ddgauss import DdgEvent

SCHEMA_VERSION = "2"  # 2: entries have an attempt number
GENESIS_HASH = "0" * 64
# Opacus' DP-SGD with Poisson sampling: the only mechanism a site runs on its records.
DP_SGD = "poisson-sampled-gaussian"
# Training without noise (a non-private baseline): epsilon is infinite from then on.
NON_PRIVATE = "none"
MECHANISMS = (DP_SGD, NON_PRIVATE)
# Distributed DP (common/secagg/distributed_dp.py) writes its event's full parameters into the
# mechanism, "distributed-discrete-gaussian[sites>=T,dim=...,sensitivity=...,local-std=...,...]",
# the assumption (at least T sites' noise in every sum) included. With DP-SGD in the same round
# ("record+distributed") the entry is "poisson-sampled-gaussian+distributed-...[...]": its
# numbers are the DP-SGD event, which alone bounds the site's record-level epsilon (the
# distributed noise is post-processing of DP-SGD's output, and its guarantee is conditional).


def mechanism_known(mechanism: str) -> bool:
    """Whether ``mechanism`` is one this ledger writes (with a well-formed DDGauss part)."""
    if mechanism in MECHANISMS:
        return True
    rest = mechanism.removeprefix(DP_SGD + "+")
    if not rest.startswith(DDGAUSS):
        return False
    try:
        ev = DdgEvent.parse(rest)
    except ValueError:
        return False
    return ev is not None and ev.mechanism() == rest


# The ledger's own accountant for the cumulative epsilon (PRV: the tightest upper bound Opacus
# has; Gopi et al. 2021, arXiv:2106.02848).
LEDGER_ACCOUNTANT = "prv"


class LedgerError(FedfuseError):
    """The ledger file cannot be used (unreadable, wrong schema, broken chain)."""


class LedgerIntegrityError(LedgerError):
    """The hash chain is broken: the file was changed after entries were written."""


@dataclass(frozen=True)
class LedgerEntry:
    """One privacy event at the site, as stored (all fields are hashed except ``hash``)."""

    seq: int
    site: str
    run_id: str
    run_name: str
    round: int
    # 1, or more when the same round of the same run was trained again (a run resumed after an
    # interruption re-sends the round): every training is a release, and each one is counted.
    attempt: int
    time: str
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    accountant: str
    epsilon: float
    epsilon_budget: float
    model_hash: str
    prev_hash: str
    hash: str

    @property
    def event(self) -> DpSgdEvent | DdgEvent | None:
        """The DP event that bounds the site's epsilon (None for non-private training, whose
        epsilon is infinite)."""
        if self.mechanism == DP_SGD or self.mechanism.startswith(DP_SGD + "+"):
            return DpSgdEvent(self.noise_multiplier, self.sample_rate, self.steps)
        if self.mechanism.startswith(DDGAUSS):
            return DdgEvent.parse(self.mechanism)
        return None

    @property
    def distributed(self) -> DdgEvent | None:
        """The round's distributed-DP event (client level, conditional on its sites), if any."""
        return DdgEvent.parse(self.mechanism) if DDGAUSS in self.mechanism else None

    def content(self) -> dict[str, object]:
        d = asdict(self)
        d.pop("hash")
        return d

    def compute_hash(self) -> str:
        return chain_hash(self.content())

    def label(self) -> str:
        """How reports name this entry: its position, run and round."""
        run = self.run_name or self.run_id
        again = f", attempt {self.attempt}" if self.attempt > 1 else ""
        return f"entry #{self.seq} (run {run}, round {self.round}{again})"


_COLUMNS = tuple(f.name for f in fields(LedgerEntry))


def chain_hash(content: dict[str, object]) -> str:
    """SHA-256 over a canonical JSON of the entry (which includes the previous entry's hash).

    Floats are written by ``repr`` (shortest round-trip form) and SQLite REAL stores the same
    IEEE double, so a stored entry re-hashes to the same value.
    """
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cumulative_epsilon(
    entries: Iterable[LedgerEntry], *, delta: float, accountant: str = LEDGER_ACCOUNTANT
) -> float:
    """Epsilon at ``delta`` of every event in ``entries`` composed (inf after any non-private
    training)."""
    events: list[DpSgdEvent | DdgEvent] = []
    for e in entries:
        ev = e.event
        if ev is None:
            return math.inf
        events.append(ev)
    return epsilon_from_events(events, delta=delta, accountant=accountant)


@dataclass(frozen=True)
class ChainReport:
    """Result of :meth:`Ledger.verify`: every problem found, and the first broken entry."""

    entries: int
    problems: list[str]
    first_broken: str | None

    @property
    def ok(self) -> bool:
        return not self.problems


_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY,
    site TEXT NOT NULL,
    run_id TEXT NOT NULL,
    run_name TEXT NOT NULL,
    round INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    time TEXT NOT NULL,
    mechanism TEXT NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL,
    max_grad_norm REAL NOT NULL,
    delta REAL NOT NULL,
    accountant TEXT NOT NULL,
    epsilon REAL NOT NULL,
    epsilon_budget REAL NOT NULL,
    model_hash TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    UNIQUE (run_id, round, attempt)
);
-- The chain head (entry count and last hash): removing entries from the end shows here.
CREATE TABLE IF NOT EXISTS head (
    id INTEGER PRIMARY KEY CHECK (id = 1), count INTEGER NOT NULL, hash TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS entries_append_only_update BEFORE UPDATE ON entries
BEGIN SELECT RAISE(ABORT, 'the fedfuse privacy ledger is append-only') ; END;
CREATE TRIGGER IF NOT EXISTS entries_append_only_delete BEFORE DELETE ON entries
BEGIN SELECT RAISE(ABORT, 'the fedfuse privacy ledger is append-only') ; END;
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', '{SCHEMA_VERSION}');
INSERT OR IGNORE INTO head (id, count, hash) VALUES (1, 0, '{GENESIS_HASH}');
"""
_TRIGGERS = ("entries_append_only_update", "entries_append_only_delete")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class Ledger:
    """One site's ledger file. Cheap to open; every method opens its own short connection, so
    one object is safe to share and many processes may use the same file.

    Parameters
    ----------
    path:
        The SQLite file (created with its folder if missing, unless ``create=False``).
    timeout:
        Seconds to wait for another process's transaction before giving up.
    """

    def __init__(self, path: str | Path, *, timeout: float = 120.0, create: bool = True) -> None:
        self.path = Path(path)
        self.timeout = timeout
        # An audit opens the file read-only: looking must never change what is looked at.
        self.readonly = not create
        if not self.path.exists():
            if not create:
                raise LedgerError(f"no ledger at {self.path}")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            has_schema = con.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
            ).fetchone()
        if not has_schema:
            if not create:
                raise LedgerError(f"{self.path} is not a fedfuse ledger (no 'meta' table)")
            # Only a new file gets the schema (IF NOT EXISTS: two processes may race here);
            # recreating it on every open would silently restore removed triggers.
            with self._transaction() as con:
                # Statement by statement: executescript() would COMMIT the open transaction.
                for statement in _SCHEMA.split(";\n"):
                    if statement.strip():
                        con.execute(statement)
        with self._connect() as con:
            version = con.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if version is None or version[0] != SCHEMA_VERSION:
            raise LedgerError(
                f"{self.path}: ledger schema {version[0] if version else '?'} is not the "
                f"supported version {SCHEMA_VERSION}"
            )

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            if self.readonly:
                uri = f"{self.path.resolve().as_uri()}?mode=ro"
                con = sqlite3.connect(uri, uri=True, timeout=self.timeout, isolation_level=None)
            else:
                con = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open the ledger {self.path}: {exc}") from exc
        try:
            if not self.readonly:
                # FULL: a committed entry survives a power cut (the site may already have
                # sent the update it accounts for).
                con.execute("PRAGMA synchronous=FULL")
            yield con
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"ledger {self.path}: {exc}") from exc
        finally:
            con.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE: take the write lock before reading, so read-then-append is atomic."""
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # ----------------------------------------------------------------------------- reading
    @staticmethod
    def _rows(con: sqlite3.Connection) -> list[LedgerEntry]:
        cur = con.execute(f"SELECT {', '.join(_COLUMNS)} FROM entries ORDER BY seq")
        return [LedgerEntry(*row) for row in cur.fetchall()]

    def entries(self) -> list[LedgerEntry]:
        """Every entry, in chain order."""
        with self._connect() as con:
            return self._rows(con)

    def meta(self, key: str) -> str | None:
        """A value of the ledger's ``meta`` table (not hash-chained: notes, not evidence)."""
        with self._connect() as con:
            row = con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        if self.readonly:
            raise LedgerError(f"{self.path} was opened read-only (for an audit)")
        with self._transaction() as con:
            con.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def find(self, run_id: str, round: int) -> LedgerEntry | None:
        return next((e for e in self.entries() if e.run_id == run_id and e.round == round), None)

    def verify(self) -> ChainReport:
        """Check the hash chain, entry by entry; report every problem and the first bad entry."""
        with self._connect() as con:
            entries = self._rows(con)
            head = con.execute("SELECT count, hash FROM head WHERE id = 1").fetchone()
            triggers = {
                r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")
            }
        return verify_entries(entries, head=head, triggers=triggers)

    # ----------------------------------------------------------------------------- writing
    def append(
        self,
        *,
        site: str,
        run_id: str,
        run_name: str,
        round: int,
        event: DpSgdEvent | DdgEvent | None,
        max_grad_norm: float,
        delta: float,
        epsilon_budget: float,
        model_hash: str,
        distributed: DdgEvent | None = None,
    ) -> LedgerEntry:
        """Append one round's event, atomically, if it keeps the site within its budget.

        ``event=None`` records non-private training (infinite epsilon); a :class:`DdgEvent`
        records a distributed-DP round; ``distributed`` notes the distributed-DP event of a
        DP-SGD round (record+distributed), which its epsilon does not use. Inside one write
        transaction: the chain is verified, the cumulative epsilon over every earlier entry
        plus this event is computed with PRV at ``delta``, and the entry is written only if
        that epsilon is at most ``epsilon_budget``.

        Raises
        ------
        PrivacyBudgetExhaustedError
            The event would take the site past ``epsilon_budget``; nothing is written.
        LedgerIntegrityError
            The chain is broken; nothing is written.
        """
        if self.readonly:
            raise LedgerError(f"{self.path} was opened read-only (for an audit)")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in range (0, 1); found {delta}")
        if math.isnan(epsilon_budget) or epsilon_budget <= 0:
            raise ValueError(f"epsilon_budget must be in range (0, inf]; found {epsilon_budget}")
        with self._transaction() as con:
            entries = self._rows(con)
            head = con.execute("SELECT count, hash FROM head WHERE id = 1").fetchone()
            report = verify_entries(entries, head=head, triggers=None)
            if not report.ok:
                raise LedgerIntegrityError(
                    f"ledger {self.path} is broken at {report.first_broken}: "
                    f"{report.problems[0]}. Nothing was written; run `fedfuse audit {self.path}`"
                )
            # A round trained again (e.g. a resumed run re-sends it) is another release.
            attempt = 1 + sum(1 for e in entries if e.run_id == str(run_id) and e.round == round)
            spent = entries[-1].epsilon if entries and entries[-1].delta == delta else None
            if spent is None:
                spent = cumulative_epsilon(entries, delta=delta)
            prior = [e.event for e in entries]
            if event is None or any(p is None for p in prior):
                epsilon = math.inf
            else:
                epsilon = epsilon_from_events(
                    [*prior, event],  # type: ignore[list-item]
                    delta=delta,
                    accountant=LEDGER_ACCOUNTANT,
                )
            if epsilon > epsilon_budget:
                raise PrivacyBudgetExhaustedError(
                    spent=spent, would_reach=epsilon, budget=epsilon_budget
                )
            prev = entries[-1].hash if entries else GENESIS_HASH
            if isinstance(event, DdgEvent):
                mechanism = event.mechanism()
            elif event is not None:
                mechanism = DP_SGD + (f"+{distributed.mechanism()}" if distributed else "")
            else:
                mechanism = NON_PRIVATE
            content = {
                "seq": (entries[-1].seq if entries else 0) + 1,
                "site": site,
                "run_id": str(run_id),
                "run_name": run_name,
                "round": int(round),
                "attempt": attempt,
                "time": _now(),
                "mechanism": mechanism,
                "noise_multiplier": float(event.noise_multiplier) if event else 0.0,
                "sample_rate": float(event.sample_rate) if event else 1.0,
                "steps": int(event.steps) if event else 0,
                "max_grad_norm": float(max_grad_norm),
                "delta": float(delta),
                "accountant": LEDGER_ACCOUNTANT,
                "epsilon": float(epsilon),
                "epsilon_budget": float(epsilon_budget),
                "model_hash": model_hash,
                "prev_hash": prev,
            }
            entry = LedgerEntry(**content, hash=chain_hash(content))  # type: ignore[arg-type]
            con.execute(
                f"INSERT INTO entries ({', '.join(_COLUMNS)}) "
                f"VALUES ({', '.join('?' for _ in _COLUMNS)})",
                tuple(getattr(entry, c) for c in _COLUMNS),
            )
            con.execute("UPDATE head SET count = ?, hash = ? WHERE id = 1", (entry.seq, entry.hash))
        return entry


def verify_entries(
    entries: list[LedgerEntry],
    *,
    head: tuple[int, str] | None,
    triggers: set[str] | None,
) -> ChainReport:
    """The chain checks of :meth:`Ledger.verify` on entries already read (in ``seq`` order).

    Checks, per entry: position (``seq`` = 1, 2, 3, ...), content against its own hash, and its
    link to the previous entry's hash; then the head against the last entry, and that the
    append-only triggers are still there (``triggers=None`` skips that check).
    """
    problems: list[str] = []
    first: str | None = None

    def broken(entry: LedgerEntry, why: str) -> None:
        nonlocal first
        problems.append(f"{entry.label()}: {why}")
        if first is None:
            first = entry.label()

    prev_hash = GENESIS_HASH
    for i, e in enumerate(entries, start=1):
        if e.seq != i:
            broken(e, f"found at position {i} but numbered #{e.seq} (entries deleted or reordered)")
        if e.compute_hash() != e.hash:
            broken(e, "its content does not match its hash (a value was changed)")
        if e.prev_hash != prev_hash:
            broken(
                e,
                "does not link to the entry before it (an entry before it was deleted, "
                "inserted or moved)",
            )
        if not mechanism_known(e.mechanism):
            broken(e, f"unknown mechanism {e.mechanism!r}")
        prev_hash = e.hash
    if head is not None:
        count, head_hash = head
        last = entries[-1] if entries else None
        if count != len(entries) or head_hash != (last.hash if last else GENESIS_HASH):
            if count > len(entries):
                name = f"entry #{len(entries) + 1} (missing: removed from the end)"
            else:
                name = f"entry #{count + 1} (written after the ledger head)"
            problems.append(
                f"{name}: the ledger head records {count} entries ending in {head_hash[:12]}..., "
                f"but the file holds {len(entries)}"
            )
            if first is None:
                first = name
    if triggers is not None:
        missing = [t for t in _TRIGGERS if t not in triggers]
        if missing:
            problems.append(f"append-only triggers were removed: {', '.join(missing)}")
            if first is None:
                first = "the ledger's append-only triggers"
    return ChainReport(entries=len(entries), problems=problems, first_broken=first)
