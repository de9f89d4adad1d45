import hashlib
import shutil
from pathlib import Path

import pytest

from fedfuse.common.config import RunConfig
from fedfuse.common.data.dataset import load_site
from fedfuse.common.data.manifest import load_manifest, stable_split
from fedfuse.common.errors import DataValidationError
from tests.support.sites import copy_site

CLASSES = ("no_finding", "pneumonia")


def _tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_good_site_loads_with_all_records(synth_sites):
    m = load_manifest(synth_sites[0], classes=CLASSES)
    assert len(m.records) > 100
    assert m.modalities_present()["image"] == len(m.records)
    assert set(m.label_counts()) <= set(CLASSES)
    assert {r.split for r in m.records} == {"train", "val", "test"}
    _, datasets = load_site(synth_sites[0], RunConfig())
    mask, image, tokens, label = datasets["train"][0]
    assert image.shape == (1, 32, 32) and tokens.shape == (64,) and mask.tolist() == [1.0, 1.0]
    assert int(label) in (0, 1)


def test_every_bad_row_is_reported_at_once_and_nothing_changes(tmp_path, synth_sites):
    site = tmp_path / "site"
    copy_site(synth_sites[0], site)
    (site / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (site / "empty.txt").write_text("   \n")
    good_image = next((site / "images").glob("*.png")).relative_to(site)
    lines = [
        "id,image,report,label,split",
        f"a1,{good_image},fine report,pneumonia,train",  # line 2: valid
        "a2,images/missing.png,report,pneumonia,train",  # 3: missing file
        "a3,images/corrupt.png,report,no_finding,test",  # 4: corrupt image
        f"a4,{good_image},empty.txt,no_finding,train",  # 5: empty report file
        f"a5,{good_image},report,cancer,train",  # 6: unknown label
        f"a1,{good_image},report,pneumonia,train",  # 7: duplicate id
        f"a6,{good_image},report,pneumonia,holdout",  # 8: bad split
        f"a7,{good_image},report,,train",  # 9: empty label
        "a8,,,no_finding,train",  # 10: no modality
        "a9,../../etc/passwd,report,pneumonia,train",  # 11: outside the folder
    ]
    (site / "manifest.csv").write_text("\n".join(lines) + "\n")
    before = _tree_digest(site)
    with pytest.raises(DataValidationError) as exc:
        load_manifest(site, classes=CLASSES)
    problems = exc.value.problems
    text = str(exc.value)
    expected = {
        ":3: image": "does not exist",
        ":4: image": "cannot decode",
        ":5: report": "is empty",
        ":6: label": "unknown label 'cancer'",
        ":7: id": "duplicate id 'a1' (first on line 2)",
        ":8: split": "'holdout'",
        ":9: label": "empty label",
        ":10:": "no modality",
        ":11: image": "outside the site folder",
    }
    for where, reason in expected.items():
        assert any(where in p and reason in p for p in problems), (where, reason, text)
    assert len(problems) == len(expected)
    assert "manifest.csv" in text
    assert _tree_digest(site) == before


def test_missing_manifest_and_missing_columns(tmp_path):
    with pytest.raises(DataValidationError, match="no manifest.csv"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.csv").write_text("identifier,image\nx,y.png\n")
    with pytest.raises(DataValidationError) as exc:
        load_manifest(tmp_path)
    msg = str(exc.value)
    assert "required column 'id'" in msg and "required column 'label'" in msg
    assert "unknown column 'identifier'" in msg


def test_jsonl_manifest_and_report_files(tmp_path, synth_sites):
    site = tmp_path / "site"
    shutil.copytree(synth_sites[0] / "images", site / "images")
    img = sorted((site / "images").iterdir())[0].name
    (site / "r1.txt").write_text("Fever and cough.")
    (site / "manifest.jsonl").write_text(
        f'{{"id": "x1", "image": "images/{img}", "report": "r1.txt", "label": "pneumonia"}}\n'
        '{"id": "x2", "report": "No fever.", "label": "no_finding", "split": "test"}\n'
    )
    m = load_manifest(site, classes=CLASSES)
    assert [r.report for r in m.records] == ["Fever and cough.", "No fever."]
    assert m.records[1].image is None and m.records[1].split == "test"


def test_seeded_split_is_stable():
    ids = [f"r{i}" for i in range(2000)]
    a = [stable_split(i, 7) for i in ids]
    assert a == [stable_split(i, 7) for i in ids]
    assert a != [stable_split(i, 8) for i in ids]
    frac = a.count("train") / len(a)
    assert 0.65 < frac < 0.75
