"""``fedfuse audit``: verify site ledgers and recompute their epsilon with two accountants.

For every ledger found under a path (a ledger file, a site folder, a folder of site folders or a
run directory) the audit

1. verifies the hash chain and names the first broken entry;
2. recomputes each entry's cumulative epsilon from the stored events with the ledger's own
   accountant (Opacus PRV, Gopi et al. 2021) and checks it against the stored value;
3. recomputes it again with an independent accountant (Opacus RDP, Mironov 2017) and flags the
   two when they disagree in the direction that cannot happen: PRV is the tighter upper bound,
   so PRV above RDP by more than the tolerance means one of them is wrong. RDP above PRV is
   expected (RDP is looser: 3-50% for epsilon >= 1, up to several times for epsilon < 1) and is
   shown, not flagged;
4. checks every entry against the budget in force when it was written (and ``budget`` if given);
5. for a run directory, checks that every ledger entry the server recorded for the run (its
   hash per site and round) is still in the ledger unchanged -- this catches a consistent
   rewrite of a whole ledger, which a hash chain alone cannot;
6. checks the ledger against the site's HMAC-authenticated head beside it
   (``.fedfuse/ledger-head``, ``common/privacy/anchor.py``): a site folder whose head says it
   trained but has no ledger, a ledger shorter than its head or different at the head's entry,
   or a head whose HMAC fails is tampered; deliberate resets are shown;
7. checks that each recorded sampling rate is one the site could verify: the site's own
   Poisson sampling under DP-SGD, else rate 1 (a site cannot verify how the coordinator samples
   sites, so a distributed-DP round amplified by it is an unverifiable claim).

Exit status: 0 all good, 1 a budget exceeded, 2 a ledger tampered or inconsistent.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedfuse.common.errors import FedfuseError
from fedfuse.common.jsonsafe import jsonable
from fedfuse.common.privacy.accounting import epsilon_from_events
from fedfuse.common.privacy.anchor import (
    HEAD_META,
    anchor_path,
    head_problems,
    read_head,
)
from fedfuse.common.privacy.ledger import (
    LEDGER_ACCOUNTANT,
    ChainReport,
    Ledger,
    LedgerEntry,
    LedgerError,
)
from fedfuse.common.privacy.site_secret import (
    SiteSecretError,
    existing_secret,
    ledger_key,
)
from fedfuse.common.site_state import (
    HEAD_NAME,
    LEDGER_NAME,
    SECRET_NAME,
    STATE_DIR,
    ledger_file,
    state_dir,
)

# The stored cumulative epsilon must equal the recomputation with the same accountant; only
# floating-point noise and accountant-version drift may separate them.
CLAIM_RTOL = 0.01
# PRV may exceed RDP only by its own discretisation error (Opacus' eps_error = 0.01).
CROSS_RTOL = 0.01
CROSS_ATOL = 0.01
SECOND_ACCOUNTANT = "rdp"

# How a site folder's ledger is named in messages.
LEDGER_RELATIVE = f"{STATE_DIR}/{LEDGER_NAME}"

EXIT_OK, EXIT_OVER_BUDGET, EXIT_TAMPERED = 0, 1, 2


@dataclass(frozen=True)
class AuditedEvent:
    """One ledger entry with its epsilon recomputed by both accountants."""

    entry: LedgerEntry
    epsilon_prv: float
    epsilon_rdp: float

    def as_dict(self) -> dict[str, Any]:
        e = self.entry
        return {
            "seq": e.seq,
            "site": e.site,
            "run_id": e.run_id,
            "run_name": e.run_name,
            "round": e.round,
            "attempt": e.attempt,
            "time": e.time,
            "mechanism": e.mechanism,
            "noise_multiplier": e.noise_multiplier,
            "sample_rate": e.sample_rate,
            "steps": e.steps,
            "max_grad_norm": e.max_grad_norm,
            "delta": e.delta,
            "epsilon": e.epsilon,
            "epsilon_prv": self.epsilon_prv,
            "epsilon_rdp": self.epsilon_rdp,
            "epsilon_budget": e.epsilon_budget,
            "model_hash": e.model_hash,
            "hash": e.hash,
        }


@dataclass
class LedgerAudit:
    """The audit of one ledger file."""

    path: Path
    chain: ChainReport
    events: list[AuditedEvent] = field(default_factory=list)
    # Inconsistencies (exit 2) beyond the chain: stored epsilon, accountant disagreement,
    # server anchors.
    problems: list[str] = field(default_factory=list)
    over_budget: list[str] = field(default_factory=list)
    # Facts that are not failures (a deliberate reset, a head that is not authenticated).
    notes: list[str] = field(default_factory=list)

    @property
    def sites(self) -> list[str]:
        return sorted({ev.entry.site for ev in self.events})

    @property
    def lifetime_epsilon(self) -> float:
        return self.events[-1].epsilon_prv if self.events else 0.0

    @property
    def tampered(self) -> bool:
        return not self.chain.ok or bool(self.problems)


@dataclass
class AuditReport:
    """Everything ``fedfuse audit`` found under one path."""

    path: Path
    ledgers: list[LedgerAudit]
    budget: float | None = None
    missing: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.missing or any(a.tampered for a in self.ledgers):
            return EXIT_TAMPERED
        if any(a.over_budget for a in self.ledgers):
            return EXIT_OVER_BUDGET
        return EXIT_OK

    def as_dict(self) -> dict[str, Any]:
        return jsonable(
            {
                "path": str(self.path),
                "exit_code": self.exit_code,
                "status": {0: "ok", 1: "budget exceeded", 2: "tampered or inconsistent"}[
                    self.exit_code
                ],
                "accountants": [LEDGER_ACCOUNTANT, SECOND_ACCOUNTANT],
                "tolerance": {
                    "stored_vs_recomputed_rtol": CLAIM_RTOL,
                    "prv_above_rdp_rtol": CROSS_RTOL,
                    "prv_above_rdp_atol": CROSS_ATOL,
                },
                "budget": self.budget,
                "missing": self.missing,
                "ledgers": [
                    {
                        "path": str(a.path),
                        "sites": a.sites,
                        "entries": a.chain.entries,
                        "chain_ok": a.chain.ok,
                        "first_broken": a.chain.first_broken,
                        "chain_problems": a.chain.problems,
                        "problems": a.problems,
                        "over_budget": a.over_budget,
                        "notes": a.notes,
                        "lifetime_epsilon": a.lifetime_epsilon,
                        "events": [ev.as_dict() for ev in a.events],
                    }
                    for a in self.ledgers
                ],
            }
        )


def _close(a: float, b: float, rtol: float) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= rtol * max(abs(a), abs(b)) + 1e-9


def audit_ledger(path: str | Path, *, budget: float | None = None) -> LedgerAudit:
    """Verify one ledger file and recompute every entry's cumulative epsilon."""
    ledger = Ledger(path, create=False)
    chain = ledger.verify()
    entries = ledger.entries()
    audit = LedgerAudit(Path(path), chain)
    prefix: list = []
    infinite = False
    for e in entries:
        ev = e.event
        if ev is None:
            infinite = True
        else:
            prefix.append(ev)
        if infinite:
            prv = rdp = math.inf
        else:
            prv = epsilon_from_events(prefix, delta=e.delta, accountant=LEDGER_ACCOUNTANT)
            rdp = epsilon_from_events(prefix, delta=e.delta, accountant=SECOND_ACCOUNTANT)
        audit.events.append(AuditedEvent(e, prv, rdp))
        if e.accountant != LEDGER_ACCOUNTANT:
            audit.problems.append(
                f"{e.label()}: accountant {e.accountant!r}; this audit knows {LEDGER_ACCOUNTANT!r}"
            )
        elif not _close(e.epsilon, prv, CLAIM_RTOL):
            audit.problems.append(
                f"{e.label()}: stored epsilon {e.epsilon:.6g} but its events give "
                f"{prv:.6g} ({LEDGER_ACCOUNTANT}); tolerance {CLAIM_RTOL:.0%}"
            )
        if math.isfinite(prv) and prv > rdp * (1 + CROSS_RTOL) + CROSS_ATOL:
            audit.problems.append(
                f"{e.label()}: accountants disagree: PRV {prv:.6g} exceeds the RDP bound "
                f"{rdp:.6g} by more than {CROSS_RTOL:.0%} + {CROSS_ATOL}"
            )
        if prv > e.epsilon_budget:
            audit.over_budget.append(
                f"{e.label()}: epsilon {prv:.4g} exceeds the site budget {e.epsilon_budget:.4g} "
                "in force when it was written"
            )
        ddg = e.distributed
        if ddg is not None and ddg.sample_rate != 1.0:
            audit.problems.append(
                f"{e.label()}: distributed-DP round recorded at sampling rate "
                f"{ddg.sample_rate:g}; a site cannot verify how the coordinator samples sites, "
                "so only rate 1 is a rate it can stand behind"
            )
        elif e.event is None and e.sample_rate != 1.0:
            audit.problems.append(
                f"{e.label()}: non-private round recorded at sampling rate {e.sample_rate:g}; "
                "only rate 1 is a rate the site can stand behind"
            )
    check_head(audit, ledger, entries)
    if budget is not None and audit.events and audit.lifetime_epsilon > budget:
        last = audit.events[-1].entry
        audit.over_budget.append(
            f"{last.label()}: lifetime epsilon {audit.lifetime_epsilon:.4g} exceeds "
            f"--budget {budget:.4g}"
        )
    return audit


