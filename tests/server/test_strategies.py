"""Strategy choice and FedProx's proximal step (tiny tensors, exact expectations)."""

import pytest
import torch
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx
from torch.utils.data import TensorDataset

from fedfuse.client.training import proximal_step, train_round
from fedfuse.common.config import RunConfig
from fedfuse.common.errors import ConfigError
from fedfuse.common.models import build_model
from fedfuse.common.privacy.planning import plan_site_privacy
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


def test_fedprox_under_dp_moves_the_update_not_the_spend():
    """The pull is post-processing: the same DP event and epsilon as FedAvg's (the same
    noise, batches and steps), while the site ends nearer the global model it started from."""
    cfg = RunConfig(
        modalities="image", classes="a,b", batch_size=50, local_epochs=2, num_rounds=1,
        modality_dropout=0.0, target_epsilon=8.0,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 1, 32, 32, generator=gen), torch.randint(0, 2, (200,), generator=gen)
    data = TensorDataset(torch.ones(200, 1), x, y)
    torch.manual_seed(0)
    start = build_model(cfg).state_dict()
    plan = plan_site_privacy(cfg=cfg, num_train=len(y))
    ends, results = {}, {}
    for name in ("fedavg", "fedprox"):
        model = build_model(cfg)
        model.load_state_dict(start)
        run = cfg.replace(strategy=name, proximal_mu=1.0)
        results[name] = train_round(
            model, data, cfg=run, plan=plan, history=[], seed=3, device=torch.device("cpu")
        )
        ends[name] = torch.cat([(v - start[k]).flatten() for k, v in model.state_dict().items()])
    avg, prox = results["fedavg"], results["fedprox"]
    assert avg.event == prox.event and avg.epsilon == prox.epsilon
    assert 0 < prox.epsilon <= cfg.target_epsilon
    assert 0 < ends["fedprox"].norm() < 0.9 * ends["fedavg"].norm()
