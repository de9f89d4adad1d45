"""The ``fedfuse`` command. Thin: every command calls into the packages that do the work."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from fedfuse.common.config import RunConfig
from fedfuse.common.errors import DataValidationError, FedfuseError
from fedfuse.common.site_state import state_dir
from fedfuse.deploy_cli import register as register_deploy_commands
from fedfuse.export import register as register_export_commands
from fedfuse.progress import RoundProgress
from fedfuse.report import register as register_report_command
from fedfuse.server.tracking import open_tracker
from fedfuse.simulations.scenarios import ensure_data, load_scenario
from fedfuse.split_cli import register as register_split_command

app = typer.Typer(
    help="fedfuse: privacy-preserving federated learning for multimodal medical data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # sub-commands inherit it
)


def _version(value: bool) -> None:
    if value:
        try:
            typer.echo(f"fedfuse {version('fedfuse')}")
        except PackageNotFoundError:  # run from a checkout that was never installed
            typer.echo("fedfuse (not installed; version unknown)")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: bool = typer.Option(
        False,
        "--version",
        callback=_version,
        is_eager=True,
        help="Print fedfuse's version and exit.",
    ),
) -> None:
    """fedfuse: privacy-preserving federated learning for multimodal medical data."""


data_app = typer.Typer(
    help="Site data: make synthetic sites, check and split site folders.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False)


def _table_console() -> Console:
    """Wide tables stay readable when output goes to a file or CI log (rich assumes 80)."""
    return console if console.is_terminal else Console(highlight=False, width=160)


class _DefaultCommandGroup(TyperGroup):
    """A group whose first argument, when it names no sub-command, goes to ``default_command``:
    ``fedfuse audit PATH`` runs ``fedfuse audit ledger PATH`` (once a ``ledger`` command is
    registered) while ``fedfuse audit empirical ...`` runs the empirical audit."""

    default_command = "ledger"

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if (
            args
            and args[0] not in self.commands
            and not args[0].startswith("-")
            and self.default_command in self.commands
        ):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


audit_app = typer.Typer(
    cls=_DefaultCommandGroup,
    help="Audit privacy claims: `audit PATH` (= `audit ledger PATH`) verifies site ledgers and "
    "recomputes their epsilon; `audit empirical` tests a claimed epsilon with canaries.",
    no_args_is_help=True,
)
app.add_typer(audit_app, name="audit")


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
    scenario: str | None = typer.Option(
        None,
        "--scenario",
        help="Built-in scenario name or a scenario .toml file (flags override its values) "
        "(default: hospitals-3).",
    ),
    sites: int | None = typer.Option(
        None,
        "--sites",
        min=1,
        help="Virtual sites (default: the scenario's, or every site folder in --data).",
    ),
    rounds: int | None = typer.Option(
        None, "--rounds", min=1, help="Federated rounds (default: the scenario's)."
    ),
    epsilon: float | None = typer.Option(
        None, "--epsilon", help="Each site's epsilon for the whole run; inf = no DP (default: 8)."
    ),
    delta: float | None = typer.Option(None, "--delta", help="Each site's delta (default: 1e-5)."),
    dp_level: str | None = typer.Option(
        None,
        "--dp-level",
        help="record (DP-SGD at sites), client (clipping at sites + noise at the server), "
        "record+client, distributed (sites add the noise inside SecAgg+) or record+distributed.",
    ),
    data: Path | None = typer.Option(
        None, "--data", help="Folder of site folders (default: make synthetic sites)."
    ),
    out: Path = typer.Option(Path("runs"), "--out", help="Where run directories go."),
    seed: int = typer.Option(0, "--seed", help="Seed of data, model and DP noise."),
    records: int | None = typer.Option(
        None, "--records", min=10, help="Records per synthetic site (without --data)."
    ),
    run_name: str = typer.Option(
        "", "--run-name", help="Run directory name (default: the time).", show_default=False
    ),
    cpus_per_site: float | None = typer.Option(
        None,
        "--cpus-per-site",
        min=0.1,
        help="CPUs reserved per virtual site (default: the scenario's, 1).",
    ),
    gpus_per_site: float | None = typer.Option(
        None,
        "--gpus-per-site",
        min=0.0,
        help="GPU share per virtual site (default: 0.5 if CUDA, else 0).",
    ),
    engine: str = typer.Option(
        "simulation",
        "--engine",
        help="simulation: Flower's simulation engine (Ray), the sites in parallel; inprocess: "
        "the same apps in this process, the sites one after another (no Ray; --cpus-per-site "
        "and --gpus-per-site do not apply).",
    ),
    missing_rate: float = typer.Option(
        0.0, "--missing-rate", help="Synthetic data: share of records lacking one modality."
    ),
    overrides: list[str] = typer.Option(
        [], "--set", help="Any run-config key, e.g. --set fusion=concat."
    ),
    secagg: bool | None = typer.Option(
        None,
        "--secagg/--no-secagg",
        help="Secure aggregation (SecAgg+) of the updates (default: on).",
    ),
    holdout_site: str = typer.Option(
        "",
        "--holdout-site",
        help="A site folder that never trains: it evaluates the final model on its records, "
        "reported apart as the held-out site.",
        show_default=False,
    ),
    track: str = typer.Option(
        "",
        "--track",
        help="Log rounds, config and files to tensorboard or mlflow (the 'track' extra).",
        show_default=False,
    ),
    track_uri: str = typer.Option(
        "",
        "--track-uri",
        help="MLflow store: sqlite:///PATH.db or file:///FOLDER (default: OUT/mlflow.db).",
        show_default=False,
    ),
    verbose: bool = typer.Option(False, "--verbose", help="Show Flower's and Ray's logs."),
) -> None:
    """Run a whole federation on this machine (Flower simulation engine)."""
    if epsilon is not None or delta is not None:
        check_privacy_args(
            epsilon=8.0 if epsilon is None else epsilon, delta=1e-5 if delta is None else delta
        )

    # lazy: loads torch (seconds); `fedfuse --help` and the light commands start without it
    from fedfuse.common.privacy.planning import without_auto, without_planned

    try:
        scen = load_scenario(scenario or "hospitals-3")
        if data is not None and scenario is None:
            # The default scenario's training keys are for its own synthetic sites: on the
            # user's sites the plan chooses them.
            scen = replace(scen, run=without_planned(scen.run))
        raw: dict[str, Any] = {"seed": seed, "out-dir": str(out), "run-name": run_name}
        for key, value in (
            ("num-rounds", rounds),
            ("target-epsilon", epsilon),
            ("target-delta", delta),
            ("secagg", secagg),
            ("dp-level", dp_level),
            ("holdout-site", holdout_site or None),
        ):
            if value is not None:
                raw[key] = value
        raw.update(_parse_overrides(overrides))
        if data is None:
            # lazy: loads torch (seconds); `fedfuse --help` and the light commands start without it
            from fedfuse.synthetic_cli import synthetic_defaults

            raw = synthetic_defaults({**scen.run, **raw})
        raw = {**scen.run, **raw}
        cfg = RunConfig.from_mapping(without_auto(raw))
        if not 0.0 <= missing_rate < 1.0:
            _fail(f"--missing-rate must be in range [0, 1); found {missing_rate}")
        spec = replace(
            scen.data,
            sites=sites or scen.data.sites,
            records=records or scen.data.records,
            missing_rate=missing_rate or scen.data.missing_rate,
            modalities=cfg.modality_names,
        )
    except FedfuseError as exc:
        _fail(str(exc))
    # lazy: loads torch (seconds); `fedfuse --help` and the light commands start without it
    from fedfuse.simulations.runner import ENGINES, check_resources

    if engine not in ENGINES:
        _fail(f"--engine must be one of: {', '.join(ENGINES)}; found '{engine}'")
    cpus = cpus_per_site if cpus_per_site is not None else scen.cpus_per_site
    gpus, notes = None, []
    try:  # before any data is made or Ray starts: an impossible request would hang Ray
        if engine == "simulation":  # (in process, the sites take turns on this process)
            gpus, notes = check_resources(
                cpus_per_site=cpus,
                gpus_per_site=gpus_per_site if gpus_per_site is not None else scen.gpus_per_site,
            )
    except FedfuseError as exc:
        _fail(str(exc))
    for note in notes:
        err_console.print(f"[yellow]warning:[/] {note}", soft_wrap=True)
    sites_given = sites
    data, sites = _resolve_data(spec, data=data, sites=sites, seed=seed, name=scen.name)
    if cfg.holdout_site:
        # lazy: loads torch (seconds); `fedfuse --help` and the light commands start without it
        from fedfuse.client.site import simulation_site_dirs

        try:  # --sites counts the sites that train: by default all but the held-out one
            rest = len(simulation_site_dirs(data, holdout=cfg.holdout_site))
            sites = rest if sites_given is None else sites
        except FedfuseError as exc:
            _fail(str(exc))
    if cfg.secagg and sites < 2:
        _fail("secure aggregation needs at least 2 sites (--sites 2 or more), or use --no-secagg")
    cfg = cfg.replace(data_dir=str(data))
    # Keys left unset or "auto" (rounds, epochs, batch, rate, clipping, text buckets) take the plan.
    cfg = _apply_plan(data, sites, {**raw, "data-dir": str(data)})
    _run_simulation(
        cfg,
        sites,
        verbose=verbose,
        cpus_per_site=cpus,
        gpus_per_site=gpus,
        track=track,
        track_uri=track_uri,
        engine=engine,
    )


def _apply_plan(data: Path, sites: int, raw: dict[str, Any]) -> Any:
    """The run config with the training plan for the first ``sites`` site folders of ``data``
    applied (the user's keys kept); prints the plan."""
    # lazy: loads torch (seconds); `fedfuse --help` and the light commands start without it
    from fedfuse.client.site import simulation_site_dirs
    from fedfuse.common.privacy.planning import plan_for_sites

    try:
        dirs = simulation_site_dirs(str(data), holdout=str(raw.get("holdout-site", "")))
        plan, cfg = plan_for_sites(dirs[:sites], raw, build=RunConfig.from_mapping)
    except FedfuseError as exc:
        _fail(str(exc))
    if plan is not None:
        _print_plan(plan, brief=True)
    return cfg


def _print_plan(plan: Any, *, brief: bool = False) -> None:
    """The plan as a table of settings and one of sites (``brief``: one line of settings)."""
    keys = ", ".join(
        f"{k} {_value(v)}{'' if k in plan.chosen else ' (yours)'}" for k, v in plan.settings.items()
    )
    if brief:
        console.print(f"Plan: {keys}")
        return
    eps = "no DP" if math.isinf(plan.target_epsilon) else f"epsilon {plan.target_epsilon:g}"
    console.print(f"[bold]Training plan[/] ({eps}, delta {plan.target_delta:g} per site)")
    settings = Table("key", "value", "from")
    for k, v in plan.settings.items():
        settings.add_row(k, _value(v), "plan" if k in plan.chosen else "yours")
    _table_console().print(settings)
    sites = Table("site", "train records", "sample rate", "steps", "noise multiplier", "epsilon")
    for s in plan.sites:
        sigma = "-" if s.noise_multiplier is None else f"{s.noise_multiplier:.3f}"
        sites.add_row(
            s.site,
            str(s.num_train),
            f"{s.sample_rate:.3f}",
            str(s.steps),
            sigma,
            "inf" if math.isinf(s.epsilon) else f"{s.epsilon:.3f}",
        )
    _table_console().print(sites)
    console.print(plan.explanation)
    # run-config values are TOML: a string goes in single quotes inside the shell's double ones
    keys_set = " ".join(
        f"{k}='{v}'" if isinstance(v, str) else f"{k}={v:g}" for k, v in plan.settings.items()
    )
    console.print(f'Use it with: flwr run . --run-config "{keys_set}"')


def _value(v: Any) -> str:
    return v if isinstance(v, str) else f"{v:g}"


@app.command()
def plan(
    data: Path = typer.Option(..., "--data", help="Folder of site folders (counts read here)."),
    epsilon: float = typer.Option(8.0, "--epsilon", help="Each site's epsilon for the run."),
    delta: float = typer.Option(1e-5, "--delta", help="Each site's delta."),
    sites: int | None = typer.Option(None, "--sites", min=1, help="Use the first N sites."),
    overrides: list[str] = typer.Option(
        [], "--set", help="Run-config keys; a planned key you set is kept (auto = plan it)."
    ),
) -> None:
    """Choose rounds, epochs, batch size, noise, clipping, rate and text buckets for these sites."""
    check_privacy_args(epsilon=epsilon, delta=delta)
    # lazy: loads torch (seconds); `fedfuse --help` and the light commands start without it
    from fedfuse.client.site import simulation_site_dirs
    from fedfuse.common.privacy.planning import plan_for_sites

    if not data.is_dir():
        _fail(f"--data '{data}' is not a folder (give a folder of site folders)")
    raw = {
        "target-epsilon": epsilon,
        "target-delta": delta,
        "data-dir": str(data),
        **_parse_overrides(overrides),
    }
    try:
        dirs = simulation_site_dirs(str(data))[:sites]
        if not dirs:
            _fail(f"--data '{data}' holds no site folders")
        found, _ = plan_for_sites(dirs, raw, build=RunConfig.from_mapping)
    except FedfuseError as exc:
        _fail(str(exc))
    if found is None:
        _fail("only record-level DP (dp-level record) and training without DP are planned")
    _print_plan(found)


def _resolve_data(
    spec: Any, *, data: Path | None, sites: int | None, seed: int, name: str
) -> tuple[Path, int]:
    """The folder of site folders to use (synthetic data made once when none is given)."""
    if data is None:
        console.print(f"Synthetic data for {spec.sites} sites (scenario {name}) ...")
        return ensure_data(spec, seed=seed), spec.sites
    if not data.is_dir():
        _fail(f"--data '{data}' is not a folder (give a folder of site folders)")
    if sites is None:
        sites = sum(1 for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
        if sites == 0:
            _fail(f"--data '{data}' holds no site folders")
    return data, sites


def _run_simulation(
    cfg: Any,
    sites: int,
    *,
    verbose: bool,
    cpus_per_site: float = 1.0,
    gpus_per_site: float | None = None,
    track: str = "",
    track_uri: str = "",
    engine: str = "simulation",
) -> None:
    # lazy: loads torch (seconds); `fedfuse --help` and the light commands start without it
    from fedfuse.simulations.runner import simulate as run

    cfg, tracker, where = _open_tracker(cfg, track, track_uri)

    eps_text = "no DP" if not cfg.private else f"epsilon {cfg.target_epsilon:g}"
    console.print(
        f"[bold]fedfuse[/] simulating {sites} sites x {cfg.num_rounds} rounds, "
        f"{eps_text}, delta {cfg.target_delta:g}, "
        f"{'SecAgg+' if cfg.secagg else 'no secure aggregation'}, data {cfg.data_dir}"
    )
    if cfg.private:
        console.print(
            "  (simulated sites draw DP noise from keyed, reproducible generators; a deployed "
            "site draws it from a secure one)"
        )

    bar = RoundProgress(console, rounds=cfg.num_rounds, secagg=cfg.secagg)

    def on_round(rec: dict[str, Any]) -> None:
        if tracker is not None:
            tracker.log_round(rec)
        bar.round_done()
        eps = rec.get("max-epsilon")
        eps_s = "-" if eps is None else f"{eps:.3f}"
        auc = rec.get("eval-auroc")
        # Training loss stays at the sites unless they share it (README: what crosses the wire).
        train = rec.get("train-loss")
        console.print(
            f"  round {rec['round']}/{cfg.num_rounds}  sites {rec.get('num-sites', 0)}  "
            + (f"train loss {_num(train)}  " if train is not None else "")
            + f"test loss {_num(rec.get('eval-loss'))}  "
            f"test AUROC {_num(auc)}  max epsilon {eps_s} (target {cfg.target_epsilon:g})  "
            f"[{rec.get('seconds', 0):.1f}s]"
        )
        left_out = {**rec.get("failed", {}), **rec.get("rejected", {}), **rec.get("refused", {})}
        for name, reason in left_out.items():
            console.print(f"    [yellow]site {name} left out:[/] {reason}")
        if rec.get("status") == "failed":
            err_console.print(f"    [bold red]round {rec['round']} failed:[/] {rec.get('error')}")
        if rec.get("stopped"):
            console.print(f"  [bold red]run stopped:[/] {rec['stopped']}")

    try:
        with bar:  # a progress bar on a terminal only; logs get the lines above
            run_dir = run(
                cfg,
                num_sites=sites,
                on_round=on_round,
                verbose=verbose,
                cpus_per_site=cpus_per_site,
                gpus_per_site=gpus_per_site,
                engine=engine,
            )
    except FedfuseError as exc:
        _close_tracker(tracker, where)
        _fail(str(exc))
    _close_tracker(tracker, where)
    privacy = _print_privacy(run_dir)
    if cfg.holdout_site:
        _print_holdout(run_dir)
    console.print(f"Run directory: [bold]{run_dir}[/]")
    if privacy.get("status", "completed") != "completed":
        _fail(f"the run {privacy['status']}: {privacy.get('reason', '')}", code=1)


def _print_holdout(run_dir: Path) -> None:
    """One line on the held-out site's figures, when the run held one out."""
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    held = json.loads(lines[-1]).get("holdout") if lines else None
    if not held:
        return
    if "error" in held:
        console.print(f"Held-out site {held.get('site')}: not evaluated ({held['error']})")
        return
    console.print(
        f"Held-out site {held['site']} (never trained, no budget spent): "
        f"{int(held.get('eval-records', 0))} records, test AUROC {_num(held.get('eval-auroc'))}, "
        f"specificity {_num(held.get('eval-specificity'))} at sensitivity >= "
        f"{held.get('eval-sensitivity-target', 0.9):g} (its own figures, in summary.md)"
    )


def _open_tracker(cfg: Any, track: str, uri: str) -> tuple[Any, Any, Path | None]:
    """(the run config, the tracker ``--track`` names or None, the run directory it logs);
    fails in one line, before any site starts, when the tracker cannot be opened."""
    if not track:
        if uri:
            _fail("--track-uri needs --track mlflow")
        return cfg, None, None
    # lazy: loads torch (seconds); `fedfuse --help` and the light commands start without it
    from fedfuse.server.rundir import new_run_id

    if not cfg.run_name and not cfg.resume_from:
        # the tracker needs the folder's name now
        cfg = cfg.replace(run_name=new_run_id(cfg, cfg.out_dir))
    where = Path(cfg.resume_from) if cfg.resume_from else Path(cfg.out_dir) / cfg.run_name
    try:
        tracker = open_tracker(track, run_dir=where, uri=uri or None)
        tracker.start(cfg.to_mapping())
    except FedfuseError as exc:
        _fail(str(exc))
    return cfg, tracker, where


def _close_tracker(tracker: Any, where: Path | None) -> None:
    """Log the run's end (its status, held-out site and files) to the tracker, if any."""
    if tracker is None or where is None:
        return
    status_file = where / "status.json"
    status = (
        json.loads(status_file.read_text()).get("status", "failed")
        if status_file.exists()
        else "failed"
    )
    tracker.finish(where if where.is_dir() else None, status=status)


def _num(x: Any) -> str:
    return "-" if x is None else f"{x:.4f}"


def _print_privacy(run_dir: Path) -> dict[str, Any]:

    privacy = json.loads((run_dir / "privacy.json").read_text())
    sites = privacy["sites"]

    def num(key: str, fmt: str = ".4f") -> Callable[[dict[str, Any]], str]:
        return lambda s: "-" if s.get(key) is None else format(float(s[key]), fmt)

    columns: dict[str, Callable[[dict[str, Any]], str]] = {
        "run epsilon": num("epsilon"),
        "delta": num("delta", "g"),
        "target": num("target_epsilon", "g"),
        "noise multiplier": num("noise_multiplier"),
        "rounds": lambda s: str(s["rounds"]),
        "lifetime before": num("lifetime_epsilon_start"),
        "lifetime after": num("lifetime_epsilon"),
        "site budget": num("epsilon_budget", "g"),
        "refused": lambda s: ", ".join(f"round {r['round']}" for r in s.get("refused", [])) or "-",
    }
    # What a site keeps to itself unless it opts in (README: What crosses the wire): a column
    # of dashes tells a reader nothing, so it is left out and a line says where to look.
    own = ("noise multiplier", "lifetime before", "lifetime after", "site budget")
    hidden = [c for c in own if all(columns[c](s) == "-" for s in sites.values())]
    for c in hidden:
        del columns[c]
    table = Table(
        title="Privacy spent per site (record-level): this run, and lifetime (ledger)"
        if "lifetime after" in columns
        else "Privacy spent per site in this run (record-level)"
    )
    for col in ("site", *columns):
        table.add_column(col)
    for name, s in sites.items():
        table.add_row(name, *(cell(s) for cell in columns.values()))
    _table_console().print(table)
    if hidden:
        console.print(
            f"Not shown: {', '.join(hidden)}. They stay at each site "
            "unless it shares them (README: What crosses the wire); `fedfuse audit SITE_FOLDER` "
            "shows a site's from its own ledger.",
            soft_wrap=True,
            highlight=False,
        )
    client = privacy.get("client_level")
    if client:
        console.print(
            f"Client-level DP (each site's whole contribution): epsilon "
            f"{float(client['epsilon']):.4f} at delta {client['delta']:g}, noise multiplier "
            f"{client['noise_multiplier']:g}, update clip {client['clip_norm']:g}, "
            f"{client['rounds']} rounds ({client['accountant'].upper()})"
        )
        if "sampling_assumption" in client:
            console.print(
                f"  the coordinator's figure: {client['sampling_assumption']} (epsilon at rate "
                f"1: {float(client['epsilon_unamplified']):.4f})"
            )
    return privacy


@audit_app.command("empirical")
def audit_empirical(
    sites: int = typer.Option(2, "--sites", min=1, help="Virtual sites."),
    rounds: int = typer.Option(3, "--rounds", min=1, help="Federated rounds."),
    epsilon: float = typer.Option(2.0, "--epsilon", help="Each site's target epsilon."),
    delta: float = typer.Option(1e-5, "--delta", help="Each site's delta."),
    canaries: int = typer.Option(1000, "--canaries", min=2, help="Canaries at the audit site."),
    guesses: int = typer.Option(200, "--guesses", min=1, help="Guesses made (the rest abstain)."),
    guesses_in: int = typer.Option(
        0, "--guesses-in", min=0, help="How many of the guesses say 'in' (highest scores)."
    ),
    white_box: bool = typer.Option(
        False, "--white-box", help="Score by gradient alignment with the model update."
    ),
    no_dp: bool = typer.Option(False, "--no-dp", help="Control: train without DP."),
    data: Path | None = typer.Option(
        None, "--data", help="Folder of site folders (default: make synthetic)."
    ),
    records: int = typer.Option(
        200, "--records", min=10, help="Records per synthetic site (without --data)."
    ),
    audit_site: int = typer.Option(0, "--audit-site", min=0, help="Index of the audit site."),
    out: Path | None = typer.Option(
        None, "--out", help="Output folder (default: runs/audit-<time>)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of data, canaries, model and noise."),
    overrides: list[str] = typer.Option(
        [], "--set", help="Any run-config key, e.g. --set local-epochs=3."
    ),
    verbose: bool = typer.Option(False, "--verbose", help="Show Flower's and Ray's logs."),
) -> None:
    """Test a claimed epsilon with canaries in one training run (exit 3 on VIOLATION)."""
    check_privacy_args(epsilon=epsilon, delta=delta)

    # lazy: loads torch (seconds); `fedfuse --help` and the light commands start without it
    from fedfuse.simulations.empirical_audit import AuditSettings, print_audit, run_empirical_audit

    try:
        settings = AuditSettings(
            out=out or Path("runs") / time.strftime("audit-%Y%m%d-%H%M%S"),
            sites=sites,
            rounds=rounds,
            epsilon=math.inf if no_dp else epsilon,
            delta=delta,
            canaries=canaries,
            guesses=guesses,
            guesses_in=guesses_in,
            white_box=white_box,
            data=data,
            records=records,
            audit_site=audit_site,
            seed=seed,
            overrides=_parse_overrides(overrides),
        )
        result = run_empirical_audit(settings, console=console, verbose=verbose)
    except FedfuseError as exc:
        _fail(str(exc))
    print_audit(result, console)
    if result.verdict == "VIOLATION":
        raise typer.Exit(3)


experiment_app = typer.Typer(
    help="Sweeps of simulated federations, with CSV and plots.", no_args_is_help=True
)
app.add_typer(experiment_app, name="experiment")


def _floats(text: str, flag: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        _fail(f"{flag} must be a comma-separated list of numbers (inf allowed); found {text!r}")
    if not vals:
        _fail(f"{flag} is empty")
    return vals


def _experiment_setup(
    scenario: str, sites: int | None, data: Path | None, seed: int, overrides: list[str]
) -> tuple[Any, Path, int]:

    try:
        scen = load_scenario(scenario)
        cfg = scen.run_config(**_parse_overrides(overrides))
    except FedfuseError as exc:
        _fail(str(exc))
    spec = replace(scen.data, sites=sites or scen.data.sites)
    data_dir, n = _resolve_data(spec, data=data, sites=sites, seed=seed, name=scen.name)
    return cfg.replace(data_dir=str(data_dir)), data_dir, n


@experiment_app.command("utility-vs-epsilon")
def experiment_utility(
    epsilons: str = typer.Option("1,2,4,8,inf", "--epsilons", help="Comma-separated; inf = no DP."),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Comma-separated seeds."),
    scenario: str = typer.Option(
        "hospitals-3", "--scenario", help="Built-in scenario name or a scenario .toml file."
    ),
    sites: int | None = typer.Option(
        None, "--sites", min=1, help="Virtual sites (default: the scenario's)."
    ),
    data: Path | None = typer.Option(
        None, "--data", help="Folder of site folders (default: make synthetic sites)."
    ),
    out: Path = typer.Option(
        Path("runs/utility-vs-epsilon"), "--out", help="Where the CSV and PNG go."
    ),
    overrides: list[str] = typer.Option(
        [], "--set", help="Any run-config key, e.g. --set fusion=concat."
    ),
) -> None:
    """Test AUROC against epsilon (with a centralised non-private ceiling): CSV + PNG."""
    eps = _floats(epsilons, "--epsilons")
    for e in eps:
        check_privacy_args(epsilon=e, delta=0.5)
    seed_list = [int(x) for x in _floats(seeds, "--seeds")]
    cfg, _, n = _experiment_setup(scenario, sites, data, seed_list[0], overrides)
    # lazy: loads torch (seconds); `fedfuse --help` and the light commands start without it
    from fedfuse.simulations.experiments import utility_vs_epsilon

    csv_path = utility_vs_epsilon(
        cfg, num_sites=n, epsilons=eps, seeds=seed_list, out=out, progress=console.print
    )
    console.print(f"Results: {csv_path} and {csv_path.with_suffix('.png')}")


@experiment_app.command("fusion")
def experiment_fusion(
    seeds: str = typer.Option("0", "--seeds", help="Comma-separated seeds."),
    scenario: str = typer.Option(
        "hospitals-3", "--scenario", help="Built-in scenario name or a scenario .toml file."
    ),
    sites: int | None = typer.Option(
        None, "--sites", min=1, help="Virtual sites (default: the scenario's)."
    ),
    data: Path | None = typer.Option(
        None, "--data", help="Folder of site folders (default: make synthetic sites)."
    ),
    out: Path = typer.Option(Path("runs/fusion"), "--out", help="Where the CSV and PNG go."),
    overrides: list[str] = typer.Option(
        [], "--set", help="Any run-config key, e.g. --set fusion=concat."
    ),
) -> None:
    """Test AUROC of each fusion head (and each single modality): CSV + PNG."""
    seed_list = [int(x) for x in _floats(seeds, "--seeds")]
    cfg, _, n = _experiment_setup(scenario, sites, data, seed_list[0], overrides)
    # lazy: loads torch (seconds); `fedfuse --help` and the light commands start without it
    from fedfuse.simulations.experiments import fusion_comparison

    csv_path = fusion_comparison(cfg, num_sites=n, seeds=seed_list, out=out, progress=console.print)
    console.print(f"Results: {csv_path} and {csv_path.with_suffix('.png')}")


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., "--out", help="Folder to write the site folders into."),
    sites: int = typer.Option(3, "--sites", min=1, help="Number of site folders."),
    records: int = typer.Option(1000, "--records", min=10, help="Records per site (average)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data (same seed, same sites)."),
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
    # lazy: loads torch (seconds); `fedfuse --help` and the light commands start without it
    from fedfuse.common.data.synthetic import generate
    from fedfuse.synthetic_cli import parse_absent

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
    site: Path = typer.Argument(
        ...,
        help="A site folder (holding manifest.csv), or a folder of site folders (as `fedfuse "
        "simulate --data` takes): each is checked.",
    ),
    classes: str = typer.Option(
        "no_finding,pneumonia",
        "--classes",
        help="Label names the run knows (comma-separated); 'any' skips the label check.",
    ),
    task: str = typer.Option("single-label", "--task", help="single-label or multi-label."),
    dicom_frame: int = typer.Option(0, "--dicom-frame", min=0, help="Frame of multi-frame DICOMs."),
):
    """Validate a site folder, or each of a folder's, without changing it; exit 1 on problems.

    Every problem is listed with its file and row; one found in many rows of a file, once."""
    # lazy: loads torch (seconds); `fedfuse --help` and the light commands start without it
    from fedfuse.common.data.check import check_site, summary_lines
    from fedfuse.common.data.manifest import MANIFEST_NAMES

    if task not in ("single-label", "multi-label"):
        _fail(f"--task must be one of single-label, multi-label; found {task!r}")
    names = (
        None
        if classes.strip() == "any"
        else tuple(c.strip() for c in classes.split(",") if c.strip())
    )
    sites = [site]
    if site.is_dir() and not any((site / n).is_file() for n in MANIFEST_NAMES):
        # A folder of site folders: those holding a manifest, in simulate's order.
        children = sorted(
            d
            for d in site.iterdir()
            if d.is_dir() and any((d / n).is_file() for n in MANIFEST_NAMES)
        )
        sites = children or sites
    failed = 0
    for one in sites:
        if len(sites) > 1:
            console.print(f"{one.name}:", markup=False)
        try:
            m = check_site(
                one, classes=names, multi_label=task == "multi-label", dicom_frame=dicom_frame
            )
        except DataValidationError as exc:
            # One line per problem (a recurring one grouped), each naming the site, file and row.
            failed += 1
            err_console.print(
                f"{exc.head()}; fix them and run again (nothing was changed):",
                soft_wrap=True,
                markup=False,
            )
            for line in exc.lines():
                err_console.print(f"  - {_site_line(one, line)}", soft_wrap=True, markup=False)
            for line in exc.advice():
                err_console.print(line, soft_wrap=True, markup=False)
            continue
        for warning in m.warnings:
            err_console.print(f"warning: {_site_line(one, warning)}", soft_wrap=True, markup=False)
        for line in summary_lines(m):
            console.print(line, markup=False)
    if failed:
        if len(sites) > 1:
            err_console.print(f"{failed} of {len(sites)} site folders have problems (above)")
        raise typer.Exit(1)


def _site_line(site: Path, line: str) -> str:
    """``line`` prefixed with the site folder's name unless it already names a path."""
    name = site.resolve().name
    return line if line.startswith(("/", f"{name}/")) else f"{name}/{line}"


@app.command()
def explain(
    run_dir: Path = typer.Argument(..., help="A finished run directory (runs/<id>)."),
    data: Path = typer.Option(..., "--data", help="A site folder to evaluate on."),
    split: str = typer.Option("test", "--split", help="train, val or test."),
) -> None:
    """Per-modality contributions of a run's global model on one site's data."""
    # lazy: loads torch (seconds); `fedfuse --help` and the light commands start without it
    from fedfuse.common.explain import explain_run, report_rows, run_status, task_rows

    try:
        cfg, report = explain_run(run_dir, data, split=split)
    except FedfuseError as exc:
        _fail(str(exc))
    status, why = run_status(run_dir)
    if status != "completed":
        # The model of a failed or stopped run is the last one it kept, maybe the initial one.
        err_console.print(
            f"{run_dir}: the run {status}" + (f" ({why})" if why else "") + "; explaining the "
            "last model it kept, not a finished run's.",
            soft_wrap=True,
        )
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
    if report.get("tasks"):
        tasks = Table(
            title="Tasks (records labelled for the task; AUROC drop with a modality hidden)"
        )
        for col in ("task", "labelled records", "AUROC", "accuracy"):
            tasks.add_column(col)
        for m in cfg.modality_names:
            tasks.add_column(f"drop {m}")
        for row in task_rows(report):
            tasks.add_row(*row)
        console.print(tasks)


# `fedfuse audit PATH` (the audit group's default command) = `fedfuse audit ledger PATH`.
@audit_app.command("ledger")
def audit_ledger(
    path: Path = typer.Argument(
        ..., help="A ledger file, a site folder, a folder of site folders, or a run directory."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (every event) instead."),
    plot: Path | None = typer.Option(None, "--plot", help="Write epsilon vs rounds to this PNG."),
    budget: float | None = typer.Option(
        None, "--budget", help="Also fail (exit 1) if a site's lifetime epsilon exceeds this."
    ),
) -> None:
    """Verify privacy ledgers and recompute epsilon with two accountants.

    Exit status: 0 all good, 1 a budget exceeded, 2 a ledger tampered or inconsistent.
    """
    # lazy: loads torch (seconds); `fedfuse --help` and the light commands start without it
    from fedfuse.common.privacy.ledger_audit import audit as run_audit
    from fedfuse.ledger_report import plot_epsilon, print_report

    try:
        report = run_audit(path, budget=budget)
    except FedfuseError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        print_report(report, console=console, table_console=_table_console())
    if plot is not None:
        plot_epsilon(report, plot)
        if not as_json:
            console.print(f"Plot: {plot}")
    raise typer.Exit(report.exit_code)


ledger_app = typer.Typer(help="A site's privacy ledger: reset it on purpose.", no_args_is_help=True)
app.add_typer(ledger_app, name="ledger")


@ledger_app.command("reset")
def ledger_reset(
    site: Path = typer.Argument(..., help="The site folder (its data path)."),
    reason: str = typer.Option(..., "--reason", help="Why (recorded in the new ledger)."),
    ledger_path: Path | None = typer.Option(
        None, "--ledger-path", help="The ledger file, if the node config keeps it elsewhere."
    ),
) -> None:
    """Start a new, empty ledger on purpose; the old one is kept and the reset recorded.

    The reset is recorded in the new ledger and the site's authenticated head (`fedfuse
    audit` shows it)."""
    # lazy: loads torch (seconds); `fedfuse --help` and the light commands start without it
    from fedfuse.common.privacy.anchor import reset_ledger

    if not site.is_dir():
        _fail(f"ledger reset: '{site}' is not a site folder")
    try:
        r = reset_ledger(state_dir(site), reason=reason, ledger_path=ledger_path)
    except FedfuseError as exc:
        _fail(str(exc))
    kept = f"the old ledger is kept as {r.kept_as}" if r.kept_as else "there was no ledger file"
    console.print(
        f"Ledger of {site} reset at {r.time} ({r.previous_count} earlier entries; {kept}); "
        "its lifetime epsilon starts again from 0."
    )


# Deployment: fedfuse certs / server run / server connect / site run (fedfuse/deploy_cli.py).
register_deploy_commands(app)
# Run report (fedfuse/report.py); predict and export (fedfuse/export.py).
register_report_command(app)
register_export_commands(app)
register_split_command(data_app)  # fedfuse data split (fedfuse/split_cli.py)


def main() -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
        app()
    except FedfuseError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
