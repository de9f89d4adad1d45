"""Per-modality contributions of a trained fusion model.

Two views, computed where the data is (at a site; only these scalars leave it):

* **masking**, for every head: the AUROC with each modality hidden from every record (as if
  no record had it) and the drop from the full AUROC. A large drop means the model relies on
  that modality; near zero means it adds little beyond the others.
* **weights**, for heads that have them (``gated``: gate values; ``attention``: the [CLS]
  token's attention; ``late``: combination weights): the mean weight of each modality over the
  records that have it.
* **tasks**, for runs with extra tasks (run config ``tasks``): each task's AUROC, accuracy and
  loss over the records labelled for it, and its AUROC with each modality hidden.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from fedfuse.common.config import RunConfig
from fedfuse.common.data.dataset import load_site
from fedfuse.common.errors import ConfigError
from fedfuse.common.metrics import Predictions, predict, predict_variants, scores
from fedfuse.common.models import build_model
from fedfuse.common.models.multitask import AllTasks, task_slices


def modality_contributions(
    model: nn.Module,
    dataset: Dataset,
    *,
    device: torch.device,
    multi_label: bool = False,
    batch_size: int = 256,
) -> dict[str, Any]:
    """``{"auroc": full, "modalities": {name: {auroc-without, auroc-drop, weight, present}}}``."""
    names: tuple[str, ...] = tuple(model.modalities)  # type: ignore[arg-type]
    full, *hidden = predict_variants(
        model, dataset, hidden=len(names), device=device, batch_size=batch_size
    )
    return contribution_report(full, hidden, names, multi_label=multi_label)


def contribution_report(
    full: Predictions,
    hidden: list[Predictions],
    names: tuple[str, ...],
    *,
    multi_label: bool = False,
) -> dict[str, Any]:
    """:func:`modality_contributions` from predictions already made: with every modality
    (``full``) and with modality ``i`` hidden (``hidden[i]``)."""
    base = scores(full, multi_label=multi_label)["auroc"]
    out: dict[str, Any] = {"auroc": base, "num-examples": len(full.labels), "modalities": {}}
    for i, name in enumerate(names):
        without = scores(hidden[i], multi_label=multi_label)["auroc"]
        present = full.mask[:, i] > 0 if len(full.labels) else torch.zeros(0, dtype=torch.bool)
        weight = math.nan
        if full.weights is not None and bool(present.any()):
            weight = float(full.weights[present, i].mean())
        out["modalities"][name] = {
            "auroc-without": without,
            "auroc-drop": base - without,
            "weight": weight,
            "present": float(present.float().mean()) if len(present) else math.nan,
        }
    return out


def contribution_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Flat ``eval-*`` metrics of a report, as a site sends them with its evaluation."""
    out: dict[str, float] = {}
    for name, m in report["modalities"].items():
        out[f"eval-auroc-without-{name}"] = m["auroc-without"]
        out[f"eval-auroc-drop-{name}"] = m["auroc-drop"]
        if not math.isnan(m["weight"]):
            out[f"eval-weight-{name}"] = m["weight"]
    return out


def task_contributions(
    model: nn.Module, dataset: Dataset, *, cfg: RunConfig, device: torch.device
) -> dict[str, dict[str, Any]]:
    """Per extra task (run config ``tasks``): ``{records, auroc, accuracy, loss,
    auroc-without: {modality: AUROC}}`` over the records labelled for that task (a record
    without the task's label, or a site without its column, counts for no task figure).
    Empty for a run without extra tasks. AUROC from the raw scores (exact, unlike the
    federation's histogram figure); NaN where a task has no labelled records or one class."""
    if not cfg.task_classes:
        return {}
    view = dataset.with_task_labels()  # type: ignore[attr-defined]
    all_tasks = AllTasks(model)
    names = cfg.modality_names
    runs = [predict(all_tasks, view, device=device)]
    runs += [predict(all_tasks, view, device=device, hide=i) for i in range(len(names))]
    out: dict[str, dict[str, Any]] = {}
    for k, (task, cols) in enumerate(task_slices(cfg).items()):
        y = runs[0].labels[:, 1 + k].long()
        has = y >= 0

        full = _task_scores(runs[0], y, has, cols, cfg.task_classes[task])
        out[task] = {
            "records": int(has.sum()),
            "auroc": full["auroc"],
            "accuracy": full["accuracy"],
            "loss": full["loss"],
            "auroc-without": {
                m: _task_scores(runs[1 + i], y, has, cols, cfg.task_classes[task])["auroc"]
                for i, m in enumerate(names)
            },
        }
    return out


