"""``fedfuse report``: render a run's one-page HTML report (built in fedfuse.server.report);
``fedfuse track``: log a finished run to TensorBoard or MLflow (fedfuse.server.tracking)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from fedfuse.server.report import write_report
from fedfuse.server.tracking import TENSORBOARD_DIR, track_run


def report(
    run_dir: Path = typer.Argument(..., help="The run directory (e.g. runs/<run-name>)."),
    out: Path | None = typer.Option(
        None, "--out", help="Where to write the page (default: RUN_DIR/report.html)."
    ),
    verify: bool = typer.Option(
        True, "--verify/--no-verify", help="Audit the site ledgers where they are reachable."
    ),
) -> None:
    """One self-contained HTML page for a run; opens offline (no script, nothing fetched).

    The page: configuration, privacy per site, ledger verification, empirical audit, learning
    curves, modality contributions, clinical evaluation and what crossed the wire."""

    path = write_report(run_dir, out, verify_ledgers=verify)
    Console().print(f"Report written to {path}", soft_wrap=True, highlight=False)


def track(
    run_dir: Path = typer.Argument(..., help="The run directory (e.g. runs/<run-name>)."),
    to: str = typer.Option(..., "--to", help="tensorboard or mlflow."),
    uri: str = typer.Option(
        "",
        "--uri",
        help="MLflow store: sqlite:///PATH.db or file:///FOLDER "
        "(default: sqlite:///RUN_DIR/../mlflow.db).",
        show_default=False,
    ),
) -> None:
    """Log a finished run to TensorBoard or MLflow, as `fedfuse simulate --track` does.

    Every round's figures and each site's epsilon, the run config, and (MLflow) the report,
    summary, privacy summary and model as artifacts. Needs the 'track' extra."""
    track_run(run_dir, to, uri=uri or None)
    where = run_dir / TENSORBOARD_DIR if to == "tensorboard" else uri or "the MLflow store"
    Console().print(f"Run {run_dir.name} logged to {where}", soft_wrap=True, highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``fedfuse report`` and ``fedfuse track`` to the ``fedfuse`` app."""
    app.command("report")(report)
    app.command("track")(track)
