"""No switch outside the code changes what DP-SGD does: the noise a site adds depends on its
plan and its generator, never on the environment. Faults are planted by tests
(tests/support/faults.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedfuse.client.training import train_round
from fedfuse.common.config import RunConfig
from fedfuse.common.data.dataset import load_site
from fedfuse.common.models import build_model
from fedfuse.common.privacy.planning import plan_site_privacy
from tests.support.faults import noise_dropped

# The switch that once made client/training.py train without noise while reporting it.
OLD_SWITCH = "FEDFUSE_TEST_FAULT_DROP_NOISE"


def _trained(site: Path, cfg: RunConfig) -> dict[str, torch.Tensor]:
    _, ds = load_site(site, cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    plan = plan_site_privacy(cfg=cfg, num_train=len(ds["train"]))
    assert plan.noise_multiplier > 1.0
    train_round(
        model, ds["train"], cfg=cfg, plan=plan, history=[], seed=7, device=torch.device("cpu")
    )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_the_environment_cannot_drop_the_noise(
    synth_sites: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Keyed generator (simulation): two trainings with the same seed are bit-identical.
    cfg = RunConfig(
        local_epochs=1, batch_size=64, num_rounds=1, target_epsilon=2.0, accountant="rdp"
    )
    clean = _trained(synth_sites[0], cfg)
    monkeypatch.setenv(OLD_SWITCH, "1")
    assert _same(_trained(synth_sites[0], cfg), clean), f"{OLD_SWITCH}=1 changed DP-SGD"
    monkeypatch.delenv(OLD_SWITCH)
    # The comparison can fail: the same training with the noise really dropped differs.
    with noise_dropped():
        dropped = _trained(synth_sites[0], cfg)
    assert not _same(dropped, clean)
