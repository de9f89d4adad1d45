"""The ``pool`` image encoder's centre: learned by the site's own DP-SGD, reaching only itself.

That the centre's per-record gradient is clipped with the rest of the record's gradient is
tested where every model's clipping is (tests/common/privacy/test_bookkeeping.py: the
bookkeeping clipper against Opacus' hooks mode, the centring loss included).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedfuse.client.training import train_round
from fedfuse.common.config import RunConfig
from fedfuse.common.data.images import normalise
from fedfuse.common.data.synthetic import make_image
from fedfuse.common.models import build_model
from fedfuse.common.models.encoders import CENTRE_WEIGHT, PooledLinear
from fedfuse.common.models.objectives import make_objective
from fedfuse.common.privacy.planning import plan_site_privacy


def _images(n: int, *, positive: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic chest films as a site's loader gives them (normalised), with a skewed prior."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < positive).astype(np.int64)
    images = np.stack([make_image(lesion=bool(y), size=32, rng=rng) for y in labels])
    return normalise(torch.from_numpy(images).unsqueeze(1)), torch.from_numpy(labels)


def _image_cfg(**kw: object) -> RunConfig:
    base = dict(
        modalities="image", batch_size=100, local_epochs=3, num_rounds=3, classes="a,b",
        modality_dropout=0.0,
    )  # fmt: skip
    return RunConfig(**{**base, **kw})


def test_the_centre_learns_the_population_mean_under_dp():
    x, y = _images(600, positive=0.85)
    cfg = _image_cfg()
    encoder = build_model(cfg).encoders["image"]
    assert isinstance(encoder, PooledLinear)
    truth = encoder.pool(x).mean(dim=0)
    start = encoder.centre.weight.detach().view(-1).clone()
    # Far from the truth at the start (the lung fields are dark), so the test can fail.
    assert (start - truth).abs().max() > 0.5

    torch.manual_seed(0)
    model = build_model(cfg)
    plan = plan_site_privacy(cfg=cfg, num_train=len(y))
    train = TensorDataset(torch.ones(len(y), 1), x, y)
    history: list = []
    for r in range(cfg.num_rounds):
        res = train_round(
            model, train, cfg=cfg, plan=plan, history=history, seed=r, device=torch.device("cpu")
        )
        history.append(res.event)
    assert res.epsilon <= cfg.target_epsilon
    learned = model.encoders["image"].centre.weight.detach().view(-1)
    error = (learned - truth).abs()
    # Adam's noisy steps leave it jittering about the mean by a few hundredths.
    assert error.mean() < 0.1 and error.max() < 0.25, error


def test_the_centring_loss_reaches_only_the_centre_and_the_task_loss_never_does():
    cfg = _image_cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    x, y = _images(8, positive=0.5)
    mask = torch.ones(len(y), 1)
    objective = make_objective(cfg, model)
    centre = model.encoders["image"].centre.weight

    logits = model(mask, x)
    task = nn.functional.cross_entropy(logits, y)
    grads = torch.autograd.grad(task, [centre], allow_unused=True)
    assert grads[0] is None or torch.count_nonzero(grads[0]) == 0

    model.zero_grad()
    objective(model(mask, x), y).backward()
    with torch.no_grad():
        cells = model.encoders["image"].pool(x)
        expected = CENTRE_WEIGHT * (centre.view(-1) - cells).mean(dim=0)
    torch.testing.assert_close(centre.grad.view(-1), expected)
    # The other weights get the task's gradient alone.
    only_task = dict(model.named_parameters())
    model.zero_grad()
    nn.functional.cross_entropy(model(mask, x), y).backward()
    task_grads = {n: p.grad.clone() for n, p in only_task.items() if p.grad is not None}
    model.zero_grad()
    objective(model(mask, x), y).backward()
    for n, p in model.named_parameters():
        if n != "encoders.image.centre.weight":
            torch.testing.assert_close(p.grad, task_grads[n], msg=n)


def test_records_without_an_image_add_no_centring_loss():
    cfg = RunConfig()
    torch.manual_seed(0)
    model = build_model(cfg)
    n = 6
    mask = torch.ones(n, 2)
    mask[:3, 0] = 0  # no image for the first three
    image = torch.randn(n, 1, cfg.image_size, cfg.image_size)
    tokens = torch.randint(1, cfg.text_buckets, (n, cfg.max_tokens))
    model(mask, image, tokens)
    extra = model.auxiliary_loss
    assert extra is not None and extra.shape == (n,)
    assert torch.all(extra[:3] == 0) and torch.all(extra[3:] > 0)


def test_the_reported_training_loss_is_the_tasks_alone():
    x, y = _images(64, positive=0.7)
    cfg = _image_cfg(learning_rate=1e-9, local_epochs=1, batch_size=64)  # weights stay put
    torch.manual_seed(0)
    model = build_model(cfg)
    mask = torch.ones(len(y), 1)
    with torch.no_grad():
        task = float(nn.functional.cross_entropy(model(mask, x), y))
        centring = float(model.auxiliary_loss.mean())
    assert centring > 0.01  # large enough that adding it would show
    res = train_round(
        model,
        TensorDataset(mask, x, y),
        cfg=cfg,
        plan=None,
        history=[],
        seed=0,
        device=torch.device("cpu"),
    )
    assert abs(res.train_loss - task) < 1e-4


def test_a_pool_weights_file_without_a_centre_loads_as_before(tmp_path):
    torch.manual_seed(0)
    old = PooledLinear(dim=8)
    state = {k: v for k, v in old.state_dict().items() if k != "centre.weight"}
    path = tmp_path / "pool.pt"
    torch.save(state, path)
    loaded = PooledLinear(dim=8, weights=str(path))
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        # The fixed centre of the weights' time: 0.5 in every cell.
        torch.testing.assert_close(loaded(x), old.proj(old.pool(x) - 0.5))
