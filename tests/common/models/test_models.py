import pytest
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedfuse.common.config import RunConfig
from fedfuse.common.errors import ConfigError
from fedfuse.common.models import build_model


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
    made = PrivacyEngine().make_private(
        module=model,
        optimizer=opt,
        criterion=nn.CrossEntropyLoss(),
        data_loader=DataLoader(ds, batch_size=16),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode=mode,
    )
    pmodel, popt = made[0], made[1]
    crit = made[2] if mode == "ghost" else nn.CrossEntropyLoss()
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
