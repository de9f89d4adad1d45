"""Text and audio augmentation: deterministic under a seed, training only, shapes kept, per
record (one record never changes another's augmentation), and a DP step still clips each
augmented record's gradient to the bound."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from opacus import GradSampleModule

from fedfuse.common.config import RunConfig
from fedfuse.common.data.augment_text_audio import AudioAugment, TextAugment, audio_augmentation
from fedfuse.common.data.dataset import load_site
from fedfuse.common.data.synthetic import generate
from fedfuse.common.models import build_model


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


IDS = torch.tensor([2, 11, 12, 13, 14, 15, 16, 3, 0, 0, 0, 0])


def test_text_augment_is_seeded_keeps_length_and_protected_ids():
    aug = TextAugment(dropout=0.2, protected=frozenset({2, 3}))
    outs = [aug(IDS, generator=_gen(s)) for s in range(20)]
    assert torch.equal(aug(IDS, generator=_gen(5)), outs[5])  # the same seed, the same record
    assert len({tuple(o.tolist()) for o in outs}) > 5  # different seeds differ
    for o in outs:
        assert o.shape == IDS.shape and o.dtype == IDS.dtype
        toks = [t for t in o.tolist() if t != 0]
        assert o.tolist() == toks + [0] * (len(o) - len(toks))  # padding stays the tail
        assert toks[0] == 2 and toks[-1] == 3  # [CLS] ... [SEP] untouched
        assert set(toks) <= set(IDS.tolist()) and len(toks) >= 3  # no new ids, never empty


def test_one_record_does_not_change_anothers_augmentation():
    aug = TextAugment(dropout=0.3)
    short = torch.tensor([7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    g1, g2 = _gen(0), _gen(0)
    aug(IDS, generator=g1)
    aug(short, generator=g2)  # a different first record (other length) ...
    assert torch.equal(aug(IDS, generator=g1), aug(IDS, generator=g2))  # ... same next one
    audio = AudioAugment()
    w1, w2 = torch.randn(400, generator=_gen(1)), torch.zeros(400)
    g1, g2 = _gen(3), _gen(3)
    audio.waveform(w1, generator=g1)
    audio.waveform(w2, generator=g2)
    nxt = torch.randn(400, generator=_gen(2))
    assert torch.equal(audio.waveform(nxt, generator=g1), audio.waveform(nxt, generator=g2))


def test_audio_augment_is_seeded_and_keeps_shapes():
    aug = AudioAugment()
    wav = torch.sin(torch.linspace(0, 200, 4000))
    a, b = aug.waveform(wav, generator=_gen(1)), aug.waveform(wav, generator=_gen(1))
    assert torch.equal(a, b) and a.shape == wav.shape
    assert not torch.equal(a, aug.waveform(wav, generator=_gen(2)))
    snr = 10 * torch.log10(wav.pow(2).mean() / (a - wav).pow(2).mean())
    assert snr < 35  # noise was added (unshifted part differs) at a finite SNR
    spec = torch.randn(1, 16, 40, generator=_gen(0))
    state = torch.random.get_rng_state()
    m1, m2 = aug.spectrogram(spec, generator=_gen(4)), aug.spectrogram(spec, generator=_gen(4))
    assert torch.equal(torch.random.get_rng_state(), state)  # global generator untouched
    assert torch.equal(m1, m2) and m1.shape == spec.shape
    assert (m1 == 0).sum() > (spec == 0).sum()  # something was masked


def _peak_hz(wav: torch.Tensor, rate: int) -> float:
    spectrum = torch.fft.rfft(wav).abs()
    return float(spectrum.argmax()) * rate / wav.numel()


def test_speed_and_pitch_change_the_frequency_and_keep_the_length():
    rate = 1000
    wav = torch.sin(2 * math.pi * 100 * torch.arange(rate) / rate)  # 1 s of 100 Hz
    quiet = dict(snr_db=(300.0, 300.0), shift=0.0)  # no noise, no shift: speed/pitch alone
    fast = AudioAugment(rate=rate, speeds=(1.1,), pitch_steps=0, **quiet)
    out = fast.waveform(wav, generator=_gen(0))
    # 10% faster: 110 Hz, and the clip ends after 1/1.1 s (zero padding keeps the length).
    assert out.shape == wav.shape and abs(_peak_hz(out, rate) - 110) <= 1
    assert out[-60:].abs().max() < 1e-6 and out[: rate * 9 // 10].abs().max() > 0.5
    pitch = AudioAugment(rate=rate, speeds=(1.0,), pitch_steps=2, **quiet)
    state = torch.random.get_rng_state()
    peaks = set()
    for seed in range(8):
        a, b = pitch.waveform(wav, generator=_gen(seed)), pitch.waveform(wav, generator=_gen(seed))
        assert torch.equal(a, b) and a.shape == wav.shape  # deterministic under the seed
        peak = _peak_hz(a, rate)
        # A whole number of semitones, at most 2 up or down: 100 * 2**(k/12).
        assert min(abs(peak - 100 * 2 ** (k / 12)) for k in range(-2, 3)) <= 1.5, peak
        peaks.add(round(peak))
    assert len(peaks) > 1  # the shift is drawn per record
    assert torch.equal(torch.random.get_rng_state(), state)  # global generator untouched
    # The preset turns them on with the run's sample rate.
    assert audio_augmentation("light", rate=rate).rate == rate


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("aug")
    return generate(root, sites=1, records=24, seed=1, modalities=("report", "audio"))[0]


def _cfg(**kw) -> RunConfig:
    base = dict(
        modalities="report,audio",
        audio_rate=1000,
        audio_seconds=0.5,
        audio_bins=8,
        max_tokens=16,
        text_augment="light",
        audio_augment="light",
        embed_dim=4,
    )
    base.update(kw)
    return RunConfig(**base)


def test_training_only_and_deterministic_under_the_round_seed(site):
    _, aug = load_site(site, _cfg())
    _, plain = load_site(site, _cfg(text_augment="none", audio_augment="none"))
    for i in range(len(aug["test"])):  # evaluation records are never augmented
        assert all(torch.equal(x, y) for x, y in zip(aug["test"][i], plain["test"][i], strict=True))
    torch.manual_seed(7)  # what a site does with the round's seed before training
    first = [aug["train"][i] for i in range(6)]
    torch.manual_seed(7)
    again = [aug["train"][i] for i in range(6)]
    torch.manual_seed(8)
    other = [aug["train"][i] for i in range(6)]
    flat = [torch.cat([t.flatten().float() for t in item]) for item in first]
    assert all(torch.equal(a, torch.cat([t.flatten().float() for t in b]))
               for a, b in zip(flat, again, strict=True))  # fmt: skip
    assert any(not torch.equal(a, torch.cat([t.flatten().float() for t in b]))
               for a, b in zip(flat, other, strict=True))  # fmt: skip
    for a, p in zip(first, [plain["train"][i] for i in range(6)], strict=True):
        assert [t.shape for t in a] == [t.shape for t in p]


def test_a_dp_step_clips_each_augmented_records_gradient(site):
    cfg = _cfg()
    _, data = load_site(site, cfg)
    torch.manual_seed(0)
    items = [data["train"][i] for i in range(8)]
    batch = [torch.stack(col) for col in zip(*items, strict=True)]
    model = build_model(cfg)
    ref = copy.deepcopy(model)
    gsm = GradSampleModule(model, loss_reduction="sum")
    crit = torch.nn.CrossEntropyLoss(reduction="sum")
    crit(gsm(*batch[:-1]), batch[-1]).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    per = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in params], 1).norm(dim=1)
    clip = 0.1
    factor = (clip / (per + 1e-6)).clamp(max=1.0)  # Opacus' clipping coefficient
    assert torch.all(per * factor <= clip * (1 + 1e-4)) and (per > clip).any()
    # Record 3's gradient in the batch is the gradient of augmented record 3 alone: no other
    # record entered it, so clipping it bounds record 3's whole contribution.
    single = [t[3:4] for t in batch]
    crit(ref(*single[:-1]), single[-1]).backward()
    ref_params = [p for p in ref.parameters() if p.requires_grad]
    for p, q in zip(params, ref_params, strict=True):
        assert torch.allclose(p.grad_sample[3], q.grad, atol=1e-5)
