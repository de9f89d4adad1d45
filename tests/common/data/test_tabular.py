"""Tabular values: site-local standardisation (non-private runs only), fixed ranges, missing
flags, config checks."""

from __future__ import annotations

import math

import pytest
import torch

from fedfuse.common.config import RunConfig
from fedfuse.common.data.dataset import load_site
from fedfuse.common.data.manifest import load_manifest
from fedfuse.common.data.tabular import CLIP, TabularScaler
from fedfuse.common.errors import ConfigError, DataValidationError
from fedfuse.common.models import build_model
from tests.support.mmutil import write_manifest


def test_site_local_standardisation_by_hand():
    rows = [{"crp": 1.0, "wbc": 4.0}, {"crp": 3.0}, {"crp": 5.0, "wbc": 8.0}]
    s = TabularScaler.fit(rows, columns=("crp", "wbc"), private=False)
    # crp: mean 3, sample std 2; wbc: mean 6, sample std sqrt(8)
    assert s.center == (3.0, 6.0)
    assert s.scale[0] == pytest.approx(2.0) and s.scale[1] == pytest.approx(math.sqrt(8))
    assert s({"crp": 7.0}).tolist() == pytest.approx([2.0, 0.0, 1.0, 0.0])
    assert s({"crp": 3.0, "wbc": 6.0 + math.sqrt(8)}).tolist() == pytest.approx([0, 1, 1, 1])
    assert s({}).tolist() == [0, 0, 0, 0] and not s.present({}) and s.present({"wbc": 1.0})
    assert s({"crp": 1e9})[0] == CLIP  # outliers are clipped


def test_fixed_ranges_map_to_minus_one_one_and_ignore_site_data():
    rows = [{"crp": 1000.0}, {"crp": 2000.0}]
    s = TabularScaler.fit(rows, columns=("crp", "wbc"), ranges={"crp": (0.0, 200.0)}, private=False)
    assert s({"crp": 0.0})[0] == -1 and s({"crp": 200.0})[0] == 1 and s({"crp": 100.0})[0] == 0
    # wbc has no value at this site: everything will be "missing", never a division by zero
    assert s.center[1] == 0.0 and s.scale[1] == 1.0


def test_constant_column_does_not_divide_by_zero():
    s = TabularScaler.fit([{"a": 5.0}, {"a": 5.0}], columns=("a",), private=False)
    assert torch.isfinite(s({"a": 6.0})).all()


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"modalities": "image,tabular"}, "'tabular-columns' must name"),
        ({"modalities": "image,ecg"}, "'modalities' must be distinct names"),
        ({"modalities": "image,image"}, "'modalities' must be distinct names"),
        (
            {"modalities": "tabular", "tabular-columns": "crp", "tabular-ranges": "crp=5"},
            "must look like name=low:high",
        ),
        (
            {"modalities": "tabular", "tabular-columns": "crp", "tabular-ranges": "crp=5:1"},
            "finite low < high",
        ),
        (
            {"modalities": "tabular", "tabular-columns": "crp", "tabular-ranges": "wbc=0:1"},
            "not in 'tabular-columns'",
        ),
        (
            # Under DP (the default target-epsilon is finite) every column needs a range.
            {"modalities": "tabular", "tabular-columns": "crp,wbc", "tabular-ranges": "crp=0:9"},
            "under DP (finite target-epsilon) every tabular column needs a fixed range: set "
            "'tabular-ranges' for wbc",
        ),
        ({"modality-dropout": 1.0}, "'modality-dropout' must be in range [0.0, 1.0)"),
        ({"audio-features": "wavelet"}, "'audio-features' must be one of"),
    ],
)
def test_config_errors_name_the_key(raw, needle):
    with pytest.raises(ConfigError) as exc:
        RunConfig.from_mapping(raw)
    assert needle in str(exc.value)


def _site(tmp_path, rows):
    cols = ["id", "tab.crp", "tab.wbc", "tab.age", "label", "split"]
    return write_manifest(tmp_path / "site", rows, cols)


def test_non_numeric_tabular_values_are_reported_per_cell(tmp_path):
    site = _site(
        tmp_path,
        [
            {"id": "a", "tab.crp": "12.5", "tab.wbc": "high", "label": "no_finding"},
            {"id": "b", "tab.crp": "nan", "tab.wbc": "7", "label": "no_finding"},
        ],
    )
    with pytest.raises(DataValidationError) as exc:
        load_manifest(site)
    assert exc.value.problems == [
        "manifest.csv:2: tab.wbc: 'high' is not a number",
        "manifest.csv:3: tab.crp: 'nan' is not a finite number",
    ]