def check_head(audit: LedgerAudit, ledger: Ledger, entries: list[LedgerEntry]) -> None:
    """Check the ledger against the site's authenticated head in the same folder, if any."""
    recorded = ledger.meta(HEAD_META)
    head_file = anchor_path(ledger.path.parent)
    if not head_file.exists() and recorded and Path(recorded).is_absolute():
        head_file = Path(recorded)  # a ledger kept apart from its site folder (ledger-path)
    folder = head_file.parent  # the site's .fedfuse folder: its secret is there too
    if not head_file.exists():
        if recorded is not None:
            audit.problems.append(
                f"the ledger's authenticated head {head_file} is missing (it was written before)"
            )
        elif entries:
            audit.notes.append(f"no authenticated head beside this ledger ({head_file})")
        return
    try:
        secret = existing_secret(folder / SECRET_NAME)
    except SiteSecretError as exc:
        audit.problems.append(f"cannot authenticate the ledger head: {exc}")
        return
    if secret is None:
        audit.problems.append(
            f"cannot authenticate the ledger head {head_file}: the site's secret "
            f"{folder / SECRET_NAME} is missing"
        )
        return
    try:
        head = read_head(head_file, key=ledger_key(secret))
    except LedgerError as exc:
        audit.problems.append(str(exc))
        return
    assert head is not None
    audit.problems += head_problems(head, entries)
    for r in head.resets:
        kept = f"kept as {r.kept_as}" if r.kept_as else "its file was missing"
        audit.notes.append(
            f"ledger reset on purpose at {r.time}: {r.reason!r} (it held {r.previous_count} "
            f"entries ending in {r.previous_hash[:12]}...; {kept})"
        )


