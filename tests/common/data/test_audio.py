"""WAV decoding and features on files written here: two sample rates, stereo, 8-bit, float."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedfuse.common.config import RunConfig
from fedfuse.common.data.audio import AudioFeatures, AudioReadError, read_wav
from fedfuse.common.data.dataset import load_site
from fedfuse.common.data.manifest import load_manifest
from fedfuse.common.errors import DataValidationError
from tests.support.mmutil import tone, write_manifest, write_wav

FEATS = AudioFeatures(rate=2000, seconds=1.0, kind="logmel", bins=32)


def test_read_wav_scales_pcm_to_unit_range(tmp_path):
    x = tone(100, 8000, 0.1, amp=0.5)
    samples, rate = read_wav(write_wav(tmp_path / "a.wav", x, 8000))
    assert rate == 8000 and samples.shape == (1, 800) and samples.dtype == np.float32
    np.testing.assert_allclose(samples[0], x, atol=1 / 32767)
    samples8, _ = read_wav(write_wav(tmp_path / "b.wav", x, 8000, sampwidth=1))
    np.testing.assert_allclose(samples8[0], x, atol=1 / 127)


def test_float_wav_reads(tmp_path):
    from scipy.io import wavfile

    x = tone(100, 4000, 0.2)
    wavfile.write(tmp_path / "f.wav", 4000, x)  # IEEE float, which the stdlib wave cannot read
    samples, rate = read_wav(tmp_path / "f.wav")
    assert rate == 4000
    np.testing.assert_allclose(samples[0], x, atol=1e-7)


def test_two_rates_resample_to_one_and_give_the_same_features(tmp_path):
    a = write_wav(tmp_path / "8k.wav", tone(300, 8000, 1.0), 8000)
    b = write_wav(tmp_path / "4k.wav", tone(300, 4000, 1.0), 4000)
    fa, fb = FEATS.load(a), FEATS.load(b)
    assert fa.shape == fb.shape == FEATS.shape == (1, 32, 2000 // FEATS.hop + 1)
    # The 300 Hz tone lands in the same mel band whatever the recording rate.
    assert int(fa[0].mean(1).argmax()) == int(fb[0].mean(1).argmax())
    assert torch.allclose(fa, fb, atol=0.15)
    # The resampled waveforms themselves agree.
    wa = FEATS.waveform(*read_wav(a))
    wb = FEATS.waveform(*read_wav(b))
    assert wa.shape == (2000,)
    assert torch.allclose(wa[100:-100], wb[100:-100], atol=0.02)
    # A different tone lands elsewhere.
    c = FEATS.load(write_wav(tmp_path / "c.wav", tone(800, 4000, 1.0), 4000))
    assert int(c[0].mean(1).argmax()) > int(fa[0].mean(1).argmax())


def test_stereo_is_mixed_to_mono(tmp_path):
    left, right = tone(200, 4000, 1.0, 0.6), tone(200, 4000, 1.0, 0.2)
    stereo = write_wav(tmp_path / "s.wav", np.stack([left, right], axis=1), 4000)
    samples, _ = read_wav(stereo)
    assert samples.shape == (2, 4000)
    mono = write_wav(tmp_path / "m.wav", (left + right) / 2, 4000)
    assert torch.allclose(
        FEATS.waveform(*read_wav(stereo)), FEATS.waveform(*read_wav(mono)), atol=2e-4
    )


def test_short_clips_are_padded_long_ones_cut(tmp_path):
    short = FEATS.waveform(*read_wav(write_wav(tmp_path / "s.wav", tone(200, 2000, 0.25), 2000)))
    long = FEATS.waveform(*read_wav(write_wav(tmp_path / "l.wav", tone(200, 2000, 3.0), 2000)))
    assert short.shape == long.shape == (2000,)
    assert torch.all(short[500:] == 0)


def test_mfcc_features_shape(tmp_path):
    feats = AudioFeatures(rate=2000, seconds=1.0, kind="mfcc", bins=13)
    out = feats.load(write_wav(tmp_path / "a.wav", tone(200, 4000, 1.0), 4000))
    assert out.shape == feats.shape == (1, 13, 2000 // feats.hop + 1)
    assert torch.isfinite(out).all()


def test_corrupt_and_empty_wavs(tmp_path):
    good = write_wav(tmp_path / "good.wav", tone(200, 4000, 0.5), 4000)
    (tmp_path / "trunc.wav").write_bytes(good.read_bytes()[:30])
    (tmp_path / "text.wav").write_text("hello, not audio")
    write_wav(tmp_path / "empty.wav", np.zeros((0, 1), dtype=np.float32), 4000)
    for name in ("trunc.wav", "text.wav"):
        with pytest.raises(AudioReadError, match="cannot decode WAV"):
            read_wav(tmp_path / name)
    with pytest.raises(AudioReadError, match="no samples"):
        read_wav(tmp_path / "empty.wav")
    write_manifest(
        tmp_path,
        [
            {"id": "1", "audio": "good.wav", "label": "no_finding"},
            {"id": "2", "audio": "trunc.wav", "label": "no_finding"},
        ],
        ["id", "audio", "label"],
    )
    with pytest.raises(DataValidationError) as exc:
        load_manifest(tmp_path)
    assert len(exc.value.problems) == 1
    assert exc.value.problems[0].startswith("manifest.csv:3: audio: 'trunc.wav': cannot decode WAV")


def test_site_dataset_yields_audio_features(tmp_path):
    write_wav(tmp_path / "a.wav", tone(200, 8000, 2.0), 8000)
    write_wav(tmp_path / "b.wav", np.stack([tone(300, 4000, 2.0)] * 2, axis=1), 4000)
    write_manifest(
        tmp_path,
        [
            {
                "id": "a",
                "audio": "a.wav",
                "report": "murmur",
                "label": "pneumonia",
                "split": "train",
            },
            {"id": "b", "audio": "b.wav", "report": "", "label": "no_finding", "split": "train"},
            {"id": "c", "audio": "", "report": "quiet", "label": "no_finding", "split": "train"},
        ],
        ["id", "audio", "report", "label", "split"],
    )
    cfg = RunConfig(modalities="audio,report")
    _, ds = load_site(tmp_path, cfg)
    train = ds["train"]
    shapes = {tuple(train[i][1].shape) for i in range(3)}
    assert shapes == {(1, cfg.audio_bins, int(cfg.audio_rate * cfg.audio_seconds) // 32 + 1)}
    assert [train[i][0].tolist() for i in range(3)] == [[1, 1], [1, 0], [0, 1]]
    assert torch.all(train[2][1] == 0)  # absent audio: zeros of the same shape