def test_dataset_standardises_with_train_split_statistics_only(tmp_path):
    site = _site(
        tmp_path,
        [
            {"id": "a", "tab.crp": "10", "tab.wbc": "5", "label": "no_finding", "split": "train"},
            {"id": "b", "tab.crp": "30", "tab.wbc": "", "label": "pneumonia", "split": "train"},
            {"id": "c", "tab.crp": "1000", "tab.wbc": "9", "label": "pneumonia", "split": "test"},
            {"id": "d", "tab.age": "70", "label": "no_finding", "split": "test"},
        ],
    )
    # Non-private: the only kind of run that may fit statistics on the site's records.
    cfg = RunConfig(modalities="tabular", tabular_columns="crp,wbc", target_epsilon=math.inf)
    _, ds = load_site(site, cfg)
    mask, x, y = ds["train"][0]
    crp_scale = math.sqrt(200)  # train crp: 10, 30 -> mean 20, sample std sqrt(200)
    assert mask.tolist() == [1.0] and y.item() == 0
    assert x.tolist() == pytest.approx([-10 / crp_scale, 0.0, 1.0, 1.0])
    mask_c, x_c, _ = ds["test"][0]  # the test record's crp is scaled with train statistics
    assert x_c[0] == CLIP and x_c[2:].tolist() == [1.0, 1.0]
    mask_d, x_d, _ = ds["test"][1]  # only a column the model does not read: modality absent
    assert mask_d.tolist() == [0.0] and x_d.tolist() == [0, 0, 0, 0]
    # The statistics stay with the site's dataset: the model state is the same at every site.
    assert not any("center" in k or "scale" in k for k in build_model(cfg).state_dict())


def test_under_dp_the_scaler_never_fits_statistics_on_the_site_records(tmp_path):
    """One record must not move another record's features under DP: with fixed ranges a
    record's scaled value is the same whatever the other records are; fitting is refused."""
    rows = [{"crp": 10.0}, {"crp": 30.0}]
    with pytest.raises(ConfigError, match="set 'tabular-ranges' for crp"):
        TabularScaler.fit(rows, columns=("crp",), private=True)
    ranges = {"crp": (0.0, 200.0)}
    alone = TabularScaler.fit(rows, columns=("crp",), ranges=ranges, private=True)
    neighbour = TabularScaler.fit(
        [*rows, {"crp": 190.0}], columns=("crp",), ranges=ranges, private=True
    )
    assert alone({"crp": 10.0}).tolist() == neighbour({"crp": 10.0}).tolist()
    # The site's data path refuses too (a config built without __post_init__'s check cannot
    # exist, so the check is exercised through load_site with a private config and ranges).
    site = _site(
        tmp_path,
        [
            {"id": "a", "tab.crp": "10", "tab.wbc": "5", "label": "no_finding", "split": "train"},
            {"id": "b", "tab.crp": "30", "tab.wbc": "7", "label": "pneumonia", "split": "test"},
        ],
    )
    cfg = RunConfig(
        modalities="tabular", tabular_columns="crp,wbc", tabular_ranges="crp=0:200,wbc=0:20"
    )
    _, ds = load_site(site, cfg)
    assert ds["train"][0][1][:2].tolist() == pytest.approx([-0.9, -0.5])


def test_synthetic_data_brings_its_own_ranges_so_dp_runs_need_none():
    from fedfuse.synthetic_cli import synthetic_defaults

    full = synthetic_defaults({"modalities": "image,tabular"})
    assert full["tabular-ranges"] == "crp=0:200,wbc=0:25,temp=35:41"
    some = synthetic_defaults({"modalities": "tabular", "tabular-columns": "crp,wbc"})
    assert some["tabular-ranges"] == "crp=0:200,wbc=0:25"
    RunConfig.from_mapping(some)  # private by default, and valid
    own = "crp=0:9,wbc=0:9,temp=0:9"
    mine = synthetic_defaults({"modalities": "tabular", "tabular-ranges": own})
    assert mine["tabular-ranges"] == own  # the user's ranges win