def _site_ledger(folder: Path) -> Path | None:
    p = ledger_file(folder)
    return p if p.is_file() else None


def _trained_without_ledger(folder: Path) -> str | None:
    """Why ``folder`` (a site folder) should hold a ledger it lacks, or None."""
    head_file = state_dir(folder) / HEAD_NAME
    if ledger_file(folder).exists() or not head_file.exists():
        return None
    try:
        head = read_head(head_file, key=None)
    except LedgerError as exc:
        return f"site folder {folder}: no ledger, and {exc}"
    if head is None or not head.trained:
        return None
    return (
        f"site folder {folder}: its ledger {LEDGER_RELATIVE} is missing, but its authenticated "
        f"head records {head.count} entries (the site has trained): restore the ledger, or reset "
        "it on purpose with `fedfuse ledger reset <site folder> --reason ...`"
    )


def find_ledgers(
    path: str | Path,
) -> tuple[list[Path], dict[Path, list[dict[str, Any]]], list[str]]:
    """Ledger files under ``path``, the server's anchors for each (run directory only), and
    the ledgers a run directory names that are not there."""
    path = Path(path)
    if path.is_file():
        return [path], {}, []
    if not path.is_dir():
        raise FedfuseError(
            f"audit path '{path}' does not exist: give a ledger file, a site folder, a folder "
            "of site folders or a run directory"
        )
    privacy = path / "privacy.json"
    if privacy.is_file():
        return _run_dir_ledgers(path, privacy)
    own = _site_ledger(path)
    if own is not None:
        return [own], {}, []
    lost = _trained_without_ledger(path)
    if lost is not None:
        return [], {}, [lost]
    folders = [d for d in sorted(path.iterdir()) if d.is_dir()]
    found = sorted(p for d in folders if (p := _site_ledger(d)))
    lost_sites = [m for d in folders if (m := _trained_without_ledger(d))]
    if found or lost_sites:
        return found, {}, lost_sites
    raise FedfuseError(
        f"no ledger under '{path}': expected a ledger file, a site folder holding "
        f"{LEDGER_RELATIVE}, a folder of such site folders, or a run directory with privacy.json"
    )


