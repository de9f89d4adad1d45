"""The site's half of distributed DP (client/distributed_dp.py): it refuses to send an update that
did not come through SecAgg+ or whose sum could wrap around, and noises with its own secret (a
simulated site) or with a secure generator nobody can regenerate (a deployed site)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedfuse.client import distributed_dp as client_ddp
from fedfuse.client.node_config import NodeConfig
from fedfuse.common.config import RunConfig
from fedfuse.common.errors import ConfigError
from fedfuse.common.privacy.secure_rng import SecureRandom
from fedfuse.common.secagg.distributed_dp import ROUND_KEY, VECTOR_ARRAY, VECTOR_KEY
from fedfuse.common.secagg.protocol import SecAggProtocolError

ARRAYS = {"w": np.zeros((20, 10), np.float32), "b": np.zeros(10, np.float32)}


def _round(cfg: RunConfig, round_info: dict | None, arrays: dict = ARRAYS):  # noqa: ANN202
    return client_ddp.site_round(cfg, arrays, round_info, run_uid="u1", server_round=3)


def test_site_refuses_without_secagg_and_when_the_sum_could_wrap() -> None:
    cfg = RunConfig(dp_level="distributed")
    with pytest.raises(SecAggProtocolError, match="did not come through SecAgg\\+"):
        _round(cfg, None)
    wraps = {"threshold": 2, "sample-num": 3, "modulus": 2**12}
    with pytest.raises(ConfigError, match="could wrap around"):
        _round(cfg, wraps)


def test_site_noise_depends_on_its_secret_seed_and_the_rotation_on_the_public_one() -> None:
    cfg = RunConfig(dp_level="distributed")
    rnd = _round(cfg, {"threshold": 2, "sample-num": 3, "modulus": 2**32})
    assert rnd.spec.dim == 210 and rnd.spec.padded == 256 and rnd.event.min_sites == 2
    trained = {k: v + 0.01 for k, v in ARRAYS.items()}
    a = client_ddp.noisy_vector(trained, ARRAYS, rnd, seed=1)[VECTOR_ARRAY].numpy()
    b = client_ddp.noisy_vector(trained, ARRAYS, rnd, seed=1)[VECTOR_ARRAY].numpy()
    c = client_ddp.noisy_vector(trained, ARRAYS, rnd, seed=2)[VECTOR_ARRAY].numpy()
    assert a.dtype == np.int64 and a.size == 257 and a[0] == 1
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert (a[1:] - c[1:]).std() == pytest.approx(np.sqrt(2) * rnd.spec.local_std(2), rel=0.2)


def test_a_deployed_site_draws_its_noise_from_the_secure_generator() -> None:
    """With a SecureRandom (a deployed site) the noise is not the keyed draw, and it is the
    planned discrete Gaussian: an update equal to the global model leaves only the noise."""
    cfg = RunConfig(dp_level="distributed")
    arrays = {"w": np.zeros(2**15, np.float32)}
    rnd = _round(cfg, {"threshold": 2, "sample-num": 3, "modulus": 2**32}, arrays)
    keyed = client_ddp.noisy_vector(arrays, arrays, rnd, seed=5)[VECTOR_ARRAY].numpy()
    again = client_ddp.noisy_vector(arrays, arrays, rnd, seed=5)[VECTOR_ARRAY].numpy()
    secure = client_ddp.noisy_vector(arrays, arrays, rnd, seed=5, secure_rng=SecureRandom())
    noise = secure[VECTOR_ARRAY].numpy()
    assert np.array_equal(keyed, again)  # the keyed draw is reproducible ...
    assert noise[0] == 1 and not np.array_equal(noise, keyed)  # ... and not what is sent
    sigma = rnd.spec.local_std(2)
    n = noise.size - 1
    # std of the sample std is sigma / sqrt(2n) = 0.4% here: 3% is over 7 of them.
    assert noise[1:].std() == pytest.approx(sigma, rel=0.03)
    assert abs(noise[1:].mean()) < 5 * sigma / np.sqrt(n)
    assert np.array_equal(noise[1:], np.rint(noise[1:]))  # integers, as the mechanism needs


def test_the_train_reply_of_a_deployed_site_carries_fresh_noise(
    synth_sites: list[Path], tmp_path: Path
) -> None:
    """The ClientApp's train function at a deployed site (no partition-id): the same request
    twice (same secret, model and round: the same keyed seed) sends different noise, whose
    difference has the planned spread; a simulated site would send the same vector twice."""
    from fedfuse.client.handlers import secure_randomness, train
    from fedfuse.common.models import build_model
    from tests.support.secagg import fresh_sites

    site = fresh_sites(synth_sites[:1], tmp_path / "data") / synth_sites[0].name
    cfg = RunConfig(
        dp_level="distributed", num_rounds=1, local_epochs=1, batch_size=64, modality_dropout=0.0
    )
    state = build_model(cfg).state_dict()
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
    secagg = {"threshold": 2, "sample-num": 3, "modulus": 2**32}
    vectors = []
    for _ in range(2):
        content = RecordDict(
            {
                "config": ConfigRecord({**cfg.to_mapping(), "run-uid": "u1", "server-round": 1}),
                "arrays": ArrayRecord(state),
            }
        )
        ctxt = Context(
            run_id=1,
            node_id=5,
            node_config={"data-path": str(site)},
            state=RecordDict({ROUND_KEY: ConfigRecord(secagg)}),
            run_config={},
        )
        assert isinstance(secure_randomness(NodeConfig.parse(ctxt.node_config)), SecureRandom)
        with pytest.warns(UserWarning) if vectors else contextlib.nullcontext():
            reply = train(Message(content, dst_node_id=5, message_type="train"), ctxt)
        assert not reply.has_error(), reply.error
        vectors.append(reply.content.array_records[VECTOR_KEY][VECTOR_ARRAY].numpy())
    a, b = vectors
    rnd = _round(cfg, secagg, {k: v.numpy() for k, v in state.items()})
    assert a.size == b.size == rnd.spec.padded + 1
    assert not np.array_equal(a, b)
    assert (a[1:] - b[1:]).std() == pytest.approx(np.sqrt(2) * rnd.spec.local_std(2), rel=0.1)
