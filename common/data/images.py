"""Image loading and preprocessing: PNG/JPEG (Pillow) and DICOM (pydicom) to one grayscale tensor.

Every image, whatever its format and bit depth, becomes a 2-D float32 array in [0, 1]
(:func:`load_grayscale`), then a fixed-size normalised ``(1, S, S)`` tensor
(:func:`to_model_tensor`). Training images may additionally be augmented
(:func:`train_augmentation`); validation and test images never are.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.nn import functional as F

if TYPE_CHECKING:
    from torchvision.transforms import v2

from fedfuse.common.errors import ImageReadError

DICOM_SUFFIXES = {".dcm", ".dicom"}
# Fixed normalisation constants, the same at every site: statistics computed from site data
# would either have to be shared (a leak) or differ between sites (a shift).
NORM_MEAN, NORM_STD = 0.5, 0.5
# Largest image accepted, in pixels (width x height x frames): 36 megapixels, above any
# radiograph or mammogram (a 4,096 x 5,625 mammogram is 23 MP). Checked from the header before
# decoding, so a decompression bomb (a small file that decodes to gigabytes) costs nothing;
# whole-slide pathology images must be tiled first.
IMAGE_PIXEL_LIMIT = 36_000_000


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

    Args:
        path: a PNG, JPEG or DICOM file.
        frame: which frame of a multi-frame DICOM (ignored for single-frame images).

    Raises:
        ImageReadError: the file cannot be decoded (corrupt, truncated, unsupported), or it
            has no frame ``frame``.
    """
    path = Path(path)
    if is_dicom(path):
        return _load_dicom(path, frame=frame)
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns above 89 MP; ours (below) refuses first.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            _check_pixels(im.size[0] * im.size[1], f"{im.size[0]} x {im.size[1]}")
            im.load()
            if im.mode.startswith("I"):  # 16/32-bit grayscale PNG
                full = 65535.0 if im.mode.startswith("I;16") else float(2**31 - 1)
                return np.clip(np.asarray(im, dtype=np.float32) / full, 0.0, 1.0)
            return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except Image.DecompressionBombError as exc:
        raise ImageReadError(
            f"image too large to decode safely ({exc}); the limit is "
            f"{IMAGE_PIXEL_LIMIT:,} pixels (IMAGE_PIXEL_LIMIT)"
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"cannot decode image: {exc}") from exc


def _check_pixels(pixels: int, size: str) -> None:
    if pixels > IMAGE_PIXEL_LIMIT:
        raise ImageReadError(
            f"{size} pixels is above the limit of {IMAGE_PIXEL_LIMIT:,} pixels "
            "(IMAGE_PIXEL_LIMIT in common/data/images.py); downscale the image"
        )


def _first(value: object) -> float:
    """A DICOM value that may be multi-valued (e.g. several windows): its first entry."""
    # lazy: pydicom takes about a second to load; only DICOM images need it
    import pydicom

    if isinstance(value, (pydicom.multival.MultiValue, list, tuple)):
        value = value[0]
    return float(value)  # type: ignore[arg-type]


def _load_dicom(path: Path, *, frame: int) -> np.ndarray:
    # lazy: pydicom takes about a second to load; only DICOM images need it
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        _check_pixels(rows * cols * frames, f"{cols} x {rows} x {frames} frames")
        pixels = ds.pixel_array
    except ImageReadError:
        raise
    except Exception as exc:  # pydicom raises many types for bad files
        raise ImageReadError(f"cannot decode DICOM: {type(exc).__name__}: {exc}") from exc
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if n_frames > 1:
        if not 0 <= frame < n_frames:
            raise ImageReadError(
                f"DICOM has {n_frames} frames (0..{n_frames - 1}); dicom-frame {frame} does "
                "not exist"
            )
        pixels = pixels[frame]
    pixels = pixels.astype(np.float64)
    if samples > 1 or pixels.ndim == 3:
        # Colour DICOM (pydicom returns RGB): luminance, as for a grayscale conversion.
        pixels = pixels[..., :3] @ np.array([0.299, 0.587, 0.114])
    # Modality LUT: stored values -> physical units (e.g. Hounsfield units for CT).
    slope = _first(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = _first(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    pixels = pixels * slope + intercept
    center = getattr(ds, "WindowCenter", None)
    width = getattr(ds, "WindowWidth", None)
    if center is not None and width is not None and _first(width) >= 1:
        # VOI LUT, linear function of DICOM PS3.3 C.11.2.1.2.1, scaled to [0, 1].
        c, w = _first(center), _first(width)
        if w == 1:
            out = (pixels > c - 0.5).astype(np.float64)
        else:
            out = np.clip((pixels - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)
    else:
        # No window: the image's own range (the stored bit depth says nothing about what
        # range the content uses; 12-bit data in 16-bit words is common).
        out = _scale01(pixels)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = 1.0 - out  # MONOCHROME1: the lowest value is displayed white
    return out.astype(np.float32)


def _scale01(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())
    if hi - lo < 1e-12:
        return np.zeros_like(arr)
    return (arr - lo) / (hi - lo)


def check_image(path: Path, *, frame: int = 0) -> str | None:
    """Return None when the image decodes, else the reason it does not."""
    try:
        load_grayscale(path, frame=frame)
    except ImageReadError as exc:
        return str(exc)
    return None


def to_model_tensor(arr: np.ndarray, size: int) -> torch.Tensor:
    """A [0, 1] grayscale array -> ``(1, size, size)`` float tensor, still in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).unsqueeze(0)
    if t.shape[-2:] != (size, size):
        # torchvision's tensor resize is exactly this call; torchvision itself is not imported
        # here because every site process (SecAgg+ stages included) would pay ~1 s for it.
        t = F.interpolate(
            t[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )[0].clamp_(0.0, 1.0)
    return t


def normalise(t: torch.Tensor) -> torch.Tensor:
    return (t - NORM_MEAN) / NORM_STD


def train_augmentation(kind: str) -> v2.Transform | None:
    """Augmentation for training images only (label-preserving for a chest film or a scan).

    ``light``: small rotations, shifts and zooms and mild brightness/contrast changes. No
    horizontal flip: laterality (heart on the left) is clinical information.
    """
    if kind == "none":
        return None
    if kind == "light":
        # lazy: torchvision takes about a second to import; only augmented training needs it
        from torchvision.transforms import v2

        return v2.Compose(
            [
                v2.RandomAffine(degrees=7, translate=(0.06, 0.06), scale=(0.93, 1.07)),
                v2.ColorJitter(brightness=0.15, contrast=0.15),
            ]
        )
    raise ValueError(f"augment must be 'none' or 'light'; found {kind!r}")