def _run_dir_ledgers(
    run_dir: Path, privacy_file: Path
) -> tuple[list[Path], dict[Path, list[dict[str, Any]]], list[str]]:
    privacy = json.loads(privacy_file.read_text())
    ledgers: list[Path] = []
    anchors: dict[Path, list[dict[str, Any]]] = {}
    missing: list[str] = []
    for name, site in sorted(privacy.get("sites", {}).items()):
        info = site.get("ledger") or {}
        if not info.get("path") and not info.get("entries"):
            continue
        # Sites do not send their ledger's path; a simulation's sites are under its data-dir.
        p = Path(info.get("path") or _simulated_ledger(run_dir, name))
        if not p.is_absolute():
            p = (run_dir / p).resolve()
        if not p.is_file():
            missing.append(
                f"site {name}: its ledger {p} is not here (audit it at the site: "
                f"`fedfuse audit <site folder>`)"
            )
            continue
        if p not in anchors:
            ledgers.append(p)
            anchors[p] = []
        anchors[p] += [dict(a, site=name) for a in info.get("entries", [])]
    if not ledgers and not missing:
        raise FedfuseError(f"run directory '{run_dir}' names no site ledgers in privacy.json")
    return ledgers, anchors, missing


def _simulated_ledger(run_dir: Path, site: str) -> Path:
    """Where a simulated site's ledger is: ``<data-dir>/<site>/.fedfuse/ledger.sqlite``."""
    cfg_file = run_dir / "config.json"
    data_dir = json.loads(cfg_file.read_text()).get("data-dir", "") if cfg_file.is_file() else ""
    ledger = ledger_file(Path(str(data_dir)) / site)
    if ledger.is_absolute():
        return ledger
    # A relative data-dir is relative to where the simulation ran: the folder the audit runs in,
    # or the one holding the runs folder (`runs/<run-id>`), as `fedfuse simulate` lays it out.
    for base in (Path.cwd(), run_dir.resolve().parent.parent):
        if (base / ledger).is_file():
            return (base / ledger).resolve()
    return (Path.cwd() / ledger).resolve()


def check_anchors(audit: LedgerAudit, anchors: list[dict[str, Any]]) -> None:
    """Every entry the server recorded must still be in the ledger with the same hash."""
    by_seq = {ev.entry.seq: ev.entry for ev in audit.events}
    for a in anchors:
        seq, h = int(a["seq"]), str(a["hash"])
        e = by_seq.get(seq)
        where = f"site {a.get('site')} round {a.get('round')}"
        if e is None:
            audit.problems.append(
                f"entry #{seq}: the server recorded it for {where} (hash {h[:12]}...) but the "
                "ledger no longer holds it"
            )
        elif e.hash != h:
            audit.problems.append(
                f"{e.label()}: the server recorded hash {h[:12]}... for {where}; the ledger "
                f"now holds {e.hash[:12]}... (the ledger was rewritten)"
            )


def audit(path: str | Path, *, budget: float | None = None) -> AuditReport:
    """Audit every ledger under ``path`` (see the module docstring)."""
    if budget is not None and (math.isnan(budget) or budget <= 0):
        raise FedfuseError(f"--budget must be in range (0, inf]; found {budget}")
    ledgers, anchors, missing = find_ledgers(path)
    audits = []
    for p in ledgers:
        try:
            a = audit_ledger(p, budget=budget)
        except LedgerError as exc:
            a = LedgerAudit(p, ChainReport(0, [str(exc)], f"ledger file {p}"))
        check_anchors(a, anchors.get(p, []))
        audits.append(a)
    return AuditReport(Path(path), audits, budget=budget, missing=missing)
