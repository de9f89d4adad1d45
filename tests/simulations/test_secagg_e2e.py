"""SecAgg+ in whole federations: a failed secure round is loud and keeps the previous model;
with the same seed, SecAgg+ on and off give the same model up to quantisation error."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from flwr.app import Message

from fedfuse.client.app import app as client_app
from fedfuse.client.site import SiteInfo, site_data
from fedfuse.common.config import RunConfig
from fedfuse.common.secagg import SecAggRoundFailed, SecAggSettings, masking
from fedfuse.common.secagg.protocol import ARRAYS_KEY, Stage
from fedfuse.server.app import run_federation
from fedfuse.server.rundir import RunDirectory
from fedfuse.simulations.inprocess import InProcessGrid
from fedfuse.simulations.runner import FederationFailedError, check_run_status, simulate
from tests.support.secagg import fresh_sites, stage_of


@pytest.mark.e2e
def test_a_failed_secure_round_is_loud_and_keeps_the_previous_model(
    synth_sites: list[Path], tmp_path: Path
) -> None:
    """Round 2 loses two of three sites after they shared their keys: below the threshold (2).
    The run raises, records the failure in metrics, summary and status, and model.pt is the
    model the sites received in round 2, i.e. the result of round 1."""
    cfg = RunConfig(
        data_dir=str(fresh_sites(synth_sites, tmp_path / "data")),
        out_dir=str(tmp_path / "runs"),
        num_rounds=3,
        local_epochs=1,
        batch_size=64,
        target_epsilon=math.inf,  # DP plays no part in what is tested here
        run_name="fails",
    )
    sent_in_round_2: list[Message] = []

    def respond(msg: Message) -> bool:
        if msg.metadata.group_id == "2" and stage_of(msg) == Stage.COLLECT_MASKED_VECTORS:
            sent_in_round_2.append(msg)
            return grid.partition(msg.metadata.dst_node_id) == 0
        return True

    grid = InProcessGrid(client_app, 3, respond=respond)
    run_dir = RunDirectory(cfg.out_dir, cfg, run_id=cfg.run_name)
    with pytest.raises(SecAggRoundFailed, match="failed in round 2.*previous round is kept"):
        run_federation(grid, cfg, run_dir=run_dir)

    rounds = [json.loads(x) for x in (run_dir.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert "status" not in rounds[0] and rounds[0]["num-sites"] == 3
    assert rounds[1]["status"] == "failed" and rounds[1]["num-sites"] == 0
    assert "fewer than the reconstruction threshold 2" in rounds[1]["error"]
    assert len(rounds[1]["failed"]) == 2
    status = json.loads((run_dir.path / "status.json").read_text())
    assert status["status"] == "failed" and "SecAggRoundFailed" in status["reason"]
    assert "Status: **failed**" in (run_dir.path / "summary.md").read_text()
    with pytest.raises(FederationFailedError, match="secure aggregation failed in round 2"):
        check_run_status(run_dir.path)  # what makes `fedfuse simulate` exit non-zero

    kept = torch.load(run_dir.path / "model.pt")
    round_1_model = sent_in_round_2[0].content[ARRAYS_KEY].to_torch_state_dict()
    assert kept.keys() == round_1_model.keys()
    assert all(torch.equal(kept[k], round_1_model[k]) for k in kept)


@pytest.mark.e2e
def test_same_seed_with_and_without_secagg_gives_the_same_model(
    synth_sites: list[Path], tmp_path: Path
) -> None:
    """3 sites x 2 rounds with DP, SecAgg+ on and off, same seed, in process (each message
    serialised as on the wire; no Ray start-up: the claim is SecAgg+'s, not the engine's).

    Plain SGD: its steps are Lipschitz in the model, so round 1's quantisation error stays of
    its size through round 2. (Adam's first steps are close to sign(gradient): a 1e-5 change
    can flip a step of +-lr on an entry whose gradient is near zero, with or without SecAgg+.)
    """
    models = {}
    for secagg in (True, False):
        cfg = RunConfig(
            # Each run its own copy: a site's ledger would carry the first run's spend over.
            data_dir=str(fresh_sites(synth_sites, tmp_path / f"data-{secagg}")),
            out_dir=str(tmp_path / "runs"),
            num_rounds=2,
            local_epochs=1,
            batch_size=64,
            target_epsilon=4.0,
            accountant="rdp",
            optimizer="sgd",
            learning_rate=0.05,
            seed=7,
            # Common random numbers: both runs draw the same DP noise although round 2's global
            # models differ by quantisation (the default, secret-keyed noise would differ).
            noise_seed="public",
            secagg=secagg,
            run_name=f"secagg-{secagg}",
        )
        run_dir = simulate(cfg, num_sites=3, engine="inprocess")
        rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["num-sites"] for r in rounds] == [3, 3]
        assert all(0 < r["max-epsilon"] <= 4.0 for r in rounds)
        assert ("secagg" in rounds[0]) == secagg
        models[secagg] = torch.load(run_dir / "model.pt")
    torch.manual_seed(7)
    from fedfuse.common.models import build_model

    initial = build_model(cfg).state_dict()
    gap = max(float((models[True][k] - models[False][k]).abs().max()) for k in initial)
    moved = max(float((models[False][k] - initial[k]).abs().max()) for k in initial)
    # Per-round bound for 3 sites with their train-split sizes as weights, updates < 1.
    # (The weights are masked, so read off the sites' own folders.)
    sizes = [len(site_data(SiteInfo(p.name, p), cfg)[1]["train"]) for p in sorted(synth_sites)[:3]]
    bound = masking.error_bound(sizes, 1.0, SecAggSettings().for_round(3))
    assert moved > 1e-3  # training moved the model...
    assert gap <= 2 * cfg.num_rounds * bound, (gap, bound)  # ...SecAgg+ only by quantisation
