"""`fedfuse data split`: counts per site, label skew growing as alpha falls, nothing duplicated,
files hard-linked, deterministic under a seed."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedfuse.cli import app
from fedfuse.common.data.manifest import load_manifest
from fedfuse.common.data.split import partition, split_folder
from fedfuse.common.errors import ConfigError, DataValidationError


def _labels(n: int = 900, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [str(c) for c in rng.choice(["a", "b", "c"], size=n, p=[0.5, 0.3, 0.2])]


def _skew(labels: list[str], parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between a site's label mix and the pool's."""
    classes = sorted(set(labels))
    y = np.array(labels)
    pool = np.array([(y == c).mean() for c in classes])
    tv = [0.5 * np.abs(np.array([(y[p] == c).mean() for c in classes]) - pool).sum() for p in parts]
    return float(np.mean(tv))


def test_every_record_once_and_deterministic() -> None:
    labels = _labels()
    for name in ("iid", "dirichlet", "pathological"):
        parts = partition(labels, sites=6, partitioner=name, seed=3, alpha=0.5)
        flat = np.concatenate(parts)
        assert sorted(flat.tolist()) == list(range(len(labels))), name  # each exactly once
        again = partition(labels, sites=6, partitioner=name, seed=3, alpha=0.5)
        assert all((a == b).all() for a, b in zip(parts, again, strict=True)), name
    iid = partition(labels, sites=6, partitioner="iid", seed=3)
    assert [len(p) for p in iid] == [150] * 6
    other = partition(labels, sites=6, partitioner="iid", seed=4)
    assert any((a != b).any() for a, b in zip(iid, other, strict=True))


def test_label_skew_grows_as_alpha_falls() -> None:
    labels = _labels()
    skews = [
        np.mean(
            [
                _skew(labels, partition(labels, sites=5, partitioner="dirichlet", seed=s, alpha=a))
                for s in range(5)
            ]
        )
        for a in (100.0, 1.0, 0.1)
    ]
    assert skews[0] < 0.06 and skews[0] < skews[1] < skews[2], skews
    iid = _skew(labels, partition(labels, sites=5, partitioner="iid", seed=0))
    assert iid < 0.06
    patho = partition(labels, sites=6, partitioner="pathological", seed=0, classes_per_site=1)
    y = np.array(labels)
    assert [len(set(y[p])) for p in patho] == [1] * 6


def test_bad_parameters_are_refused() -> None:
    labels = _labels(30)
    with pytest.raises(ConfigError, match="--partitioner must be one of"):
        partition(labels, sites=2, partitioner="random", seed=0)
    with pytest.raises(ConfigError, match="lower --sites"):
        partition(labels, sites=20, partitioner="iid", seed=0)
    with pytest.raises(ConfigError, match="--alpha must be a positive"):
        partition(labels, sites=2, partitioner="dirichlet", seed=0, alpha=0.0)
    with pytest.raises(ConfigError, match="with no site"):
        partition(labels, sites=2, partitioner="pathological", seed=0, classes_per_site=1)


def test_split_a_folder_links_files_and_the_sites_load(synth_sites: list[Path], tmp_path) -> None:
    pooled = synth_sites[0]
    out = tmp_path / "sites"
    res = CliRunner().invoke(
        app,
        [
            "data",
            "split",
            str(pooled),
            "--sites",
            "3",
            "--partitioner",
            "dirichlet",
            "--alpha",
            "1.0",
            "--seed",
            "1",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    with open(pooled / "manifest.csv", newline="") as fh:
        pooled_rows = {r["id"]: r for r in csv.DictReader(fh)}
    seen: list[str] = []
    for s in range(3):
        site = out / f"site-{s}"
        m = load_manifest(site)  # a valid site folder: every file inside it
        seen += [r.id for r in m.records]
        for r in m.records:
            assert r.image is not None
            src = pooled / pooled_rows[r.id]["image"]
            assert os.path.samefile(r.image, src)  # the same file, hard-linked: not copied
            assert r.labels == (pooled_rows[r.id]["label"],)
    assert sorted(seen) == sorted(pooled_rows)  # every record once, none duplicated
    assert "hard-linked, 0 copied" in res.output
    again = tmp_path / "again"
    split_folder(pooled, again, sites=3, partitioner="dirichlet", seed=1, alpha=1.0)
    for s in range(3):
        assert (again / f"site-{s}/manifest.csv").read_text() == (
            out / f"site-{s}/manifest.csv"
        ).read_text()
    with pytest.raises(ConfigError, match="is not empty"):
        split_folder(pooled, out, sites=3, partitioner="iid", seed=1)


def test_a_broken_pooled_folder_is_refused_before_anything_is_written(tmp_path) -> None:
    pooled = tmp_path / "pooled"
    pooled.mkdir()
    (pooled / "manifest.csv").write_text("id,report,label\nr1,some text,a\nr1,other,b\n")
    with pytest.raises(DataValidationError, match="manifest.csv"):
        split_folder(pooled, tmp_path / "out", sites=2, partitioner="iid", seed=0)
    assert not (tmp_path / "out").exists()