def _task_scores(
    pred: Predictions, y: torch.Tensor, has: torch.Tensor, cols: slice, classes: tuple[str, ...]
) -> dict[str, float]:
    """One task's :func:`scores` over its labelled records ``has`` (its columns ``cols``)."""
    sub = Predictions(
        labels=y[has], logits=pred.logits[:, cols][has], mask=pred.mask[has], weights=None
    )
    return scores(sub, multi_label=False, class_names=classes)


def task_rows(report: dict[str, Any]) -> list[list[str]]:
    """Rows (task, labelled records, AUROC, accuracy, AUROC drop per modality) of a report."""
    rows = []
    for task, t in report.get("tasks", {}).items():
        drops = [
            _f(t["auroc"] - w if not (math.isnan(t["auroc"]) or math.isnan(w)) else math.nan)
            for w in t["auroc-without"].values()
        ]
        rows.append([task, str(t["records"]), _f(t["auroc"]), _f(t["accuracy"]), *drops])
    return rows


def _f(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.4f}"


def contribution_rows(record: dict[str, Any], modalities: tuple[str, ...]) -> list[list[str]]:
    """Table rows (modality, mean weight, AUROC without, AUROC drop) from flat metrics."""
    rows = []
    for m in modalities:
        rows.append(
            [
                m,
                _f(record.get(f"eval-weight-{m}")),
                _f(record.get(f"eval-auroc-without-{m}")),
                _f(record.get(f"eval-auroc-drop-{m}")),
            ]
        )
    return rows


def contribution_markdown(record: dict[str, Any], modalities: tuple[str, ...]) -> list[str]:
    """The "Modality contributions" section of a run's summary.md (empty without data)."""
    if not any(f"eval-auroc-drop-{m}" in record for m in modalities):
        return []
    lines = [
        "",
        "## Modality contributions (final global model, test splits, weighted over sites)",
        "",
        "AUROC drop = test AUROC with every modality minus test AUROC with this one hidden "
        "from every record. Weight = the fusion head's mean weight for the modality where "
        "present (gated, attention and late heads only).",
        "",
        "| modality | mean weight | AUROC without | AUROC drop |",
        "|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in contribution_rows(record, modalities)]
    return lines


def explain_run(
    run_dir: str | Path, site_dir: str | Path, *, split: str = "test"
) -> tuple[RunConfig, dict[str, Any]]:
    """Contributions of a run's final global model on one site's split (``fedfuse explain``);
    with extra tasks, the report's ``tasks`` holds :func:`task_contributions`.

    Raises:
        ConfigError: the run directory lacks config.json or model.pt, or ``split`` is unknown.
        DataValidationError: the site folder is not valid for the run's config.
    """
    run_dir = Path(run_dir)
    cfg_file, model_file = run_dir / "config.json", run_dir / "model.pt"
    for f in (cfg_file, model_file):
        if not f.is_file():
            raise ConfigError(f"{f} does not exist: give a finished run directory (runs/<id>)")
    if split not in ("train", "val", "test"):
        raise ConfigError(f"--split must be one of train, val, test; found {split!r}")
    cfg = RunConfig.from_mapping(json.loads(cfg_file.read_text()))
    model = build_model(cfg)
    model.load_state_dict(torch.load(model_file, map_location="cpu", weights_only=True))
    _, datasets = load_site(site_dir, cfg)
    ds = datasets[split]
    if len(ds) == 0:
        raise ConfigError(f"site '{site_dir}' has no records in split '{split}'")
    report = modality_contributions(
        model, ds, device=torch.device("cpu"), multi_label=cfg.multi_label
    )
    if cfg.task_classes:
        report["tasks"] = task_contributions(model, ds, cfg=cfg, device=torch.device("cpu"))
    return cfg, report


def run_status(run_dir: str | Path) -> tuple[str, str]:
    """(status, reason) of a run directory (``status.json``); ("unknown", ...) without one."""
    path = Path(run_dir) / "status.json"
    if not path.is_file():
        return "unknown", "the run directory has no status.json (the run did not finish)"
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return "unknown", f"{path.name} is unreadable"
    return str(rec.get("status", "unknown")), str(rec.get("reason", ""))


def report_rows(report: dict[str, Any]) -> list[list[str]]:
    """Rows (modality, share present, weight, AUROC without, drop) of a contributions report."""
    return [
        [
            name,
            "-" if math.isnan(m["present"]) else f"{100 * m['present']:.0f}%",
            _f(m["weight"]),
            _f(m["auroc-without"]),
            _f(m["auroc-drop"]),
        ]
        for name, m in report["modalities"].items()
    ]
