"""Training-only augmentation of report token ids and heart/lung sound recordings.

Each function transforms ONE record, so under DP-SGD the per-record clipping still bounds
each record's contribution: an augmented record depends on that record and on random draws
alone, never on another record (no mixup across records). Every call draws the same amount of
randomness whatever the record holds, so one record's content cannot shift the random stream
seen by the records after it.

Randomness is passed in: a seeded ``torch.Generator`` (tests, reproducible runs) or ``None``
for torch's global generator, which a site seeds per round before training (as it does for
image augmentation; client/handlers.py). ``light`` is the only preset; off (``none``) by default.

Text (Wei & Zou 2019, "EDA", arXiv:1901.11196): token dropout, deletion of one random span,
and one swap of two tokens within a small window, on the tokenizer's ids (hashed or a
pretrained tokenizer's), with padding kept at the end and the length unchanged.

Audio (Park et al. 2019, "SpecAugment", arXiv:1904.08779): speed perturbation
(``torchaudio.transforms.SpeedPerturbation``; Ko et al. 2015, "Audio augmentation for speech
recognition") and a pitch shift of a few semitones (``torchaudio.transforms.PitchShift``), the
clip cut or padded back to its length, then additive white noise at a random SNR and a random
time shift on the waveform, then time and frequency masking on the spectrogram.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

import torch
import torchaudio

AUGMENT_CHOICES = ("none", "light")


@dataclass(frozen=True)
class TextAugment:
    """Token-level augmentation of one ``(max_tokens,)`` id tensor.

    Args:
        dropout: probability of dropping each token.
        span_p: probability of deleting one span of 1..``span_max`` tokens.
        swap_p: probability of swapping one token with another at most ``window`` later.
        pad_id: the padding id (kept as the tail).
        protected: ids never dropped or moved (a pretrained tokenizer's [CLS], [SEP]).
    """

    dropout: float = 0.1
    span_p: float = 0.5
    span_max: int = 3
    swap_p: float = 0.5
    window: int = 3
    pad_id: int = 0
    protected: frozenset[int] = frozenset()

    def __call__(
        self, ids: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        n = ids.numel()
        # A fixed number of draws per record (see the module docstring).
        u_drop = torch.rand(n, generator=generator)
        u_span = torch.rand(3, generator=generator)
        u_swap = torch.rand(3, generator=generator)
        tokens = [int(t) for t in ids.tolist() if t != self.pad_id]
        movable = [i for i, t in enumerate(tokens) if t not in self.protected]
        keep = [True] * len(tokens)
        for i in movable:
            if u_drop[i] < self.dropout:
                keep[i] = False
        if movable and u_span[0] < self.span_p:
            length = 1 + int(u_span[1] * self.span_max) if self.span_max > 0 else 0
            start = int(u_span[2] * len(movable))
            for i in movable[start : start + length]:
                keep[i] = False
        kept = [i for i in range(len(tokens)) if keep[i]]
        if not any(tokens[i] not in self.protected for i in kept) and movable:
            kept = sorted(set(kept) | {movable[0]})  # never empty a record's text entirely
        out = [tokens[i] for i in kept]
        slots = [j for j, t in enumerate(out) if t not in self.protected]
        if len(slots) > 1 and u_swap[0] < self.swap_p:
            a = int(u_swap[1] * len(slots))
            b = min(len(slots) - 1, a + 1 + int(u_swap[2] * self.window))
            if a != b:
                ia, ib = slots[a], slots[b]
                out[ia], out[ib] = out[ib], out[ia]
        out += [self.pad_id] * (n - len(out))
        return torch.tensor(out[:n], dtype=ids.dtype)


def text_augmentation(
    kind: str, *, pad_id: int = 0, protected: Iterable[int] = ()
) -> TextAugment | None:
    """The ``text-augment`` preset: ``none`` -> None, ``light`` -> :class:`TextAugment`."""
    if kind == "none":
        return None
    if kind == "light":
        return TextAugment(pad_id=pad_id, protected=frozenset(protected))
    raise ValueError(f"text-augment must be one of {list(AUGMENT_CHOICES)}; found {kind!r}")


@dataclass(frozen=True)
class AudioAugment:
    """Waveform and spectrogram augmentation of one recording.

    Args:
        snr_db: range of the signal-to-noise ratio of the added white noise, in dB.
        shift: largest time shift, as a share of the clip (zeros fill the gap).
        time_mask: largest time mask, as a share of the spectrogram's frames.
        freq_mask: largest frequency mask, as a share of its bins.
        rate: the waveform's sample rate in Hz; 0 turns speed and pitch changes off (both
            need it).
        speeds: speed factors, one drawn per record (1.0 = unchanged).
        pitch_steps: largest pitch shift in semitones, up or down (an integer drawn per
            record; 0 = off).
    """

    snr_db: tuple[float, float] = (10.0, 30.0)
    shift: float = 0.1
    time_mask: float = 0.1
    freq_mask: float = 0.125
    rate: int = 0
    # +-10%: heart rates and breathing vary far more than that between patients.
    speeds: tuple[float, ...] = (0.9, 1.0, 1.1)
    pitch_steps: int = 2

    def waveform(
        self, wav: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Speed and pitch changes (with ``rate``), noise at a random SNR, then a random shift;
        ``(n,)`` in, ``(n,)`` out."""
        n = wav.numel()
        u = torch.rand(3, generator=generator)
        noise = torch.randn(n, generator=generator)
        if self.rate > 0:
            wav = self._speed_and_pitch(wav, pitch_u=float(u[2]), generator=generator)
        snr = self.snr_db[0] + float(u[0]) * (self.snr_db[1] - self.snr_db[0])
        power = wav.pow(2).mean().clamp_min(1e-12)
        noisy = wav + noise * torch.sqrt(power / (10.0 ** (snr / 10.0)))
        k = int(round((2 * float(u[1]) - 1) * self.shift * n))
        out = torch.zeros_like(noisy)
        if k >= 0:
            out[k:] = noisy[: n - k]
        else:
            out[:k] = noisy[-k:]
        return out

    def _speed_and_pitch(
        self, wav: torch.Tensor, *, pitch_u: float, generator: torch.Generator | None
    ) -> torch.Tensor:
        n = wav.numel()
        speed = torchaudio.transforms.SpeedPerturbation(self.rate, list(self.speeds))
        # SpeedPerturbation draws its factor from torch's global generator: run it on a seed
        # from ``generator`` (one draw, whatever the factor), so a seeded run repeats.
        out = _with_generator(lambda: speed(wav.unsqueeze(0))[0], generator).squeeze(0)
        steps = round(-self.pitch_steps + pitch_u * 2 * self.pitch_steps)
        if steps != 0:
            with torch.no_grad():
                out = _pitch_shift(self.rate, steps, _n_fft(out.numel()))(out.unsqueeze(0))[0]
        if out.numel() >= n:  # the clip keeps its length: the encoder's input shape
            return out[:n].contiguous()
        return torch.nn.functional.pad(out, (0, n - out.numel()))

    def spectrogram(
        self, spec: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Time and frequency masking of a ``(1, bins, frames)`` spectrogram (masked to 0, the
        clip's mean after standardisation)."""
        bins, frames = spec.shape[-2:]
        masks = torch.nn.Sequential(
            torchaudio.transforms.TimeMasking(max(1, int(self.time_mask * frames))),
            torchaudio.transforms.FrequencyMasking(max(1, int(self.freq_mask * bins))),
        )
        return _with_generator(lambda: masks(spec), generator)


@lru_cache(maxsize=32)
def _pitch_shift(rate: int, steps: int, n_fft: int) -> torchaudio.transforms.PitchShift:
    # Cached: the transform builds its resampling kernel on first use.
    return torchaudio.transforms.PitchShift(rate, steps, n_fft=n_fft)


def _n_fft(n: int) -> int:
    """torchaudio's default FFT size (512), or the largest power of two a short clip holds."""
    size = 512
    while size > 16 and size > n:
        size //= 2
    return size


def audio_augmentation(kind: str, *, rate: int = 0) -> AudioAugment | None:
    """The ``audio-augment`` preset: ``none`` -> None, ``light`` -> :class:`AudioAugment`
    (speed and pitch changes with ``rate``, the waveform's sample rate)."""
    if kind == "none":
        return None
    if kind == "light":
        return AudioAugment(rate=rate)
    raise ValueError(f"audio-augment must be one of {list(AUGMENT_CHOICES)}; found {kind!r}")


def _with_generator(fn: Callable[[], torch.Tensor], generator: torch.Generator | None):
    """Run ``fn`` (which draws from torch's global generator, as torchaudio's transforms do)
    on a seed drawn from ``generator``, leaving the global generator's state as it was."""
    if generator is None:
        return fn()
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()
