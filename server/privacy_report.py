"""What the server keeps of each site's privacy: refusals, run and lifetime spend, ledger heads.

The server cannot see a site's ledger, but it records, per round, the ledger entry each site
says it wrote (sequence number and hash). ``fedfuse audit <run dir>`` later checks that those
entries are still in the site's ledger unchanged, which catches a rewritten ledger.
"""

from __future__ import annotations

import math
import re
from typing import Any

from flwr.app import Message

from fedfuse.common.errors import FedfuseError
from fedfuse.common.privacy.refusal import REFUSAL_KEY, Refusal
from fedfuse.server.round_record import RoundRecord


class FederationStopped(FedfuseError):
    """Too few sites took part in a round (refused, failed or rejected): the run stops."""


def note_error(record: RoundRecord, msg: Message, fallback_name: str) -> tuple[str, str, bool]:
    """Record a reply that brought no update in the round record: a refusal (its fields,
    common/privacy/refusal.py) or an error. Returns (site, why, is_refusal)."""
    if not msg.has_error():
        refusal = refusal_of(msg)
        if refusal is not None:
            note_refusal(record, refusal)
            return refusal.site, refusal.why, True
    reason = str(msg.error.reason) if msg.has_error() else "a reply with a malformed refusal"
    name = named_site(reason, fallback_name)
    record.failed[name] = reason
    return name, reason, False


def is_refusal(msg: Message) -> bool:
    """Is ``msg`` a site's refusal (its fields, no update)?"""
    return msg.has_content() and REFUSAL_KEY in msg.content.config_records


def refusal_of(msg: Message) -> Refusal | None:
    """The refusal ``msg`` carries, or None (none, or one whose fields are malformed)."""
    if not is_refusal(msg):
        return None
    try:
        return Refusal.from_record(msg.content.config_records[REFUSAL_KEY])
    except (KeyError, TypeError, ValueError):
        return None


def note_refusal(record: RoundRecord, refusal: Refusal) -> None:
    """Keep a refusal in the round record: why (for people), and its fields."""
    record.refused[refusal.site] = refusal.why
    record.refusals[refusal.site] = refusal.to_record()


_NAMED = re.compile(r"(?:^|: )site ([\w.\-]+): ")


def named_site(reason: str, fallback: str) -> str:
    """The site an error reason names (``site <name>: ...``, client/wire.py), else
    ``fallback`` (a site that failed before saying its name is known by its node id)."""
    if not fallback.startswith("node-"):
        return fallback
    m = _NAMED.search(reason)
    return m[1] if m else fallback


def note_ledger(site: dict[str, Any], msg: Message) -> None:
    """Keep the ledger head the site reported with its update (hash and sequence number; the
    ledger's path stays at the site: ``fedfuse audit`` finds it there)."""
    rec = msg.content.config_records.get("ledger")
    if rec is None:
        return
    site["ledger"] = {
        "hash": str(rec.get("hash", "")),
        "seq": int(rec.get("seq", site.get("ledger-seq", 0))),  # type: ignore[arg-type]
    }


def stop_reason(record: RoundRecord, *, trained: int, min_sites: int) -> str | None:
    """Why the run must stop after this round's training, or None to go on."""
    if trained >= min_sites:
        return None
    left_out = [f"{n} refused: {why}" for n, why in record.refused.items()]
    left_out += [f"{n} failed: {why}" for n, why in record.failed.items()]
    left_out += [f"{n} rejected: {why}" for n, why in record.rejected.items()]
    detail = "; ".join(left_out) if left_out else "no site replied"
    return (
        f"round {record.round}: only {trained} site(s) trained, fewer than "
        f"min-sites {min_sites} ({detail})"
    )


def site_privacy(rounds: list[dict[str, Any]], *, target_epsilon: float, delta: float) -> dict:
    """Per site: this run's epsilon, its lifetime epsilon before and after the run, its budget,
    its refusals, and the ledger entries it reported (for ``fedfuse audit``)."""
    sites: dict[str, Any] = {}
    for rec in rounds:
        for name, why in rec.get("refused", {}).items():
            s = sites.setdefault(name, {"rounds": 0})
            s.setdefault("refused", []).append({"round": rec["round"], "reason": why})
        for name, s in rec.get("sites", {}).items():
            if "epsilon" not in s:
                continue
            prev = sites.setdefault(name, {"rounds": 0})
            prev.update(
                {
                    "epsilon": s["epsilon"],
                    "delta": s.get("delta", delta),
                    "target_epsilon": target_epsilon,
                    "noise_multiplier": s.get("noise-multiplier"),
                    "steps": s.get("steps"),
                    "rounds": prev["rounds"] + 1,
                    "last_round": rec["round"],
                }
            )
            if "lifetime-epsilon" in s:
                prev.setdefault("lifetime_epsilon_start", s.get("lifetime-epsilon-start"))
                prev["lifetime_epsilon"] = s["lifetime-epsilon"]
                prev["epsilon_budget"] = s.get("epsilon-budget", math.inf)
                prev["site_delta"] = s.get("site-delta")
            led = s.get("ledger")
            if led:
                entry = {"round": rec["round"], "seq": led["seq"], "hash": led["hash"]}
                info = prev.setdefault("ledger", {"entries": []})
                info["entries"].append(entry)
    return dict(sorted(sites.items()))
