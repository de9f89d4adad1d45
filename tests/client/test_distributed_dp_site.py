"""The site's half of distributed DP (client/distributed_dp.py): it refuses to send an update that
did not come through SecAgg+ or whose sum could wrap around, and noises with its own secret."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedfuse.client import distributed_dp as client_ddp
from fedfuse.common.config import RunConfig
from fedfuse.common.errors import ConfigError
from fedfuse.common.secagg.distributed_dp import ROUND_KEY, VECTOR_ARRAY
from fedfuse.common.secagg.protocol import SecAggProtocolError

ARRAYS = {"w": np.zeros((20, 10), np.float32), "b": np.zeros(10, np.float32)}


def _msg(cfg: RunConfig, round_info: dict | None) -> Message:
    content = RecordDict(
        {"config": ConfigRecord({**cfg.to_mapping(), "run-uid": "u1", "server-round": 3})}
    )
    if round_info is not None:
        content.config_records[ROUND_KEY] = ConfigRecord(round_info)
    # A message made in the ServerApp's name, as the in-process Grid does.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
    return Message(content, dst_node_id=1, message_type="train")


def test_site_refuses_without_secagg_and_when_the_sum_could_wrap() -> None:
    cfg = RunConfig(dp_level="distributed")
    with pytest.raises(SecAggProtocolError, match="did not come through SecAgg\\+"):
        client_ddp.site_round(_msg(cfg, None), cfg, ARRAYS)
    wraps = {"threshold": 2, "sample-num": 3, "modulus": 2**12}
    with pytest.raises(ConfigError, match="could wrap around"):
        client_ddp.site_round(_msg(cfg, wraps), cfg, ARRAYS)


def test_site_noise_depends_on_its_secret_seed_and_the_rotation_on_the_public_one() -> None:
    cfg = RunConfig(dp_level="distributed")
    rnd = client_ddp.site_round(
        _msg(cfg, {"threshold": 2, "sample-num": 3, "modulus": 2**32}), cfg, ARRAYS
    )
    assert rnd.spec.dim == 210 and rnd.spec.padded == 256 and rnd.event.min_sites == 2
    trained = {k: v + 0.01 for k, v in ARRAYS.items()}
    a = client_ddp.noisy_vector(trained, ARRAYS, rnd, seed=1)[VECTOR_ARRAY].numpy()
    b = client_ddp.noisy_vector(trained, ARRAYS, rnd, seed=1)[VECTOR_ARRAY].numpy()
    c = client_ddp.noisy_vector(trained, ARRAYS, rnd, seed=2)[VECTOR_ARRAY].numpy()
    assert a.dtype == np.int64 and a.size == 257 and a[0] == 1
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert (a[1:] - c[1:]).std() == pytest.approx(np.sqrt(2) * rnd.spec.local_std(2), rel=0.2)
