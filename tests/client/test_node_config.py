"""The node config: parsed once into a typed NodeConfig, one clear line for a bad key or value."""

from pathlib import Path

import pytest

from fedfuse.client.budget import resolve_budget
from fedfuse.client.node_config import NodeConfig
from fedfuse.client.site import resolve_site
from fedfuse.common.config import RunConfig
from fedfuse.common.errors import ConfigError, FedfuseError


def test_every_key_parsed_to_its_type(tmp_path: Path):
    node = NodeConfig.parse(
        {
            "data-path": str(tmp_path / "site-a"),
            "site-name": "clinic-a",
            "ledger-path": str(tmp_path / "l.sqlite"),
            "epsilon-budget": "4",
            "delta": 1e-6,
            "require-secagg": "true",
            "share-site-metrics": False,
        }
    )
    assert node == NodeConfig(
        data_path=tmp_path / "site-a",
        site_name="clinic-a",
        ledger_path=tmp_path / "l.sqlite",
        epsilon_budget=4.0,
        delta=1e-6,
        require_secagg=True,
        share_site_metrics=False,
    )
    assert not node.simulated
    assert NodeConfig.parse({"partition-id": 2, "num-partitions": 3}).simulated


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"epsilon_budget": 4.0}, "unknown key(s) ['epsilon_budget']; known keys: ["),
        ({"epsilon-budget": "four"}, "'epsilon-budget' must be a number; found 'four'"),
        ({"delta": "nan"}, "'delta' must be a number"),
        ({"share-site-metrics": "ture"}, "'share-site-metrics' must be true or false"),
        ({"require-secagg": 2}, "'require-secagg' must be true or false"),
        ({"partition-id": -1}, "'partition-id' must be an integer >= 0"),
        ({"data-path": ""}, "'data-path' must be a path"),
    ],
)
def test_a_bad_node_config_is_one_line_naming_the_key(raw, needle):
    with pytest.raises(ConfigError) as info:
        NodeConfig.parse(raw)
    assert isinstance(info.value, FedfuseError)
    message = str(info.value)
    assert needle in message and "\n" not in message and message.startswith("node config: ")


def test_site_and_budget_come_from_the_parsed_config(tmp_path: Path):
    node = NodeConfig.parse({"data-path": str(tmp_path), "epsilon-budget": 2.5})
    site = resolve_site(node, RunConfig())
    assert (site.name, site.data_path) == (tmp_path.name, tmp_path)
    budget = resolve_budget(node, site.data_path)
    assert (budget.epsilon, budget.source) == (2.5, "node config")
    # The budget's range is checked where the site file's is too: one line, the key named.
    with pytest.raises(ConfigError, match="'epsilon-budget' must be in range"):
        resolve_budget(NodeConfig.parse({"epsilon-budget": -1}), tmp_path)
