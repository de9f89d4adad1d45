"""Helpers for the multimodal tests: write real DICOM, WAV and manifest files."""

from __future__ import annotations

import csv
import hashlib
import os
import wave
from pathlib import Path

import numpy as np


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    bits_stored: int | None = None,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    center: float | list[float] | None = None,
    width: float | list[float] | None = None,
) -> Path:
    """A valid DICOM file (explicit VR little endian) holding ``pixels``.

    ``pixels``: (rows, cols) or (frames, rows, cols); uint8, uint16 or int16.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 * pixels.dtype.itemsize
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if np.issubdtype(pixels.dtype, np.signedinteger) else 0
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    if center is not None:
        ds.WindowCenter = center
    if width is not None:
        ds.WindowWidth = width
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_wav(path: Path, samples: np.ndarray, rate: int, *, sampwidth: int = 2) -> Path:
    """PCM WAV with the stdlib ``wave`` module; ``samples`` in [-1, 1], (n,) or (n, channels)."""
    samples = samples.reshape(len(samples), -1) if samples.ndim == 1 else samples
    if sampwidth == 1:
        data = np.clip(np.round(samples * 127 + 128), 0, 255).astype(np.uint8)
    else:
        data = np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(samples.shape[1])
        w.setsampwidth(sampwidth)
        w.setframerate(rate)
        w.writeframes(data.tobytes())
    return path


def tone(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_manifest(site: Path, rows: list[dict[str, object]], columns: list[str]) -> Path:
    site.mkdir(parents=True, exist_ok=True)
    with open(site / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    return site


def snapshot(folder: Path) -> dict[str, tuple[str, int, int]]:
    """Every file under ``folder``: (sha256, size, mtime_ns), to prove nothing was changed."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = os.stat(p)
            out[str(p.relative_to(folder))] = (
                hashlib.sha256(p.read_bytes()).hexdigest(),
                st.st_size,
                st.st_mtime_ns,
            )
    return out
