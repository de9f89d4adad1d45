"""The held-out site (run config ``holdout-site``): a site that never trains and, at the end
of the run, evaluates the final global model on every record it holds, for itself.

The honest test of generalising to a new hospital. The site is no node of the federation: it
is sent no message, trains on nothing, spends no budget and its ledger is not touched. At the
end it evaluates the model every site received last (the run's ``model.pt``), keeps its own
figures in its local log (``<site>/.fedfuse/eval.jsonl``) as any site does, and releases only
the aggregate figures :data:`RELEASED` names, computed from its own evaluation-sums vector the
way the server computes the pooled ones (common/evaluation.py, common/clinical.py), so the two
are comparable. One site's sums are its exact statistics: unlike the pooled figures they are
not hidden in a sum over sites, and no epsilon covers them (README "What crosses the wire").
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedfuse.client.site import holdout_dir, simulation_site_dirs
from fedfuse.client.training import pick_device
from fedfuse.client.wire import log_evaluation
from fedfuse.common.clinical import clinical_from_sums
from fedfuse.common.config import RunConfig
from fedfuse.common.data.dataset import LabelEncoder, SiteDataset, TaskLabelEncoder, manifest_for
from fedfuse.common.data.modalities import build_inputs
from fedfuse.common.evaluation import EvalLayout, decode_sums, site_evaluation
from fedfuse.common.models import build_model
from fedfuse.server.report import HOLDOUT_KEY

__all__ = ["HOLDOUT_KEY", "RELEASED", "holdout_evaluator", "holdout_site_dir"]

# What the held-out site releases, besides its name and the round: the figures the server
# derives from a sums vector (``eval-*``: record count, loss, accuracy, AUROC with and without
# each modality, fusion weights, average precision, operating point, calibration, bootstrap
# intervals) and the reliability diagram. tests/simulations/test_wire_privacy.py holds a row
# to this list.
RELEASED = ("site", "round", "eval-*", "reliability")

HoldoutEvaluator = Callable[..., dict[str, Any]]


def holdout_site_dir(cfg: RunConfig) -> Path | None:
    """The held-out site's folder (None without one); ConfigError in one line for a name that
    is not a site folder of ``data-dir``."""
    if not cfg.holdout_site:
        return None
    simulation_site_dirs(cfg.data_dir)  # data-dir itself is a folder of site folders
    return holdout_dir(cfg.data_dir, cfg.holdout_site)


def all_records(site_dir: Path, cfg: RunConfig) -> SiteDataset:
    """Every record of the site (every split: it trained on none), read as evaluation reads."""
    manifest = manifest_for(site_dir, cfg)
    return SiteDataset(
        list(manifest.records),
        inputs=build_inputs(cfg, manifest),
        labels=LabelEncoder(cfg.class_names, multi_label=cfg.multi_label),
        train=False,
        task_labels=TaskLabelEncoder(cfg.task_classes) if cfg.task_classes else None,
    )


def evaluate_holdout(
    state_dict: dict[str, torch.Tensor],
    *,
    cfg: RunConfig,
    site_dir: Path,
    run_id: str,
    server_round: int,
) -> dict[str, Any]:
    """What the held-out site at ``site_dir`` releases about the model ``state_dict``."""
    model = build_model(cfg)
    model.load_state_dict(state_dict)
    figures, sums = site_evaluation(
        model, all_records(site_dir, cfg), cfg=cfg, device=pick_device()
    )
    log_evaluation(site_dir, run_id=run_id, server_round=server_round, figures=figures)
    layout = EvalLayout.for_config(cfg)
    released: dict[str, Any] = {"site": site_dir.name, "round": server_round}
    released.update({k: v for k, v in decode_sums(sums, layout).items() if k.startswith("eval-")})
    clinical, diagrams = clinical_from_sums(sums, layout)
    released.update(clinical)
    released["reliability"] = diagrams
    return released


def holdout_evaluator(cfg: RunConfig) -> HoldoutEvaluator | None:
    """The held-out site's end-of-run evaluation as the server app calls it
    (``run_federation(holdout=...)``), or None when the run holds no site out."""
    site_dir = holdout_site_dir(cfg)
    if site_dir is None:
        return None

    def evaluate(
        state_dict: dict[str, torch.Tensor], *, run_id: str, server_round: int
    ) -> dict[str, Any]:
        return evaluate_holdout(
            state_dict, cfg=cfg, site_dir=site_dir, run_id=run_id, server_round=server_round
        )

    return evaluate
