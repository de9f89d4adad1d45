"""Image loading: PNG/JPEG (Pillow) and DICOM (pydicom) into one grayscale float array."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

DICOM_SUFFIXES = {".dcm", ".dicom"}
RASTER_SUFFIXES = {".png", ".jpg", ".jpeg"}


class ImageReadError(ValueError):
    """An image file exists but cannot be decoded; the message says why."""


def is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def load_grayscale(path: str | Path, *, frame: int = 0) -> np.ndarray:
    """Load an image as a 2-D float32 array scaled to [0, 1].

    Raises:
        ImageReadError: the file cannot be decoded (corrupt, truncated, unsupported).
    """
    path = Path(path)
    if is_dicom(path):
        return _load_dicom(path, frame=frame)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith("I"):  # 16/32-bit grayscale PNG
                full = 65535.0 if im.mode.startswith("I;16") else float(2**31 - 1)
                return np.clip(np.asarray(im, dtype=np.float32) / full, 0.0, 1.0)
            return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"cannot decode image: {exc}") from exc


def _load_dicom(path: Path, *, frame: int) -> np.ndarray:
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array.astype(np.float32)
    except Exception as exc:  # pydicom raises many types for bad files
        raise ImageReadError(f"cannot decode DICOM: {type(exc).__name__}: {exc}") from exc
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if n_frames > 1:
        if not 0 <= frame < n_frames:
            raise ImageReadError(f"DICOM has {n_frames} frames; frame {frame} does not exist")
        pixels = pixels[frame]
    if pixels.ndim == 3:  # colour DICOM: average the channels
        pixels = pixels.mean(axis=-1)
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    pixels = pixels * slope + intercept
    center = getattr(ds, "WindowCenter", None)
    width = getattr(ds, "WindowWidth", None)
    if center is not None and width is not None:
        c = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        w = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        if w > 0:
            pixels = np.clip((pixels - (c - w / 2)) / w, 0.0, 1.0)
    out = _scale01(pixels)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = 1.0 - out  # MONOCHROME1: low values are white
    return out


def _scale01(arr: np.ndarray) -> np.ndarray:
    arr = arr.astype(np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    if hi - lo < 1e-12:
        return np.zeros_like(arr)
    return (arr - lo) / (hi - lo)


def check_image(path: Path) -> str | None:
    """Return None when the image decodes, else the reason it does not."""
    try:
        load_grayscale(path)
    except ImageReadError as exc:
        return str(exc)
    return None
