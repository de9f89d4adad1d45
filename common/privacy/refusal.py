"""The refusal a site sends instead of an update: one record that the ClientApp writes and the
ServerApp (any strategy or workflow) reads, field by field.

A refusal travels as fields -- site, round, why, and for a budget refusal the lifetime epsilon
spent, the site's budget and what the round would reach (:meth:`Refusal.to_record`) -- in a
ConfigRecord under :data:`REFUSAL_KEY`, never as text to be parsed back:

- without SecAgg+, as the whole content of the site's train reply (no model in it, so nothing
  that could be aggregated by mistake; ``server/privacy_report.py`` reads it);
- under SecAgg+, in the site's reply to the setup stage, before any key exchange
  (``client/secagg_mod.py``), so that the round goes on without it; or, should the site refuse
  only once the model came (its ledger changed meanwhile), beside its refusal to upload.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The ConfigRecord holding a refusal's fields, in a train reply or a SecAgg+ reply.
REFUSAL_KEY = "privacy-refusal"


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
        """A budget refusal: it carries its figures (another refusal, e.g. a broken ledger,
        carries only why)."""
        return self.budget is not None and self.would_reach is not None
