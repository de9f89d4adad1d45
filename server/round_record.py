"""What the server records of one round: a typed record the strategies fill, one row per round.

The strategy (``server/strategy.py``) and the SecAgg+ wrapper (``server/secagg.py``) both write
into the same :class:`RoundRecord`; :meth:`RoundRecord.to_row` turns it into the line that
``metrics.jsonl`` holds (``server/rundir.py``), with the same kebab-case keys as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Message


def site_name(msg: Message) -> str:
    """The site's self-declared name, else its node id."""
    if msg.has_content() and "site" in msg.content.config_records:
        return str(msg.content.config_records["site"].get("name", msg.metadata.src_node_id))
    return f"node-{msg.metadata.src_node_id}"


@dataclass
class RoundRecord:
    """One round as the server saw it. Site names key every per-site mapping."""

    round: int = 0
    # Site -> its training metrics (epsilon, ...), ledger head and, if it opted in, eval figures.
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    # Site -> its refusal as fields (site, spent, budget, would-reach), when it sent them.
    refusals: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval_failed: dict[str, str] = field(default_factory=dict)
    # The server-side DP mechanisms' running summaries: client-level DP (noise added at the
    # server) and distributed DP (noise added by the sites, decoded from the sum).
    client_dp: dict[str, Any] | None = None
    distributed_dp: dict[str, Any] | None = None
    # SecAgg+: how many sites were summed, dropped, rejected; threshold; seconds per stage.
    secagg: dict[str, Any] | None = None
    train_loss: float | None = None
    max_epsilon: float | None = None
    num_sites: int | None = None
    # Federation-wide evaluation figures (eval-loss, eval-accuracy, eval-auroc, ...).
    evaluation: dict[str, float] = field(default_factory=dict)
    # Per class, the reliability diagram's bins from the pooled histograms (common/clinical.py).
    reliability: dict[str, Any] | None = None
    stopped: str | None = None
    # A round that failed (SecAgg+ could not finish): status "failed" and why.
    status: str | None = None
    error: str | None = None
    seconds: float | None = None

    def note_max_epsilon(self) -> None:
        """The largest epsilon any recorded site reported this round (None if none did)."""
        eps = [s["epsilon"] for s in self.sites.values() if "epsilon" in s]
        self.max_epsilon = max(eps) if eps else None

    def to_row(self) -> dict[str, Any]:
        """The round as a ``metrics.jsonl`` line (what the run directory and callbacks get)."""
        row: dict[str, Any] = {
            "round": self.round,
            "sites": self.sites,
            "rejected": self.rejected,
            "failed": self.failed,
            "refused": self.refused,
        }
        optional = {
            "refusals": self.refusals or None,
            "eval-failed": self.eval_failed or None,
            "client-dp": self.client_dp,
            "distributed-dp": self.distributed_dp,
            "reliability": self.reliability,
            "secagg": self.secagg,
            "train-loss": self.train_loss,
            "max-epsilon": self.max_epsilon,
            "num-sites": self.num_sites,
            "stopped": self.stopped,
            "status": self.status,
            "error": self.error,
        }
        row.update({k: v for k, v in optional.items() if v is not None})
        if self.num_sites is not None:
            row["max-epsilon"] = self.max_epsilon  # kept (as null) once training was counted
        row.update(self.evaluation)
        if self.seconds is not None:
            row["seconds"] = self.seconds
        return row


@dataclass
class EvalRound:
    """One evaluation round as the server sees it: the sum of the sites' evaluation-sums
    vectors (None if no site contributed), the contributing replies (site names, and the
    figures of sites that opted in), and why the other sites left it out."""

    total: np.ndarray | None
    contributors: list[Message] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
