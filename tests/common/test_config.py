import math
import tomllib
from pathlib import Path

import pytest

from fedfuse.common.config import KEY_FACTS, RESUME_FREE_KEYS, RunConfig, seeds_noise
from fedfuse.common.errors import ConfigError
from fedfuse.common.secagg import SecAggSettings

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_run_config_matches_dataclass_defaults():
    """The Flower run config in pyproject.toml and RunConfig's defaults are one truth."""
    raw = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert RunConfig.from_mapping(raw) == RunConfig()
    assert set(raw) == set(RunConfig().to_mapping())


def test_what_a_key_means_is_declared_on_the_key():
    """Noise seed, resume and SecAgg+ facts come from the keys' declarations (KeyFacts)."""
    assert RESUME_FREE_KEYS == {"resume-from", "out-dir", "run-name", "data-dir"}
    never_seeds = {k for k in KEY_FACTS if not seeds_noise(k, distributed_dp=True)}
    assert never_seeds == {
        *RESUME_FREE_KEYS,
        *("run-id", "run-uid", "fraction-train", "fraction-evaluate", "min-sites", "timeout"),
    }
    # SecAgg+ settings size the noise share only under distributed DP: hashed only then.
    seeds_under_ddp_only = {
        k
        for k in KEY_FACTS
        if seeds_noise(k, distributed_dp=True) and not seeds_noise(k, distributed_dp=False)
    }
    assert seeds_under_ddp_only == {
        "secagg",
        "num-shares",
        "reconstruction-threshold",
        "clipping-range",
        "quantization-range",
        "modulus-range",
        "max-weight",
    }
    assert seeds_noise("server-round", distributed_dp=False)
    assert seeds_noise("a-key-added-later", distributed_dp=False)  # unknown: fresh noise


def test_secagg_defaults_are_the_settings_defaults():
    assert RunConfig().secagg_settings() == SecAggSettings()


def test_unknown_key_lists_known_keys():
    with pytest.raises(ConfigError, match="Unknown config key.*num-roundz.*Known keys.*num-rounds"):
        RunConfig.from_mapping({"num-roundz": 3})


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("target-epsilon", 0.0, "'target-epsilon' must be in range (0.0, inf]"),
        ("target-epsilon", -1.0, "'target-epsilon'"),
        ("target-delta", 1.0, "'target-delta' must be in range (0.0, 1.0)"),
        ("target-delta", 0.0, "'target-delta'"),
        ("num-rounds", 0, "'num-rounds' must be an integer >= 1"),
        ("batch-size", 0, "'batch-size'"),
        ("accountant", "gdp", "'accountant' must be one of"),
        ("classes", "only_one", "'classes'"),
    ],
)
def test_out_of_range_values_name_the_key(key, value, needle):
    with pytest.raises(ConfigError) as exc:
        RunConfig.from_mapping({key: value})
    assert needle in str(exc.value)


def test_round_trip_and_types():
    cfg = RunConfig.from_mapping({"num-rounds": "5", "target-epsilon": "2.5", "fusion": "concat"})
    assert cfg.num_rounds == 5 and cfg.target_epsilon == 2.5
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg
    with pytest.raises(ConfigError, match="'num-rounds' must be an integer"):
        RunConfig.from_mapping({"num-rounds": 2.5})


def test_infinite_epsilon_means_no_dp():
    assert not RunConfig(target_epsilon=math.inf).private
    assert RunConfig().private
