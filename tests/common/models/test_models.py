import pytest
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset

from fedfuse.common.config import RunConfig
from fedfuse.common.errors import ConfigError
from fedfuse.common.models import build_model
from fedfuse.common.models.objectives import make_objective


def _batch(n=16, cfg=RunConfig()):
    mask = torch.ones(n, 2)
    mask[::3, 1] = 0  # some records lack a report
    image = torch.randn(n, 1, cfg.image_size, cfg.image_size)
    tokens = torch.randint(1, cfg.text_buckets, (n, cfg.max_tokens))
    labels = torch.randint(0, 2, (n,))
    return mask, image, tokens, labels


def test_validator_passes_and_forward_shape():
    cfg = RunConfig()
    model = build_model(cfg)
    assert ModuleValidator.validate(model, strict=False) == []
    mask, image, tokens, _ = _batch(cfg=cfg)
    assert model(mask, image, tokens).shape == (16, 2)


def test_missing_modality_features_are_ignored():
    model = build_model(RunConfig()).eval()
    mask, image, tokens, _ = _batch()
    mask[:, 1] = 0
    out1 = model(mask, image, tokens)
    out2 = model(mask, image, torch.randint(1, 100, tokens.shape))
    assert torch.allclose(out1, out2)


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_one_opacus_step_changes_every_parameter(mode):
    cfg = RunConfig()
    torch.manual_seed(0)
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ds = TensorDataset(*_batch(n=32, cfg=cfg))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    objective = make_objective(cfg, model)  # as a site trains: the centring loss included
    made = PrivacyEngine().make_private(
        module=model,
        optimizer=opt,
        criterion=objective,
        data_loader=DataLoader(ds, batch_size=16),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode=mode,
    )
    pmodel, popt = made[0], made[1]
    crit = made[2] if mode == "ghost" else objective
    mask, image, tokens, labels = ds.tensors
    loss = crit(pmodel(mask[:16], image[:16], tokens[:16]), labels[:16])
    loss.backward()
    popt.step()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    # the noise reaches every parameter tensor
    assert set(changed) == set(before)


def test_unknown_head_lists_known():
    with pytest.raises(ConfigError, match="Unknown fusion head 'nope'. Known: .*concat"):
        build_model(RunConfig(fusion="nope"))


@pytest.mark.parametrize("encoder", ["pool"])
def test_default_image_encoder_learns_a_lesion_under_dp(encoder):
    """The demo's image signal must be learnable under the demo's DP-SGD budget.

    The synthetic images' finding (a bright opacity) at epsilon 8 over 3 rounds of 3 epochs
    of 3 noisy steps on 600 records, as `make demo` trains. The CNN image encoder failed this
    (its ReLU outputs died or its noisy weights drowned the finding: image-only AUROC near 0.5,
    docs/BENCHMARKS.md#the-demo-make-demo), which left the demo stalled at the report's ceiling.
    """
    import numpy as np

    from fedfuse.client.training import train_round
    from fedfuse.common.data.synthetic import make_image
    from fedfuse.common.metrics import auroc
    from fedfuse.common.privacy.planning import plan_site_privacy

    rng = np.random.default_rng(0)
    labels = np.arange(800) % 2
    images = np.stack([make_image(lesion=bool(y), size=32, rng=rng) for y in labels])
    x = torch.from_numpy(images).unsqueeze(1)
    y = torch.from_numpy(labels)
    cfg = RunConfig(
        modalities="image", image_encoder=encoder, batch_size=200, local_epochs=3,
        num_rounds=3, classes="a,b", modality_dropout=0.0,
    )  # fmt: skip
    assert RunConfig().image_encoder == encoder  # the default is the encoder tested here
    train = TensorDataset(torch.ones(600, 1), x[:600], y[:600])
    plan = plan_site_privacy(cfg=cfg, num_train=600)
    torch.manual_seed(0)
    model = build_model(cfg)
    history: list = []
    for r in range(cfg.num_rounds):
        res = train_round(
            model, train, cfg=cfg, plan=plan, history=history, seed=r, device=torch.device("cpu")
        )
        history.append(res.event)
    assert res.epsilon <= 8.0
    model.eval()
    with torch.no_grad():
        scores = torch.softmax(model(torch.ones(200, 1), x[600:]), dim=1)[:, 1]
    assert auroc(labels[600:], scores.numpy()) > 0.85
