"""The ceiling: one non-federated, non-private model trained on all sites' data pooled.

Only possible in simulation (real sites never pool data); it tells how much federation and
privacy cost.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, Dataset

from fedfuse.client.site import simulation_site_dirs
from fedfuse.client.training import pick_device, train_round
from fedfuse.common.config import RunConfig
from fedfuse.common.data.dataset import load_site
from fedfuse.common.metrics import evaluate
from fedfuse.common.models import build_model


def _splits(cfg: RunConfig, num_sites: int | None) -> tuple[list[Dataset], list[Dataset]]:
    dirs = simulation_site_dirs(cfg.data_dir)[:num_sites]
    train_sets, test_sets = [], []
    for d in dirs:
        _, ds = load_site(Path(d), cfg)
        train_sets.append(ds["train"])
        test_sets.append(ds["test"])
    return train_sets, test_sets


def centralised_baseline(cfg: RunConfig, *, num_sites: int | None = None) -> dict[str, float]:
    """Train for ``num_rounds * local_epochs`` epochs on the pooled train splits; evaluate on
    the pooled test splits. Returns loss, accuracy, AUROC and seconds."""
    t0 = time.time()
    train_sets, test_sets = _splits(cfg, num_sites)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    device = pick_device()
    pooled_cfg = cfg.replace(local_epochs=cfg.local_epochs * cfg.num_rounds)
    train_round(
        model,
        ConcatDataset(train_sets),
        cfg=pooled_cfg,
        plan=None,
        history=[],
        seed=cfg.seed,
        device=device,
    )
    res = evaluate(model, ConcatDataset(test_sets), device=device)
    return {
        "auroc": res["auroc"],
        "loss": res["loss"],
        "accuracy": res["accuracy"],
        "seconds": time.time() - t0,
    }


def pooled_test_metrics(
    cfg: RunConfig, model_file: Path, *, num_sites: int | None = None
) -> dict[str, float]:
    """A federation's final global model on the pooled test splits: the baseline's metric.

    The federation's own report averages the sites' AUROCs, each on its own test split; under
    label skew that is a different (and noisier) number than the pooled AUROC, so comparisons
    with the centralised ceiling use this. Simulation only (it reads every site's data).
    """
    model = build_model(cfg)
    model.load_state_dict(torch.load(model_file, weights_only=True))
    _, test_sets = _splits(cfg, num_sites)
    res = evaluate(model, ConcatDataset(test_sets), device=pick_device())
    return {"auroc": res["auroc"], "loss": res["loss"], "accuracy": res["accuracy"]}
