"""The ledger audit as people see it: a rich table per ledger and the epsilon figure.

The checks themselves are in fedfuse.common.privacy.ledger_audit (they return a report,
they do not print); the `fedfuse audit` command renders it here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.table import Table

from fedfuse.common.privacy.ledger import (
    LEDGER_ACCOUNTANT,
)
from fedfuse.common.privacy.ledger_audit import CLAIM_RTOL, CROSS_ATOL, CROSS_RTOL, AuditReport


def print_report(report: AuditReport, *, console: Any, table_console: Any = None) -> None:
    """The human report: a table per ledger (site, run, round), chain state, problems, verdict."""
    table_console = table_console or console
    for a in report.ledgers:
        table = Table(title=f"{a.path}  ({a.chain.entries} entries)")
        for col in ("site", "run", "round", "#", "sigma", "q", "steps", "delta"):
            table.add_column(col)
        for col in ("epsilon (ledger)", "PRV", "RDP", "budget"):
            table.add_column(col, justify="right")
        for ev in a.events:
            e = ev.entry
            table.add_row(
                e.site,
                e.run_name or e.run_id,
                str(e.round) + (f" (attempt {e.attempt})" if e.attempt > 1 else ""),
                str(e.seq),
                f"{e.noise_multiplier:.4g}",
                f"{e.sample_rate:.4g}",
                str(e.steps),
                f"{e.delta:g}",
                f"{e.epsilon:.4f}",
                f"{ev.epsilon_prv:.4f}",
                f"{ev.epsilon_rdp:.4f}",
                f"{e.epsilon_budget:g}",
            )
        table_console.print(table)
        if a.chain.ok:
            console.print("  hash chain: [green]intact[/]")
        else:
            console.print(f"  hash chain: [bold red]BROKEN[/] at {a.chain.first_broken}")
        for p in a.chain.problems + a.problems:
            console.print(f"  [red]- {p}[/]")
        for p in a.over_budget:
            console.print(f"  [yellow]- over budget: {p}[/]")
        for n in a.notes:
            console.print(f"  - note: {n}")
    for m in report.missing:
        console.print(f"[red]- {m}[/]")
    console.print(
        f"Tolerances: stored vs recomputed epsilon {CLAIM_RTOL:.0%}; PRV may exceed RDP by "
        f"{CROSS_RTOL:.0%} + {CROSS_ATOL} at most (RDP is the looser bound)."
    )
    verdict = {
        0: "[green]OK[/]",
        1: "[yellow]BUDGET EXCEEDED[/]",
        2: "[red]TAMPERED OR INCONSISTENT[/]",
    }[report.exit_code]
    console.print(f"Audit: {verdict} (exit {report.exit_code})")


def plot_epsilon(report: AuditReport, out: str | Path) -> list[str]:
    """Cumulative epsilon (PRV) against the site's rounds, all runs in ledger order, one curve
    per site, with each site's budget as a dashed line. Returns the curves' labels."""
    # lazy: matplotlib takes a second and writes its cache under $HOME when imported; only
    # `fedfuse audit --plot` draws
    import matplotlib

    matplotlib.use("Agg")  # no display needed: the figure goes to a file
    import matplotlib.pyplot as plt  # lazy: as above
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    labels: list[str] = []
    for a in report.ledgers:
        for site in a.sites:
            evs = [ev for ev in a.events if ev.entry.site == site]
            xs = list(range(1, len(evs) + 1))
            ys = [ev.epsilon_prv for ev in evs]
            # Every curve starts from nothing spent, before the site's first round.
            (line,) = ax.plot([0, *xs], [0.0, *ys], marker="o", label=site)
            labels.append(site)
            budgets = [ev.entry.epsilon_budget for ev in evs]
            if any(math.isfinite(b) for b in budgets):
                ax.step(
                    xs,
                    [b if math.isfinite(b) else float("nan") for b in budgets],
                    where="post",
                    linestyle="--",
                    color=line.get_color(),
                    label=f"{site} budget",
                )
            starts = [
                x
                for x, ev, prev in zip(xs[1:], evs[1:], evs[:-1], strict=True)
                if ev.entry.run_id != prev.entry.run_id
            ]
            for x in starts:
                ax.axvline(x - 0.5, color=line.get_color(), alpha=0.2, linewidth=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("round at the site (all runs, in ledger order; faint lines: a new run)")
    ax.set_ylabel(f"cumulative epsilon ({LEDGER_ACCOUNTANT.upper()})")
    ax.set_title("Privacy spent per site")
    ax.grid(alpha=0.3)
    if labels:
        ax.legend(fontsize="small")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)
    return labels
