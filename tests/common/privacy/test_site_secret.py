"""The site's DP secret: the server cannot regenerate a site's noise or batches."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from fedfuse.client.app import app
from fedfuse.client.node_config import NodeConfig
from fedfuse.common.config import RunConfig
from fedfuse.common.data.synthetic import generate
from fedfuse.common.privacy.site_secret import (
    SiteSecretError,
    load_or_create_secret,
    round_seed,
    secret_path,
)
from tests.support.requests import _train_request
from tests.support.sites import copy_site


def test_a_new_site_gets_a_random_private_secret(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    sa = load_or_create_secret(a)
    assert len(sa) == 32 and load_or_create_secret(a) == sa  # stable once made
    assert load_or_create_secret(b) != sa  # random per site
    mode = stat.S_IMODE(os.stat(secret_path(a)).st_mode)
    assert mode == 0o600, oct(mode)  # readable by the site's user only


def test_a_malformed_secret_is_named_not_replaced(tmp_path: Path) -> None:
    path = secret_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"short")
    with pytest.raises(SiteSecretError, match=r"dp-secret.*32 bytes, found 5"):
        load_or_create_secret(tmp_path)
    assert path.read_bytes() == b"short"


def test_the_seed_changes_with_anything_the_server_sends() -> None:
    key = b"k" * 32
    base = {"round": 2, "model": "abc", "config": {"learning-rate": 0.01}}
    seed = round_seed(key, base)
    assert 0 <= seed < 2**62
    assert round_seed(key, dict(base)) == seed  # an exact replay repeats the reply
    assert round_seed(b"j" * 32, base) != seed  # another site's key
    assert round_seed(key, {**base, "model": "abd"}) != seed  # another global model
    assert round_seed(key, {**base, "config": {"learning-rate": 0.02}}) != seed
    assert round_seed(key, {**base, "round": 3}) != seed


def test_synthetic_sites_get_a_secret_from_the_public_seed(tmp_path: Path) -> None:
    (a,) = generate(tmp_path / "a", sites=1, records=20, seed=5, image_size=16)
    (b,) = generate(tmp_path / "b", sites=1, records=20, seed=5, image_size=16)
    (c,) = generate(tmp_path / "c", sites=1, records=20, seed=6, image_size=16)
    assert load_or_create_secret(a) == load_or_create_secret(b)  # reproducible simulations
    assert load_or_create_secret(c) != load_or_create_secret(a)


def _train_once(site: Path) -> dict[str, torch.Tensor]:
    """One real ClientApp round (DP-SGD) on ``site`` with a fresh ledger; the reply's model.
    As a virtual site of a simulation (keyed generators: a deployed site draws its noise from a
    secure generator that nobody can replay; tests/common/privacy/test_secure_rng.py). The
    authenticated head goes too: a site keeping it refuses to train without its ledger."""
    for p in (site / ".fedfuse").glob("ledger*"):
        p.unlink()
    cfg = RunConfig(
        num_rounds=1,
        local_epochs=1,
        batch_size=64,
        target_epsilon=4.0,
        accountant="rdp",
        data_dir=str(site.parent),
    )
    torch.manual_seed(0)
    msg, context = _train_request(cfg, site, **{"run-id": "secret", "run-uid": "u-secret"})
    context.node_config = {"partition-id": 0, "num-partitions": 1}
    reply = app(msg, context)
    assert not reply.has_error(), reply.error.reason
    return reply.content["arrays"].to_torch_state_dict()


def test_the_noise_depends_on_the_site_secret_not_only_on_public_values(
    tmp_path: Path, synth_sites: list[Path]
) -> None:
    """Everything the server knows (model, config, round, site name) fixed: the update still
    changes with the site's secret, so the server cannot regenerate the noise and batches; the
    same secret repeats the update exactly (reproducible at the site)."""
    site = tmp_path / "site-0"
    copy_site(synth_sites[0], site)
    first = _train_once(site)
    again = _train_once(site)
    for k in first:
        torch.testing.assert_close(first[k], again[k], rtol=0, atol=0, msg=k)
    original = secret_path(site).read_bytes()
    secret_path(site).write_bytes(os.urandom(32))
    other = _train_once(site)
    changed = sum(not torch.equal(first[k], other[k]) for k in first)
    assert changed > len(first) // 2, f"only {changed} of {len(first)} tensors changed"
    secret_path(site).write_bytes(original)
    back = _train_once(site)
    assert all(torch.equal(first[k], back[k]) for k in first)


def test_a_deployed_site_refuses_public_noise_seeds(tmp_path: Path, synth_sites: list[Path]):
    """`noise-seed = public` is for simulations: a site started with a data path refuses it."""
    site = tmp_path / "site-0"
    copy_site(synth_sites[0], site)
    cfg = RunConfig(num_rounds=1, local_epochs=1, batch_size=64, noise_seed="public")
    msg, context = _train_request(cfg, site, **{"run-uid": "u-public"})
    reply = app(msg, context)  # the ClientApp's outermost mod turns it into an error reply
    assert reply.has_error() and reply.error.reason.startswith("site site-0: ConfigError: ")
    assert "noise-seed = 'public'" in reply.error.reason


def test_secagg_settings_feed_the_seed_only_when_they_size_the_noise(
    tmp_path: Path, synth_sites: list[Path]
) -> None:
    """Under distributed DP the threshold and modulus size the site's noise share: a server
    asking for the same round at two thresholds must get independent noise, or it could solve
    for the update. Under DP-SGD they only change how the same update travels."""
    from fedfuse.client.handlers import _round_seed
    from fedfuse.client.site import SiteInfo

    site = tmp_path / "site-0"
    copy_site(synth_sites[0], site)
    info = SiteInfo("site-0", site)

    def seed(**changes: object) -> int:
        cfg = RunConfig().replace(**changes)
        msg, context = _train_request(cfg, site)
        state = msg.content["arrays"].to_torch_state_dict()
        node = NodeConfig.parse(context.node_config)
        return _round_seed(msg, context, node, cfg, info, 1, state, None)

    torch.manual_seed(0)
    base = seed(dp_level="distributed", reconstruction_threshold=2)
    torch.manual_seed(0)
    assert seed(dp_level="distributed", reconstruction_threshold=3) != base
    torch.manual_seed(0)
    rec = seed(dp_level="record", reconstruction_threshold=2)
    torch.manual_seed(0)
    assert seed(dp_level="record", reconstruction_threshold=3) == rec
