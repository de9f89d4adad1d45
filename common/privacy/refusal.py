"""The refusal a site sends instead of an update: one format that the ClientApp writes and the
ServerApp (any strategy or workflow) reads.

A refusal travels as a Flower ``Error`` reply, which every Flower strategy and workflow already
handles as "this node gave no result", so a refusing site can never be aggregated by mistake.
The reason is plain text a human reads in the server log and that :func:`parse_refusal` reads
back: ``site <name> refused round <r>: <why>``, for example ``site site-1 refused round 2:
privacy budget exhausted: spent 2.1 of 2.5 (this round would reach 2.9)``.

Under SecAgg+ a site that will refuse says so at the protocol's setup stage, before any key
exchange (client/secagg_mod.py), and there the refusal travels as fields
(:meth:`Refusal.to_record`: site, round, why, spent, budget, would-reach), not as text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Flower's own error codes are 0-8 (flwr.common.constant.ErrorCode); ours sits far above them.
PRIVACY_REFUSAL_CODE = 4031
_REASON = re.compile(r"^site (?P<site>.+?) refused round (?P<round>\d+): (?P<why>.*)$", re.DOTALL)
# The same text inside another error (a ClientApp mod that wraps the reply's error in its own).
_EMBEDDED = re.compile(r"site (?P<site>\S+) refused round (?P<round>\d+): (?P<why>[^'\n]*)")


@dataclass(frozen=True)
class Refusal:
    site: str
    round: int
    why: str
    # A budget refusal's figures (lifetime epsilon spent, the site's budget, what this round
    # would reach); None for other refusals.
    spent: float | None = None
    budget: float | None = None
    would_reach: float | None = None

    def to_record(self) -> dict[str, Any]:
        """The refusal as ConfigRecord values (infinite figures as the string "inf")."""
        out: dict[str, Any] = {"site": self.site, "round": self.round, "why": self.why}
        for key, value in (
            ("spent", self.spent),
            ("budget", self.budget),
            ("would-reach", self.would_reach),
        ):
            if value is not None:
                out[key] = float(value) if math.isfinite(value) else str(value)
        return out

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Refusal:
        """Read :meth:`to_record`'s fields back; a missing or mistyped field raises
        KeyError/TypeError/ValueError naming it."""

        def number(key: str) -> float | None:
            if key not in rec:
                return None
            value = rec[key]
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise TypeError(f"refusal field '{key}' must be a number; found {value!r}")
            return float(value)

        site, rnd, why = rec["site"], rec["round"], rec["why"]
        if not isinstance(site, str) or not isinstance(why, str) or type(rnd) is not int:
            raise TypeError("refusal fields 'site' and 'why' must be str, 'round' an int")
        return cls(
            site,
            rnd,
            why,
            spent=number("spent"),
            budget=number("budget"),
            would_reach=number("would-reach"),
        )

    @property
    def reason(self) -> str:
        return f"site {self.site} refused round {self.round}: {self.why}"

    @property
    def budget_exhausted(self) -> bool:
        return self.why.startswith("privacy budget exhausted")


def parse_refusal(code: int, reason: str | None) -> Refusal | None:
    """The refusal carried by a Flower error reply, or None for any other error."""
    if code != PRIVACY_REFUSAL_CODE or not reason:
        return None
    m = _REASON.match(reason)
    if m is None:
        return Refusal(site="?", round=0, why=reason)
    return Refusal(m["site"], int(m["round"]), m["why"])


def find_refusal(text: str | None) -> Refusal | None:
    """A refusal quoted inside another error's text (e.g. SecAgg+'s "training failed: ..."),
    or None."""
    m = _EMBEDDED.search(text or "")
    if m is None:
        return None
    return Refusal(m["site"], int(m["round"]), m["why"].rstrip(" .>"))
