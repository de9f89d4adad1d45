"""Run a whole federation on one machine with Flower's simulation engine (in-process, Ray).

Same ServerApp and ClientApp as a deployment; only the transport differs.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from flwr.common.logger import update_console_handler
from flwr.simulation import run_simulation

from fedfuse.client.app import app as client_app
from fedfuse.client.site import simulation_site_dirs
from fedfuse.common.config import RunConfig
from fedfuse.common.data.check import check_trainable
from fedfuse.common.data.dataset import manifest_for
from fedfuse.common.errors import ConfigError, DataValidationError, FedfuseError
from fedfuse.server.app import make_server_app
from fedfuse.server.rundir import RoundCallback, new_run_id
from fedfuse.simulations.holdout import holdout_evaluator, holdout_site_dir
from fedfuse.simulations.inprocess import run_in_process

# How a local federation runs (``fedfuse simulate --engine``): Flower's simulation engine (Ray),
# or the same apps in this process, the sites one after another.
ENGINES = ("simulation", "inprocess")


class FederationFailedError(FedfuseError):
    """The federation ran but did not complete (e.g. a secure-aggregation round failed)."""


def quiet_flower(*, verbose: bool = False) -> None:
    """No telemetry (a privacy tool must not phone home) and no INFO flood."""
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not verbose:
        # Read by Flower at import in each Ray worker (they inherit this environment): no
        # "Manually terminating ClientAppActor" warning per site at shutdown.
        os.environ.setdefault("FLWR_LOG_LEVEL", "ERROR")
    if not sys.stderr.isatty():
        # Lines a site's worker prints reach us through Ray, wrapped in colour codes that a log
        # file or CI output shows raw: none unless the output is a terminal.
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")

        update_console_handler(colored=False)


def validate_sites(
    site_dirs: list[Path], cfg: RunConfig, *, evaluate_only: Path | None = None
) -> None:
    """Validate every site folder before anything trains; one error lists every problem.
    ``evaluate_only`` (a held-out site) needs readable records, not trainable ones."""
    errors: dict[Path, DataValidationError] = {}
    for d in [*site_dirs, *([evaluate_only] if evaluate_only else [])]:
        try:
            manifest = manifest_for(d, cfg)
            if d != evaluate_only:
                check_trainable(manifest)
        except DataValidationError as exc:
            errors[d] = exc
    if errors:
        raise DataValidationError.of_sites(errors, source=str(site_dirs[0].parent))


def _machine_cpus() -> int:
    """CPUs Ray will see (it honours cgroup limits; os.cpu_count does not)."""
    try:
        # lazy: Ray is the optional simulation extra (a site installs without it)
        from ray._private.utils import get_num_cpus

        return int(get_num_cpus())
    except Exception:  # noqa: BLE001  (a private Ray helper: fall back to the OS's count)
        return os.cpu_count() or 1


def check_resources(
    *, cpus_per_site: float, gpus_per_site: float | None
) -> tuple[float, list[str]]:
    """The GPU share to request per site, and warnings to show; raises ConfigError for a
    request no site could ever get (Ray would wait for it forever: "ActorPool is empty")."""
    notes: list[str] = []
    cpus = _machine_cpus()
    if cpus_per_site > cpus:
        raise ConfigError(
            f"--cpus-per-site {cpus_per_site:g} is more than this machine's {cpus} CPUs; "
            f"no site could start (give at most {cpus})"
        )
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus_per_site is None:
        return (0.5 if gpus else 0.0), notes
    if gpus_per_site > 0 and gpus == 0:
        notes.append(
            f"--gpus-per-site {gpus_per_site:g} but no GPU is visible: the sites train on the CPU"
        )
        return 0.0, notes
    if gpus_per_site > gpus:
        raise ConfigError(
            f"--gpus-per-site {gpus_per_site:g} is more than this machine's {gpus} GPUs; "
            f"no site could start (give at most {gpus})"
        )
    return gpus_per_site, notes


def check_out_dir(out: Path) -> None:
    """Make ``out`` (where run directories go) and prove it writable, or raise ConfigError in
    one line: a bad ``--out`` must fail here, not inside the server after the sites started."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".fedfuse-write-test-"):
            pass
    except FileExistsError:
        raise ConfigError(f"--out '{out}': a file is in the way; give a folder") from None
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise ConfigError(
            f"--out '{out}': cannot write there ({why}); give a writable folder"
        ) from None


