"""Audio loading and features: WAV (any rate, mono or stereo) -> mono, one rate -> log-mel / MFCC.

Decoding uses ``scipy.io.wavfile``: it reads integer PCM (8/16/24/32-bit), 32/64-bit float
and WAVE_FORMAT_EXTENSIBLE files, offline. (On this stack ``torchaudio.load`` needs the separate
``torchcodec`` package, and the stdlib ``wave`` module reads integer PCM only.) Resampling and
the spectrogram use torchaudio's transforms.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchaudio

from fedfuse.common.errors import AudioReadError


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Decode a WAV file to ``(channels, samples)`` float32 in [-1, 1] and its sample rate.

    Raises:
        AudioReadError: not a WAV, truncated, an unsupported encoding, or no samples.
    """
    # lazy: scipy takes about a second to load; only sites with audio need it
    from scipy.io import wavfile

    try:
        with warnings.catch_warnings():
            # Unknown chunks (e.g. LIST metadata) are legal and skipped; not the user's problem.
            warnings.simplefilter("ignore", wavfile.WavFileWarning)
            rate, data = wavfile.read(str(path), mmap=False)
    except Exception as exc:  # scipy raises ValueError, EOFError, struct errors ...
        raise AudioReadError(f"cannot decode WAV: {type(exc).__name__}: {exc}") from exc
    if rate <= 0:
        raise AudioReadError(f"cannot decode WAV: sample rate {rate} is not positive")
    if data.size == 0:
        raise AudioReadError("WAV holds no samples")
    if data.dtype == np.uint8:  # 8-bit PCM is unsigned, centred on 128
        x = (data.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(data.dtype, np.integer):
        x = data.astype(np.float32) / float(np.iinfo(data.dtype).max + 1)
    else:
        x = data.astype(np.float32)
    if not np.isfinite(x).all():
        raise AudioReadError("WAV holds NaN or infinite samples")
    x = x.reshape(len(x), -1).T  # (channels, samples)
    return np.ascontiguousarray(x), int(rate)


def check_audio(path: Path) -> str | None:
    """None when the WAV decodes, else the reason it does not."""
    try:
        read_wav(path)
    except AudioReadError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class AudioFeatures:
    """WAV -> ``(1, bins, frames)`` features at a fixed rate and length.

    Args:
        rate: target sample rate (Hz); every file is resampled to it.
        seconds: clips are cut to (or zero-padded to) this length.
        kind: ``logmel`` (log mel spectrogram) or ``mfcc``.
        bins: mel bands or MFCC coefficients.
    """

    rate: int
    seconds: float
    kind: str = "logmel"
    bins: int = 32

    @property
    def num_samples(self) -> int:
        return int(round(self.rate * self.seconds))

    @property
    def n_fft(self) -> int:
        # About 64 ms windows: resolves heart sounds (tens of ms) and murmur bands.
        return 1 << max(6, int(round(np.log2(self.rate * 0.064))))

    @property
    def hop(self) -> int:
        return self.n_fft // 4

    @property
    def shape(self) -> tuple[int, int, int]:
        return (1, self.bins, self.num_samples // self.hop + 1)

    @functools.cached_property
    def _transform(self) -> torch.nn.Module:
        mel = {
            "n_fft": self.n_fft,
            "hop_length": self.hop,
            "n_mels": max(self.bins, 8),
            "f_min": 20.0,
            "f_max": self.rate / 2,
        }
        if self.kind == "mfcc":
            return torchaudio.transforms.MFCC(
                sample_rate=self.rate, n_mfcc=self.bins, log_mels=True, melkwargs=mel
            )
        if self.kind == "logmel":
            mel["n_mels"] = self.bins
            return torchaudio.transforms.MelSpectrogram(sample_rate=self.rate, **mel)
        raise ValueError(f"audio features must be 'logmel' or 'mfcc'; found {self.kind!r}")

    def waveform(self, samples: np.ndarray, rate: int) -> torch.Tensor:
        """``(channels, n)`` at ``rate`` -> mono ``(num_samples,)`` at :attr:`rate`."""
        mono = torch.from_numpy(samples).mean(dim=0)  # stereo (or more) -> mono
        if rate != self.rate:
            mono = torchaudio.functional.resample(mono, orig_freq=rate, new_freq=self.rate)
        n = self.num_samples
        if mono.numel() >= n:
            return mono[:n].contiguous()
        return torch.nn.functional.pad(mono, (0, n - mono.numel()))

    def __call__(self, samples: np.ndarray, rate: int) -> torch.Tensor:
        return self.spectrogram(self.waveform(samples, rate))

    def spectrogram(self, wav: torch.Tensor) -> torch.Tensor:
        """A :meth:`waveform` -> the ``(1, bins, frames)`` features the encoder takes."""
        with torch.no_grad():
            spec = self._transform(wav)
        if self.kind == "logmel":
            spec = torch.log(spec + 1e-6)
        # Per-clip standardisation: recording gain differs between stethoscopes and sites;
        # it uses this clip alone, so nothing is learned from (or shared about) other records.
        spec = (spec - spec.mean()) / spec.std().clamp_min(1e-5)
        return spec.unsqueeze(0).to(torch.float32)

    def load(self, path: str | Path) -> torch.Tensor:
        samples, rate = read_wav(path)
        return self(samples, rate)
