"""Missing modalities: modality dropout, the synthetic generator's missing/absent modalities,
and the per-modality contribution report."""

from __future__ import annotations

import csv

import pytest
import torch
from torch.utils.data import TensorDataset

from fedfuse.common.data.audio import read_wav
from fedfuse.common.data.synthetic import finding_combos, generate
from fedfuse.common.explain import contribution_markdown, modality_contributions
from fedfuse.common.models.fusion import FusionModel, LateHead
from fedfuse.common.models.objectives import modality_dropout


def test_modality_dropout_never_hides_everything_and_keeps_absent_absent():
    gen = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 1, 1, 0]] * 2000, dtype=torch.float32)
    out = modality_dropout(mask, 0.3, generator=gen)
    assert torch.all(out.sum(1) >= 1)
    assert torch.all(out <= mask)  # only hides; never invents a modality
    assert torch.equal(out[1::3], mask[1::3])  # a single modality is never hidden
    full = out[0::3]
    # Each of four present modalities is hidden with p = 0.3 (rows losing all four are kept):
    assert (1 - full.mean()).item() == pytest.approx(0.3 * (1 - 0.3**3), abs=0.02)
    assert torch.equal(modality_dropout(mask, 0.0), mask)


def test_finding_combos():
    pos, neg = finding_combos(2)
    assert pos == [(True, True)]
    assert neg == [(False, False), (True, False), (False, True)]  # the original draw order
    pos4, neg4 = finding_combos(4)
    assert len(pos4) == 5 and all(sum(c) >= 3 for c in pos4) and len(neg4) == 11


def test_generator_audio_tabular_missing_and_absent(tmp_path):
    sites = generate(
        tmp_path,
        sites=3,
        records=60,
        seed=3,
        modalities=("image", "report", "audio", "tabular"),
        missing_rate=[0.0, 0.5, 0.0],
        absent={"site-2": ["audio"]},
    )
    rows = [list(csv.DictReader(open(s / "manifest.csv", encoding="utf-8"))) for s in sites]
    assert list(rows[0][0]) == [
        "id",
        "image",
        "report",
        "audio",
        "tab.crp",
        "tab.wbc",
        "tab.temp",
        "label",
    ]
    assert "audio" not in rows[2][0] and not (sites[2] / "audio").exists()
    # site-0 records 4 kHz mono, site-1 8 kHz stereo
    s0, r0 = read_wav(sites[0] / rows[0][0]["audio"])
    assert r0 == 4000 and s0.shape[0] == 1
    s1, r1 = read_wav(sites[1] / next(r["audio"] for r in rows[1] if r["audio"]))
    assert r1 == 8000 and s1.shape[0] == 2
    # With missing_rate 0 every record has image, report and audio; at 0.5 about half lack one.
    assert all(r["image"] and r["report"] and r["audio"] for r in rows[0])
    lacking = sum(1 for r in rows[1] if not (r["image"] and r["report"] and r["audio"]))
    assert 0.2 < lacking / len(rows[1]) < 0.8
    # A dropped file is really gone; the manifest names only files that exist.
    for site, rs in zip(sites, rows, strict=True):
        for r in rs:
            for col in ("image", "audio"):
                if r.get(col):
                    assert (site / r[col]).is_file()
    # Lab values are numbers, occasionally missing.
    crp = [r["tab.crp"] for r in rows[0]]
    assert all(c == "" or float(c) > 0 for c in crp)


def test_default_generator_keeps_the_two_modality_format(tmp_path):
    (site,) = generate(tmp_path, sites=1, records=12, seed=0)
    header = open(site / "manifest.csv", encoding="utf-8").readline().strip()
    assert header == "id,image,report,label" and not (site / "audio").exists()


def test_contributions_by_hand():
    """A late-fusion model whose report classifier outputs 0: hiding the report changes no
    ranking (drop 0); hiding the image leaves a constant score (AUROC 0.5)."""
    torch.manual_seed(0)
    enc = {"image": torch.nn.Identity(), "report": torch.nn.Identity()}
    head = LateHead(dim=1, num_modalities=2, num_classes=2)
    with torch.no_grad():
        for h in head.heads:
            for p in h.parameters():
                p.zero_()
        # image classifier: logit_1 = relu(x), logit_0 = 0
        head.heads[0][0].weight.fill_(1.0)
        head.heads[0][2].weight[1].fill_(1.0)
    model = FusionModel(enc, head)
    x = torch.linspace(0, 1, 20).unsqueeze(1)
    y = (x.squeeze(1) > 0.5).long()
    mask = torch.ones(20, 2)
    ds = TensorDataset(mask, x, torch.randn(20, 1), y)
    rep = modality_contributions(model, ds, device=torch.device("cpu"))
    assert rep["auroc"] == 1.0
    assert rep["modalities"]["report"]["auroc-drop"] == 0.0
    assert rep["modalities"]["image"]["auroc-without"] == 0.5
    assert rep["modalities"]["image"]["weight"] == pytest.approx(0.5)  # equal weights at start
    lines = contribution_markdown(
        {"eval-auroc-drop-image": 0.5, "eval-auroc-without-image": 0.5}, ("image", "report")
    )
    assert "| image | - | 0.5000 | 0.5000 |" in lines and "| report | - | - | - |" in lines
    assert contribution_markdown({}, ("image",)) == []
    assert rep["modalities"]["image"]["present"] == 1.0