def backend_config(*, cpus_per_site: float = 1.0, gpus_per_site: float | None = None) -> dict:
    gpus_per_site, notes = check_resources(cpus_per_site=cpus_per_site, gpus_per_site=gpus_per_site)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return {
        "client_resources": {"num_cpus": cpus_per_site, "num_gpus": gpus_per_site},
        "init_args": {"include_dashboard": False, "logging_level": "error", "log_to_driver": True},
    }


def simulate(
    cfg: RunConfig,
    *,
    num_sites: int,
    on_round: RoundCallback | None = None,
    verbose: bool = False,
    cpus_per_site: float = 1.0,
    gpus_per_site: float | None = None,
    engine: str = "simulation",
) -> Path:
    """Run the federation described by ``cfg`` over ``num_sites`` virtual sites.

    ``engine``: ``simulation``, Flower's simulation engine (Ray: the sites in parallel, each
    with ``cpus_per_site`` CPUs and ``gpus_per_site`` of a GPU), or ``inprocess``, the same
    ServerApp and ClientApp in this process, the sites one after another
    (fedfuse.simulations.inprocess). Returns the run directory. Leaves no process behind (Ray
    is shut down at the end).
    """
    if engine not in ENGINES:
        raise ConfigError(f"engine '{engine}' is not one of: {', '.join(ENGINES)}")
    quiet_flower(verbose=verbose)
    dirs = simulation_site_dirs(cfg.data_dir, holdout=cfg.holdout_site)
    if num_sites > len(dirs):
        held = f" besides held-out site '{cfg.holdout_site}'" if cfg.holdout_site else ""
        raise ConfigError(
            f"--sites {num_sites} but data folder '{cfg.data_dir}' holds {len(dirs)} site "
            f"folders{held}"
        )
    holdout = holdout_evaluator(cfg)
    validate_sites(dirs[:num_sites], cfg, evaluate_only=holdout_site_dir(cfg))
    check_out_dir(Path(cfg.out_dir))
    # Ray's resources (in process, every site trains on this process's device)
    bconf = (
        backend_config(cpus_per_site=cpus_per_site, gpus_per_site=gpus_per_site)
        if engine == "simulation"
        else {}
    )
    if num_sites < cfg.min_sites:
        cfg = cfg.replace(min_sites=num_sites)

    run_id = new_run_id(cfg) if cfg.resume_from else new_run_id(cfg, cfg.out_dir)
    run_dir = Path(cfg.out_dir) / run_id
    if cfg.resume_from:  # a resumed run continues in its own directory (server/checkpoint.py)
        run_dir = Path(cfg.resume_from)
    elif (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"run directory {run_dir} already holds a run; choose another run name")
    server_app = make_server_app(
        cfg.to_mapping(),
        on_round=on_round,
        run_id=run_id,
        expect_sites=num_sites,
        holdout=holdout,
    )
    flwr_logger = logging.getLogger("flwr")
    old_level = flwr_logger.level
    if not verbose:
        flwr_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            (run_simulation if engine == "simulation" else run_in_process)(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=num_sites,
                backend_config=bconf,  # type: ignore[arg-type]
                verbose_logging=verbose,
            )
    finally:
        flwr_logger.setLevel(old_level)
        _shutdown_ray()
    if not (run_dir / "privacy.json").exists():
        raise RuntimeError(f"the federation did not finish; see the log and {run_dir}")
    check_run_status(run_dir)
    return run_dir


def _shutdown_ray() -> None:
    """Stop the Ray runtime the simulation engine started (none under ``inprocess``)."""
    if sys.modules.get("ray") is None:
        return  # no engine run in this process imported Ray (or it cannot be imported)
    # lazy: Ray is the optional simulation extra (a site installs without it)
    import ray

    if ray.is_initialized():
        ray.shutdown()


def federate_in_process(
    cfg: RunConfig,
    *,
    num_sites: int,
    on_round: RoundCallback | None = None,
    verbose: bool = False,
) -> Path:
    """:func:`simulate` over the in-process engine: for tests and benchmarks that plant a fault
    in this process (tests/support/faults.py), which Ray's worker processes would not see."""
    return simulate(
        cfg, num_sites=num_sites, on_round=on_round, verbose=verbose, engine="inprocess"
    )


def check_run_status(run_dir: Path) -> None:
    """Raise unless the run directory records a completed run: never a silent failure."""
    status_file = run_dir / "status.json"
    status = json.loads(status_file.read_text()) if status_file.exists() else {}
    if status.get("status") != "completed":
        raise FederationFailedError(
            f"the run {status.get('status', 'did not record its status')}: "
            f"{status.get('reason', '')} (see {run_dir / 'summary.md'})"
        )
