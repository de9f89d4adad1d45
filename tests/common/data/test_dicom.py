"""DICOM decoding on files written here with pydicom: photometric, rescale, window, bit depths,
multi-frame, corrupt files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedfuse.common.config import RunConfig
from fedfuse.common.data.dataset import load_site
from fedfuse.common.data.images import ImageReadError, load_grayscale
from fedfuse.common.data.manifest import load_manifest
from fedfuse.common.errors import DataValidationError
from tests.support.mmutil import write_dicom, write_manifest


def _window(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 linear VOI function, output in [0, 1] (the oracle)."""
    return np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)


def test_monochrome1_is_inverted(tmp_path):
    px = np.array([[0, 100], [200, 300]], dtype=np.uint16)
    m2 = load_grayscale(write_dicom(tmp_path / "m2.dcm", px, photometric="MONOCHROME2"))
    m1 = load_grayscale(write_dicom(tmp_path / "m1.dcm", px, photometric="MONOCHROME1"))
    np.testing.assert_allclose(m2, [[0, 1 / 3], [2 / 3, 1]], atol=1e-6)
    np.testing.assert_allclose(m1, 1 - m2, atol=1e-6)


def test_rescale_slope_intercept_then_window(tmp_path):
    # Stored values -> HU = 2 * stored - 1024 -> [0, 40, 140, 200]; soft-tissue window 40/400.
    px = np.array([[512, 532], [582, 612]], dtype=np.uint16)
    path = write_dicom(tmp_path / "ct.dcm", px, slope=2.0, intercept=-1024.0, center=40, width=400)
    hu = np.array([[0, 40], [140, 200]], dtype=np.float64)
    np.testing.assert_allclose(load_grayscale(path), _window(hu, 40, 400), atol=1e-6)
    # Several windows: the first one applies.
    path2 = write_dicom(
        tmp_path / "ct2.dcm", px, slope=2.0, intercept=-1024.0, center=[40, 400], width=[400, 2000]
    )
    np.testing.assert_allclose(load_grayscale(path2), _window(hu, 40, 400), atol=1e-6)
    # Without the rescale the same window would see stored values: a different image.
    plain = write_dicom(tmp_path / "raw.dcm", px, center=40, width=400)
    assert not np.allclose(load_grayscale(plain), load_grayscale(path))


@pytest.mark.parametrize(
    ("dtype", "bits", "values"),
    [
        (np.uint8, 8, [0, 85, 170, 255]),
        (np.uint16, 12, [0, 1365, 2730, 4095]),
        (np.uint16, 16, [0, 21845, 43690, 65535]),
        (np.int16, 16, [-1000, 0, 1000, 2000]),
    ],
)
def test_bit_depths_scale_to_unit_range(tmp_path, dtype, bits, values):
    px = np.array(values, dtype=dtype).reshape(2, 2)
    out = load_grayscale(write_dicom(tmp_path / "x.dcm", px, bits_stored=bits))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.ravel(), [0, 1 / 3, 2 / 3, 1], atol=1e-3)


def test_multiframe_default_first_and_configurable(tmp_path):
    frames = np.array([[[0, 100]], [[200, 300]], [[400, 500]]], dtype=np.uint16)
    path = write_dicom(tmp_path / "cine.dcm", frames, center=250, width=501)
    for k in range(3):
        expected = _window(frames[k].astype(float), 250, 501)
        np.testing.assert_allclose(load_grayscale(path, frame=k), expected, atol=1e-6)
    np.testing.assert_allclose(load_grayscale(path), _window(frames[0].astype(float), 250, 501))
    with pytest.raises(ImageReadError, match=r"3 frames \(0..2\); dicom-frame 3"):
        load_grayscale(path, frame=3)


def test_dataset_uses_configured_frame(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    frames = np.stack([np.full((8, 8), v, dtype=np.uint16) for v in (0, 250, 500)])
    write_dicom(site / "cine.dcm", frames, center=250, width=501)
    write_manifest(
        site,
        [{"id": "a", "image": "cine.dcm", "label": "no_finding", "split": "train"}],
        ["id", "image", "label", "split"],
    )
    for frame, value in ((0, 0.0), (2, 1.0)):
        cfg = RunConfig(modalities="image", image_size=8, dicom_frame=frame)
        _, ds = load_site(site, cfg)
        mask, image, _ = ds["train"][0]
        assert mask.tolist() == [1.0]
        expected = (_window(np.array(value * 500.0), 250, 501) - 0.5) / 0.5
        assert torch.allclose(image, torch.full_like(image, float(expected)), atol=1e-5)
    # A frame the file does not have is a validation error naming the file.
    with pytest.raises(DataValidationError, match="cine.dcm.*dicom-frame 5"):
        load_site(site, RunConfig(modalities="image", image_size=8, dicom_frame=5))


def test_corrupt_dicom_is_a_validation_error_naming_file_and_line(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    good = write_dicom(site / "good.dcm", np.arange(16, dtype=np.uint16).reshape(4, 4))
    data = good.read_bytes()
    (site / "truncated.dcm").write_bytes(data[: len(data) - 20])  # pixel data cut short
    (site / "garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"not a dataset" * 5)
    write_manifest(
        site,
        [
            {"id": "1", "image": "good.dcm", "label": "no_finding"},
            {"id": "2", "image": "truncated.dcm", "label": "no_finding"},
            {"id": "3", "image": "garbage.dcm", "label": "pneumonia"},
        ],
        ["id", "image", "label"],
    )
    with pytest.raises(DataValidationError) as exc:
        load_manifest(site)
    problems = exc.value.problems
    assert len(problems) == 2
    assert problems[0].startswith("manifest.csv:3: image: 'truncated.dcm': cannot decode DICOM")
    assert problems[1].startswith("manifest.csv:4: image: 'garbage.dcm': cannot decode DICOM")
