"""The ``fedfuse`` command. Thin: every command calls into the packages that do the work."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from common.errors import FedfuseError

app = typer.Typer(
    help="fedfuse: privacy-preserving federated learning for multimodal medical data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(
    help="Site data: make synthetic sites, check a site folder.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False)


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code)


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            _fail(f"--set '{item}' must look like key=value (e.g. --set fusion=concat)")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip().strip('"')
    return out


def check_privacy_args(*, epsilon: float, delta: float) -> None:
    """Refuse out-of-range privacy arguments, naming the flag and its range."""
    if math.isnan(epsilon) or epsilon <= 0:
        _fail(f"--epsilon must be in range (0, inf] (inf trains without DP); found {epsilon}")
    if math.isnan(delta) or not 0 < delta < 1:
        _fail(f"--delta must be in range (0, 1); found {delta}")


@app.command()
def simulate(
    sites: int | None = typer.Option(
        None, "--sites", min=1, help="Virtual sites [default: 3, or all in --data]."
    ),
    rounds: int = typer.Option(3, "--rounds", min=1, help="Federated rounds."),
    epsilon: float = typer.Option(
        8.0, "--epsilon", help="Each site's epsilon for the whole run (inf = no DP)."
    ),
    delta: float = typer.Option(1e-5, "--delta", help="Each site's delta."),
    data: Path | None = typer.Option(
        None, "--data", help="Folder of site folders [default: make synthetic]."
    ),
    out: Path = typer.Option(Path("runs"), "--out", help="Where run directories go."),
    seed: int = typer.Option(0, "--seed", help="Seed of data, model and DP noise."),
    records: int = typer.Option(
        1000, "--records", min=10, help="Records per synthetic site (without --data)."
    ),
    run_name: str = typer.Option("", "--run-name", help="Run directory name [default: time]."),
    missing_rate: float = typer.Option(
        0.0, "--missing-rate", help="Synthetic data: share of records lacking one modality."
    ),
    overrides: list[str] = typer.Option(
        [], "--set", help="Any run-config key, e.g. --set fusion=concat."
    ),
    verbose: bool = typer.Option(False, "--verbose", help="Show Flower's and Ray's logs."),
) -> None:
    """Run a whole federation on this machine (Flower simulation engine)."""
    check_privacy_args(epsilon=epsilon, delta=delta)
    from common.config import RunConfig

    raw: dict[str, Any] = {
        "num-rounds": rounds,
        "target-epsilon": epsilon,
        "target-delta": delta,
        "seed": seed,
        "out-dir": str(out),
        "run-name": run_name,
    }
    raw.update(_parse_overrides(overrides))
    if data is None:
        from common.data.synthetic_cli import synthetic_defaults

        raw = synthetic_defaults(raw)
    try:
        cfg = RunConfig.from_mapping(raw)
    except FedfuseError as exc:
        _fail(str(exc))
    if data is None:
        from common.data.synthetic_cli import ensure_synthetic

        if not 0.0 <= missing_rate < 1.0:
            _fail(f"--missing-rate must be in range [0, 1); found {missing_rate}")
        data = ensure_synthetic(
            cfg,
            sites=sites or 3,
            records=records,
            seed=seed,
            missing_rate=missing_rate,
            say=console.print,
        )
    elif not data.is_dir():
        _fail(f"--data '{data}' is not a folder (give a folder of site folders)")
    if sites is None:
        sites = sum(1 for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
        if sites == 0:
            _fail(f"--data '{data}' holds no site folders")
    cfg = cfg.replace(data_dir=str(data))
    _run_simulation(cfg, sites, verbose=verbose)


def _run_simulation(cfg: Any, sites: int, *, verbose: bool) -> None:
    from simulations.runner import simulate as run

    eps_text = "no DP" if not cfg.private else f"epsilon {cfg.target_epsilon:g}"
    console.print(
        f"[bold]fedfuse[/] simulating {sites} sites x {cfg.num_rounds} rounds, "
        f"{eps_text}, delta {cfg.target_delta:g}, data {cfg.data_dir}"
    )

    def on_round(rec: dict[str, Any]) -> None:
        eps = rec.get("max-epsilon")
        eps_s = "-" if eps is None else f"{eps:.3f}"
        auc = rec.get("eval-auroc")
        console.print(
            f"  round {rec['round']}/{cfg.num_rounds}  sites {rec.get('num-sites', 0)}  "
            f"train loss {_num(rec.get('train-loss'))}  test loss {_num(rec.get('eval-loss'))}  "
            f"test AUROC {_num(auc)}  max epsilon {eps_s} (target {cfg.target_epsilon:g})  "
            f"[{rec.get('seconds', 0):.1f}s]"
        )
        for name, reason in {**rec.get("failed", {}), **rec.get("rejected", {})}.items():
            console.print(f"    [yellow]site {name} left out:[/] {reason}")

    try:
        run_dir = run(cfg, num_sites=sites, on_round=on_round, verbose=verbose)
    except FedfuseError as exc:
        _fail(str(exc))
    _print_privacy(run_dir)
    console.print(f"Run directory: [bold]{run_dir}[/]")


def _num(x: Any) -> str:
    return "-" if x is None else f"{x:.4f}"


def _print_privacy(run_dir: Path) -> None:
    import json

    privacy = json.loads((run_dir / "privacy.json").read_text())
    table = Table(title="Privacy spent per site (record-level, whole run)")
    for col in ("site", "epsilon", "delta", "target", "noise multiplier", "rounds"):
        table.add_column(col)
    for name, s in privacy["sites"].items():
        table.add_row(
            name,
            f"{float(s['epsilon']):.4f}",
            f"{s['delta']:g}",
            f"{float(s['target_epsilon']):g}",
            f"{float(s['noise_multiplier']):.4f}",
            str(s["rounds"]),
        )
    console.print(table)


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., "--out", help="Folder to write the site folders into."),
    sites: int = typer.Option(3, "--sites", min=1),
    records: int = typer.Option(1000, "--records", min=10, help="Records per site (average)."),
    seed: int = typer.Option(0, "--seed"),
    alpha: float = typer.Option(1.0, "--alpha", help="Dirichlet label skew (small = skewed)."),
    modalities: str = typer.Option(
        "image,report", "--modalities", help="Of image,report,audio,tabular."
    ),
    missing_rate: float = typer.Option(
        0.0, "--missing-rate", help="Share of records lacking one modality (0-1)."
    ),
    absent: list[str] = typer.Option(
        [], "--absent", help="SITE:MODALITY a site lacks entirely, e.g. site-2:audio."
    ),
) -> None:
    """Write synthetic multimodal sites (image, report, audio, tabular) in the site format."""
    if not alpha > 0:
        _fail(f"--alpha must be in range (0, inf); found {alpha}")
    from common.data.synthetic import generate
    from common.data.synthetic_cli import parse_absent

    try:
        paths = generate(
            out,
            sites=sites,
            records=records,
            seed=seed,
            alpha=alpha,
            modalities=[m.strip() for m in modalities.split(",") if m.strip()],
            missing_rate=missing_rate,
            absent=parse_absent(absent),
        )
    except ValueError as exc:
        _fail(str(exc))
    for p in paths:
        console.print(str(p))


@data_app.command("check")
def data_check(
    site: Path = typer.Argument(..., help="A site folder (holding manifest.csv)."),
    classes: str = typer.Option(
        "no_finding,pneumonia",
        "--classes",
        help="Label names the run knows (comma-separated); 'any' skips the label check.",
    ),
    task: str = typer.Option("single-label", "--task", help="single-label or multi-label."),
    dicom_frame: int = typer.Option(0, "--dicom-frame", min=0, help="Frame of multi-frame DICOMs."),
):
    """Validate a site folder without changing it; exit 1 listing every problem."""
    from common.data.check import check_site, summary_lines
    from common.errors import DataValidationError

    if task not in ("single-label", "multi-label"):
        _fail(f"--task must be one of single-label, multi-label; found {task!r}")
    names = (
        None
        if classes.strip() == "any"
        else tuple(c.strip() for c in classes.split(",") if c.strip())
    )
    try:
        m = check_site(
            site, classes=names, multi_label=task == "multi-label", dicom_frame=dicom_frame
        )
    except DataValidationError as exc:
        err_console.print(str(exc), soft_wrap=True)
        raise typer.Exit(1) from None
    for line in summary_lines(m):
        console.print(line)


@app.command()
def explain(
    run_dir: Path = typer.Argument(..., help="A finished run directory (runs/<id>)."),
    data: Path = typer.Option(..., "--data", help="A site folder to evaluate on."),
    split: str = typer.Option("test", "--split", help="train, val or test."),
) -> None:
    """Per-modality contributions of a run's global model on one site's data."""
    from common.explain import explain_run, report_rows

    try:
        cfg, report = explain_run(run_dir, data, split=split)
    except FedfuseError as exc:
        _fail(str(exc))
    console.print(
        f"{run_dir}: fusion {cfg.fusion}, modalities {', '.join(cfg.modality_names)}; "
        f"{data} split {split}: {report['num-examples']} records, AUROC "
        f"{_num(report['auroc'])}"
    )
    table = Table(title="Modality contributions")
    for col in ("modality", "records with it", "mean weight", "AUROC without", "AUROC drop"):
        table.add_column(col)
    for row in report_rows(report):
        table.add_row(*row)
    console.print(table)


def main() -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
        app()
    except FedfuseError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
