"""Client-level DP: clipping at the site, noise on the aggregate at the server, accounting."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore.task_identity import TaskIdentity
from scipy.optimize import brentq
from scipy.stats import norm

from fedfuse.common.config import RunConfig
from fedfuse.common.errors import ConfigError
from fedfuse.common.privacy.client_level_dp import client_level_epsilon, clip_update_, update_norm
from fedfuse.server.client_level_dp import ClientLevelDp, make_client_dp

GLOBAL = {"w": torch.zeros(4000), "b": torch.ones(3), "steps": torch.tensor([5])}


def _site(delta_w: float, delta_b: float) -> dict[str, torch.Tensor]:
    return {
        "w": GLOBAL["w"] + delta_w / math.sqrt(4000),  # update of L2 norm |delta_w| on w
        "b": GLOBAL["b"] + delta_b,
        "steps": torch.tensor([9]),
    }


def test_clipping_bounds_the_update_and_keeps_small_ones():
    big = _site(3.0, 0.0)
    assert update_norm(big, GLOBAL) == pytest.approx(3.0, rel=1e-6)
    scale = clip_update_(big, GLOBAL, clip_norm=1.0)
    assert scale == pytest.approx(1 / 3, rel=1e-6)
    assert update_norm(big, GLOBAL) == pytest.approx(1.0, rel=1e-5)
    assert big["steps"].item() == 9  # integer buffers are not updates
    small = _site(0.5, 0.0)
    assert clip_update_(small, GLOBAL, clip_norm=1.0) == 1.0
    assert update_norm(small, GLOBAL) == pytest.approx(0.5, rel=1e-5)
    with pytest.raises(ValueError, match="clip_norm"):
        clip_update_(small, GLOBAL, clip_norm=0.0)


def _reply(state: dict[str, torch.Tensor], n: int) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    ins = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=1, message_type="train")
    content = RecordDict(
        {"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": n})}
    )
    return Message(content, reply_to=ins)


def test_noiseless_aggregate_is_global_plus_sum_of_clipped_updates_over_sampled():
    dp = ClientLevelDp(clip_norm=1.0, noise_multiplier=1e-12, delta=1e-5)
    dp.begin_round(sampled=3, available=6)  # 3 sampled, one of them refused: 2 replies
    replies = [_reply(_site(3.0, 0.0), 100), _reply(_site(0.0, 0.5), 10)]
    dp.privatize_replies(replies, ArrayRecord(GLOBAL), weight_key="num-examples")
    agg = aggregate_arrayrecords([m.content for m in replies], "num-examples")
    out = agg.to_torch_state_dict()
    # By hand: site 1 clipped to norm 1 on w; site 2 (norm 0.5*sqrt(3) < 1) kept; both / 3,
    # equal weights whatever num-examples said.
    expected_w = (1.0 / math.sqrt(4000)) / 3
    assert out["w"].mean().item() == pytest.approx(expected_w, rel=1e-4)
    assert out["b"] == pytest.approx(torch.full((3,), 1 + 0.5 / 3), rel=1e-5)
    assert dp.sample_rates == [0.5]


def test_noise_on_the_mean_has_the_planned_std():
    z, c, sampled = 0.8, 2.0, 4
    dp = ClientLevelDp(
        clip_norm=c, noise_multiplier=z, delta=1e-5, generator=torch.Generator().manual_seed(3)
    )
    dp.begin_round(sampled=sampled, available=4)
    replies = [_reply({k: v.clone() for k, v in GLOBAL.items()}, 5) for _ in range(3)]
    dp.privatize_replies(replies, ArrayRecord(GLOBAL), weight_key="num-examples")
    out = aggregate_arrayrecords([m.content for m in replies], "num-examples").to_torch_state_dict()
    measured = out["w"].std().item()
    assert measured == pytest.approx(z * c / sampled, rel=0.15)  # Opacus-style noise check
    # The secure-aggregation path: the same std from a sum of updates.
    dp.begin_round(sampled=sampled, available=4)
    zero = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in GLOBAL.items()}
    noisy = dp.noisy_mean_from_sum(GLOBAL, zero)
    assert noisy["w"].std().item() == pytest.approx(z * c / sampled, rel=0.15)
    assert noisy["steps"].item() == 5


def test_client_level_epsilon_matches_the_gaussian_closed_form():
    # Every site every round (q = 1): T rounds of the Gaussian mechanism are mu-GDP with
    # mu = sqrt(T)/z, whose epsilon(delta) is exact (Balle & Wang 2018). RDP must bound it.
    z, rounds, delta = 2.0, 5, 1e-5
    mu = math.sqrt(rounds) / z

    def delta_of(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)

    exact = brentq(lambda e: delta_of(e) - delta, 1e-6, 100)
    rdp = client_level_epsilon([1.0] * rounds, noise_multiplier=z, delta=delta)
    assert exact <= rdp <= exact * 1.25
    # Sampling fewer sites per round amplifies privacy.
    assert client_level_epsilon([0.2] * rounds, noise_multiplier=z, delta=delta) < rdp


def test_dp_level_config():
    assert make_client_dp(RunConfig()) is None
    # A resumed run continues the accounting of the rounds it keeps.
    kept = [{"round": 1, "client-dp": {"sample_rates": [0.5]}}, {"round": 2}]
    resumed = make_client_dp(RunConfig(dp_level="client"), kept)
    assert resumed.sample_rates == [0.5] and resumed.epsilon() > 0
    cfg = RunConfig(dp_level="record+client", client_clip_norm=0.5, client_noise_multiplier=1.5)
    dp = make_client_dp(cfg)
    assert (dp.clip_norm, dp.noise_multiplier) == (0.5, 1.5)
    assert cfg.record_level_dp and cfg.client_level_dp
    assert not RunConfig(dp_level="client").record_level_dp
    with pytest.raises(ConfigError, match="'dp-level' must be one of"):
        RunConfig(dp_level="site")
    with pytest.raises(ConfigError, match="'client-clip-norm' must be in range"):
        RunConfig(client_clip_norm=0)
