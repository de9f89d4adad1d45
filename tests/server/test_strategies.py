"""Strategy choice and FedProx's proximal step (tiny tensors, exact expectations)."""

import pytest
import torch
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from fedfuse.client.training import proximal_step
from fedfuse.common.config import RunConfig
from fedfuse.common.errors import ConfigError
from fedfuse.server.app import make_strategy
from fedfuse.server.rundir import RunDirectory
from fedfuse.server.secagg import SecAggPlusStrategy


@pytest.mark.parametrize(
    ("name", "base"), [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam)]
)
def test_make_strategy(tmp_path, name, base):
    cfg = RunConfig(strategy=name, proximal_mu=0.3, server_learning_rate=0.05)
    s = make_strategy(
        cfg,
        run_dir=RunDirectory(tmp_path, cfg, run_id="r"),
        on_round=None,
        min_train_nodes=2,
        min_available_nodes=2,
    )
    assert isinstance(s, SecAggPlusStrategy)  # secagg is on by default: it wraps the strategy
    s = s.strategy
    assert isinstance(s, base)
    if name == "fedprox":
        assert s.proximal_mu == 0.3
    if name == "fedadam":
        assert s.eta == 0.05


def test_unknown_strategy_is_refused():
    with pytest.raises(ConfigError, match="'strategy' must be one of"):
        RunConfig(strategy="fedsgd")


def test_proximal_step_by_hand():
    w = [torch.tensor([1.0, 3.0])]
    anchor = [torch.tensor([0.0, 1.0])]
    proximal_step(w, anchor, lr=0.5, mu=0.2)  # w - 0.1 * (w - a)
    assert torch.allclose(w[0], torch.tensor([0.9, 2.8]))
    proximal_step(w, None, lr=0.5, mu=0.2)  # no anchor: FedAvg, unchanged
    assert torch.allclose(w[0], torch.tensor([0.9, 2.8]))
