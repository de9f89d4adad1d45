"""Experiment tracking: a run's rounds, config and files in TensorBoard or MLflow.

``fedfuse simulate --track tensorboard|mlflow`` logs every round's row of ``metrics.jsonl``
as it is written (the federation's figures, each site's epsilon) and, at the end, the held-out
site's figures, the run config as parameters and the report, summary, privacy summary and
model as artifacts (MLflow; TensorBoard keeps its event files in ``<run>/tensorboard/``).
``fedfuse track RUN_DIR`` logs a finished run the same way. The trackers see only what the
run directory holds: nothing a site did not send.

Both libraries are the optional ``track`` extra, imported only here and only when asked for.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from fedfuse.common.errors import ConfigError
from fedfuse.server.report import HOLDOUT_KEY

TRACKERS = ("tensorboard", "mlflow")
TENSORBOARD_DIR = "tensorboard"
MLFLOW_EXPERIMENT = "fedfuse"
# The files of a finished run that MLflow keeps as artifacts (those present).
ARTIFACTS = (
    "report.html",
    "summary.md",
    "privacy.json",
    "config.json",
    "metrics.jsonl",
    "model.pt",
    "learning_curve.png",
    "epsilon.png",
)
_EXTRA = "pip install 'fedfuse[track]'"
# Keys of a round row that are not figures.
_NOT_FIGURES = {"round"}


class Tracker(Protocol):
    """What the command line drives: the config once, each round's row, then the run's files."""

    def start(self, config: Mapping[str, Any]) -> None: ...

    def log_round(self, row: Mapping[str, Any]) -> None: ...

    def finish(self, run_dir: Path | None, *, status: str) -> None: ...


def _name(key: str) -> str:
    """A metric or parameter name both trackers accept (MLflow allows ``[\\w\\-. /]``)."""
    return re.sub(r"[^\w\-. /]", "_", key)


def round_scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of one ``metrics.jsonl`` row, flat: the federation's figures by
    their own keys, ``epsilon/<site>`` per site, ``holdout/<figure>`` for the held-out site."""
    out: dict[str, float] = {}

    def put(key: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(float(value)):
                out[_name(key)] = float(value)

    for key, value in row.items():
        if key not in _NOT_FIGURES:
            put(key, value)
    for site, figures in (row.get("sites") or {}).items():
        if isinstance(figures, Mapping):
            put(f"epsilon/{site}", figures.get("epsilon"))
    held = row.get(HOLDOUT_KEY)
    if isinstance(held, Mapping):
        for key, value in held.items():
            if key != "round":
                put(f"{HOLDOUT_KEY}/{key}", value)
    return out


def holdout_row(run_dir: Path | None) -> dict[str, Any] | None:
    """The last round's row cut to its held-out site's figures (added when the run finished,
    after that round was logged), or None."""
    metrics = Path(run_dir) / "metrics.jsonl" if run_dir is not None else None
    if metrics is None or not metrics.is_file():
        return None
    lines = [x for x in metrics.read_text().splitlines() if x.strip()]
    last = json.loads(lines[-1]) if lines else {}
    if HOLDOUT_KEY not in last:
        return None
    return {"round": last.get("round", 0), HOLDOUT_KEY: last[HOLDOUT_KEY]}


def _missing_extra(kind: str, exc: ImportError) -> ConfigError:
    return ConfigError(
        f"--track {kind} needs the optional 'track' extra ({exc.name} is not installed): {_EXTRA}"
    )


class TensorBoardTracker:
    """Event files under ``log_dir`` (``<run>/tensorboard/``), one step per round."""

    def __init__(self, log_dir: Path) -> None:
        try:
            # lazy: tensorboard is the optional 'track' extra
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise _missing_extra("tensorboard", exc) from None
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def start(self, config: Mapping[str, Any]) -> None:
        rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(config.items()))
        self.writer.add_text("config", "| key | value |\n|---|---|\n" + rows, global_step=0)

    def log_round(self, row: Mapping[str, Any]) -> None:
        step = int(row.get("round", 0))
        for key, value in round_scalars(row).items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def finish(self, run_dir: Path | None, *, status: str) -> None:
        held = holdout_row(run_dir)
        if held is not None:
            self.log_round(held)
        self.writer.add_text("status", status, global_step=0)
        self.writer.close()


