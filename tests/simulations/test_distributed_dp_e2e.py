"""Distributed DP in real federations (the real ServerApp logic and ClientApp, SecAgg+ mod
included, over the in-process Grid): the server only ever holds noised sums, the noise on the
sum it unmasks has the configured variance, the ledgers and privacy.json record the events and
their assumption, and a configuration whose sum could wrap around is refused before training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedfuse.client import distributed_dp as client_ddp
from fedfuse.client.app import app as client_app
from fedfuse.common.config import RunConfig
from fedfuse.common.privacy.ddgauss import DdgEvent, ddg_epsilon
from fedfuse.common.privacy.ledger import Ledger
from fedfuse.common.secagg import SecAggRoundFailed, masking
from fedfuse.common.secagg.protocol import MASKED_KEY, Stage
from fedfuse.server.app import run_federation
from fedfuse.server.rundir import RunDirectory
from fedfuse.simulations.inprocess import InProcessGrid
from tests.support.secagg import fresh_sites, stage_of


def _cfg(tmp_path: Path, sites: list[Path], **kw) -> RunConfig:
    return RunConfig(
        data_dir=str(fresh_sites(sites, tmp_path / "data")),
        out_dir=str(tmp_path / "runs"),
        num_rounds=1,
        local_epochs=1,
        batch_size=64,
        target_epsilon=4.0,
        run_name="ddp",
        **kw,
    )


def _spy_on_noisy_vector(
    monkeypatch: pytest.MonkeyPatch,
) -> list[tuple[dict, dict, client_ddp.SiteDdpRound]]:
    """A spy (not a mock): the real ``noisy_vector`` still runs; what each site noised is kept,
    to know the clean sum the server must never see."""
    seen: list[tuple[dict, dict, client_ddp.SiteDdpRound]] = []
    real = client_ddp.noisy_vector

    def spy(trained, global_arrays, rnd, *, seed, secure_rng=None):
        seen.append((trained, global_arrays, rnd))
        return real(trained, global_arrays, rnd, seed=seed, secure_rng=secure_rng)

    monkeypatch.setattr(client_ddp, "noisy_vector", spy)
    return seen


@pytest.mark.e2e
@pytest.mark.parametrize("level", ["distributed", "record+distributed"])
def test_server_sees_only_noised_sums_with_the_configured_variance(
    synth_sites: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, level: str
) -> None:
    # RDP plans DP-SGD's noise (record+distributed) in a fraction of PRV's time.
    cfg = _cfg(tmp_path, synth_sites, dp_level=level, client_noise_multiplier=0.5, accountant="rdp")
    seen = _spy_on_noisy_vector(monkeypatch)
    grid = InProcessGrid(client_app, 3)
    run_dir = RunDirectory(cfg.out_dir, cfg, run_id=cfg.run_name)
    run_federation(grid, cfg, run_dir=run_dir)

    assert len(seen) == 3
    glob = seen[0][1]
    keys = masking.float_keys(glob)
    spec, threshold = seen[0][2].spec, seen[0][2].threshold
    assert threshold == 2
    deltas = [masking.flatten(t, keys) - masking.flatten(glob, keys) for t, _, _ in seen]
    clipped = [d * min(1.0, cfg.client_clip_norm / np.linalg.norm(d)) for d in deltas]
    clean_sum = np.sum(clipped, axis=0)

    # 1. Every message the server received: a collect reply carries one masked uint32 vector
    # and nothing else model-sized (no model, no noised vector in the clear); others none.
    collect = [m for m in grid.received if stage_of(m) == Stage.COLLECT_MASKED_VECTORS]
    train = [m for m in collect if m.metadata.message_type == "train"]
    assert len(train) == 3 and len(collect) == 6  # 3 more: the evaluation round's (masked)
    for msg in grid.received:
        if not msg.has_content():
            continue
        arrays = dict(msg.content.array_records)
        if msg in train:
            assert list(arrays) == [MASKED_KEY]
            (vec,) = [a.numpy() for a in arrays[MASKED_KEY].values()]
            assert vec.dtype == np.uint32 and vec.size == 1 + spec.padded
        elif msg in collect:  # the evaluation sums, masked (common/evaluation.py)
            assert list(arrays) == [MASKED_KEY]
        else:
            assert arrays == {}, f"an unexpected array reached the server: {list(arrays)}"

    # 2. What the server unmasked and applied is the clean sum plus noise of the configured
    # variance: 3 shares of sigma_local^2 each (sized for the threshold of 2), in units.
    final = torch.load(run_dir.path / "model.pt")
    noisy_sum = 3 * (
        masking.flatten({k: final[k].double().numpy() for k in keys}, keys)
        - masking.flatten(glob, keys)
    )
    residual = noisy_sum - clean_sum
    expected_std = math.sqrt(3) * spec.local_std(threshold) / spec.scale
    assert residual.std() == pytest.approx(expected_std, rel=0.03)  # 32k coordinates
    assert abs(residual.mean()) < 5 * expected_std / math.sqrt(residual.size)
    # The noise is real noise: far larger than the clean sum (norm <= 3 sites x clip 1).
    assert np.linalg.norm(residual) > 10 * np.linalg.norm(clean_sum)

    # 3. Accounting: privacy.json and every site's ledger carry the event and its assumption.
    privacy = json.loads((run_dir.path / "privacy.json").read_text())
    client = privacy["client_level"]
    assert "distributed client-level DP" in privacy["mechanism"]
    assert "at least 2 sites" in client["assumption"]
    events = [DdgEvent.parse(m) for m in client["events"]]
    assert events == [spec.event(threshold=2, sample_rate=1.0)]
    assert client["epsilon"] == pytest.approx(ddg_epsilon(events, delta=cfg.target_delta))
    for site in (Path(cfg.data_dir) / p.name for p in synth_sites):
        (entry,) = Ledger(site / ".fedfuse" / "ledger.sqlite").entries()
        assert entry.distributed == events[0]
        assert ("poisson-sampled-gaussian+" in entry.mechanism) == (level != "distributed")
        assert math.isfinite(entry.epsilon)


@pytest.mark.e2e
def test_a_configuration_that_could_wrap_around_is_refused_before_training(
    synth_sites: list[Path], tmp_path: Path
) -> None:
    """3 sites x 2**18 units cannot fit in a 20-bit modulus: refused before any message is
    sent, naming the keys to change, and no site spends any privacy."""
    cfg = _cfg(
        tmp_path,
        synth_sites,
        dp_level="distributed",
        modulus_range=2**20,
        quantization_range=2**10,
        ddp_norm_units=2**18,
    )
    grid = InProcessGrid(client_app, 3)
    run_dir = RunDirectory(cfg.out_dir, cfg, run_id=cfg.run_name)
    with pytest.raises(SecAggRoundFailed, match="could wrap around modulus-range 1048576") as exc:
        run_federation(grid, cfg, run_dir=run_dir)
    assert "'ddp-norm-units'" in str(exc.value) and "'modulus-range'" in str(exc.value)
    assert grid.received == []  # no site was asked to do anything
    for site in (Path(cfg.data_dir) / p.name for p in synth_sites):
        assert not (site / ".fedfuse" / "ledger.sqlite").exists()


@pytest.mark.e2e
def test_with_a_site_dropped_the_sum_still_carries_the_target_noise(
    synth_sites: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The noise is sized for the threshold: with 3 sites, T = 2 and one site silent from the
    collect stage on, the two survivors' noise is exactly the target z * Delta_2 (units)."""
    cfg = _cfg(tmp_path, synth_sites, dp_level="distributed", client_noise_multiplier=0.5)
    seen = _spy_on_noisy_vector(monkeypatch)

    def respond(msg) -> bool:  # site 2 vanishes after sharing its keys
        return not (
            grid.partition(msg.metadata.dst_node_id) == 2
            and stage_of(msg) in (Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK)
        )

    grid = InProcessGrid(client_app, 3, respond=respond)
    run_dir = RunDirectory(cfg.out_dir, cfg, run_id=cfg.run_name)
    run_federation(grid, cfg, run_dir=run_dir)
    assert run_dir.rounds[0]["num-sites"] == 2 and len(seen) == 2
    glob = seen[0][1]
    keys = masking.float_keys(glob)
    spec = seen[0][2].spec
    clean_sum = np.sum(
        [
            (d := masking.flatten(t, keys) - masking.flatten(glob, keys))
            * min(1.0, cfg.client_clip_norm / np.linalg.norm(d))
            for t, _, _ in seen
        ],
        axis=0,
    )
    final = torch.load(run_dir.path / "model.pt")
    noisy_sum = 2 * (
        masking.flatten({k: final[k].double().numpy() for k in keys}, keys)
        - masking.flatten(glob, keys)
    )
    target_std = spec.central_std / spec.scale  # z * Delta_2 in model units
    assert (noisy_sum - clean_sum).std() == pytest.approx(target_std, rel=0.03)
