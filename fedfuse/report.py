"""``fedfuse report``: render a run's one-page HTML report (built in fedfuse.server.report)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from fedfuse.server.report import write_report


def report(
    run_dir: Path = typer.Argument(..., help="The run directory (e.g. runs/<run-name>)."),
    out: Path | None = typer.Option(
        None, "--out", help="Where to write the page (default: RUN_DIR/report.html)."
    ),
    verify: bool = typer.Option(
        True, "--verify/--no-verify", help="Audit the site ledgers where they are reachable."
    ),
) -> None:
    """One self-contained HTML page for a run: configuration, privacy per site, ledger
    verification, empirical audit, learning curves, modality contributions, clinical
    evaluation and what crossed the wire. Opens offline (no script, nothing fetched)."""

    path = write_report(run_dir, out, verify_ledgers=verify)
    Console().print(f"Report written to {path}", soft_wrap=True, highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``fedfuse report`` to the ``fedfuse`` app."""
    app.command("report")(report)