class MlflowTracker:
    """One MLflow run in experiment ``fedfuse`` of the store at ``uri`` (``sqlite:///...`` or a
    local ``file:`` folder); artifacts beside a SQLite store, in ``mlflow-artifacts/``."""

    def __init__(self, uri: str, *, run_name: str) -> None:
        if not uri.startswith(("sqlite:///", "file:")):
            raise ConfigError(
                f"--track-uri '{uri}': give a local MLflow store, 'sqlite:///PATH.db' or "
                "'file:///FOLDER' (fedfuse sends nothing over the network)"
            )
        if uri.startswith("file:"):
            # MLflow 3 keeps its file store only on request; the user named one.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            # lazy: mlflow is the optional 'track' extra
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise _missing_extra("mlflow", exc) from None
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            artifacts = None
            if uri.startswith("sqlite:///"):
                # Else MLflow puts them in ./mlruns of whatever folder the command ran in.
                db = Path(uri.removeprefix("sqlite:///"))
                artifacts = (db.resolve().parent / "mlflow-artifacts").as_uri()
            experiment_id = self.client.create_experiment(
                MLFLOW_EXPERIMENT, artifact_location=artifacts
            )
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def start(self, config: Mapping[str, Any]) -> None:
        # lazy: mlflow is the optional 'track' extra (installed: __init__ imported it)
        from mlflow.entities import Param

        params = [Param(_name(k), str(v)[:6000]) for k, v in sorted(config.items())]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log_round(self, row: Mapping[str, Any]) -> None:
        # lazy: mlflow is the optional 'track' extra (installed: __init__ imported it)
        from mlflow.entities import Metric

        step = int(row.get("round", 0))
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in round_scalars(row).items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def finish(self, run_dir: Path | None, *, status: str) -> None:
        held = holdout_row(run_dir)
        if held is not None:
            self.log_round(held)
        if run_dir is not None:
            for name in ARTIFACTS:
                if (Path(run_dir) / name).is_file():
                    self.client.log_artifact(self.run_id, str(Path(run_dir) / name))
        self.client.set_tag(self.run_id, "fedfuse.status", status)
        self.client.set_terminated(self.run_id, "FINISHED" if status == "completed" else "FAILED")


def open_tracker(kind: str, *, run_dir: Path, uri: str | None = None) -> Tracker:
    """The tracker ``kind`` names for the run that lives (or will live) in ``run_dir``.

    ``uri`` (MLflow only): the store; default ``sqlite:///<run_dir's parent>/mlflow.db``, one
    store for every run in that output folder.
    """
    if kind not in TRACKERS:
        raise ConfigError(f"--track '{kind}': unknown tracker; choose one of {', '.join(TRACKERS)}")
    run_dir = Path(run_dir)
    if kind == "tensorboard":
        if uri:
            raise ConfigError("--track-uri is for --track mlflow; TensorBoard writes in the run")
        return TensorBoardTracker(run_dir / TENSORBOARD_DIR)
    uri = uri or f"sqlite:///{(run_dir.parent / 'mlflow.db').resolve()}"
    return MlflowTracker(uri, run_name=run_dir.name)


def track_run(run_dir: str | Path, kind: str, *, uri: str | None = None) -> Tracker:
    """Log a finished run directory to a tracker (what ``--track`` logs during the run)."""
    run_dir = Path(run_dir)
    config, metrics = run_dir / "config.json", run_dir / "metrics.jsonl"
    if not config.is_file() or not metrics.is_file():
        raise ConfigError(
            f"'{run_dir}' is not a run directory (no config.json or metrics.jsonl); "
            "give a folder that `fedfuse simulate` wrote"
        )
    status_file = run_dir / "status.json"
    status = json.loads(status_file.read_text()).get("status", "?") if status_file.exists() else "?"
    tracker = open_tracker(kind, run_dir=run_dir, uri=uri)
    tracker.start(json.loads(config.read_text()))
    for line in metrics.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            row.pop(HOLDOUT_KEY, None)  # as during the run: finish() logs it
            tracker.log_round(row)
    tracker.finish(run_dir, status=status)
    return tracker
