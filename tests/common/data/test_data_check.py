"""``fedfuse data check``: every problem at once with its row, exit 1, no file changed."""

from __future__ import annotations

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from fedfuse.cli import app
from tests.support.mmutil import snapshot, tone, write_dicom, write_manifest, write_wav

COLUMNS = ["id", "image", "report", "audio", "tab.crp", "label", "split"]


def _good_files(site):
    (site / "img").mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(site / "img" / "ok.png")
    write_dicom(site / "img" / "ok.dcm", np.arange(64, dtype=np.uint16).reshape(8, 8))
    write_wav(site / "ok.wav", tone(200, 4000, 0.5), 4000)
    (site / "note.txt").write_text("Fever and cough.")


def _row(i, **kw):
    row = {
        "id": f"r{i}",
        "image": "img/ok.png",
        "report": "note.txt",
        "audio": "ok.wav",
        "tab.crp": "12",
        "label": "no_finding",
        "split": "train",
    }
    row.update(kw)
    return row


def _run(*args):
    result = CliRunner().invoke(app, ["data", "check", *map(str, args)])
    return result.exit_code, result.output + getattr(result, "stderr", "")


def test_every_problem_reported_with_its_row_exit_1_nothing_changed(tmp_path):
    site = tmp_path / "site"
    _good_files(site)
    (site / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    dcm = (site / "img" / "ok.dcm").read_bytes()
    (site / "img" / "bad.dcm").write_bytes(dcm[:-40])
    (site / "bad.wav").write_text("RIFF but not really a wave file")
    (site / "empty.txt").write_text("  \n")
    rows = [
        _row(0),
        _row(1, image="img/missing.png"),  # line 3: missing file
        _row(2, image="img/bad.png"),  # line 4: corrupt image
        _row(3, image="img/bad.dcm"),  # line 5: corrupt DICOM
        _row(4, audio="bad.wav"),  # line 6: corrupt WAV
        _row(5, report="empty.txt"),  # line 7: empty report
        _row(6, label="fracture"),  # line 8: unknown label
        _row(0),  # line 9: duplicate id
        _row(8, **{"tab.crp": "high"}),  # line 10: non-numeric tabular value
        _row(9, image="img/ok.dcm", label="pneumonia"),
    ]
    write_manifest(site, rows, COLUMNS)
    before = snapshot(site)
    code, out = _run(site)
    assert code == 1
    expected = [
        "manifest.csv:3: image: file 'img/missing.png' does not exist",
        "manifest.csv:4: image: 'img/bad.png': cannot decode image",
        "manifest.csv:5: image: 'img/bad.dcm': cannot decode DICOM",
        "manifest.csv:6: audio: 'bad.wav': cannot decode WAV",
        "manifest.csv:7: report: 'empty.txt' is empty",
        "manifest.csv:8: label: unknown label 'fracture' (known: no_finding, pneumonia)",
        "manifest.csv:9: id: duplicate id 'r0' (first on line 2)",
        "manifest.csv:10: tab.crp: 'high' is not a number",
    ]
    for e in expected:
        assert e in out, f"missing: {e}\n{out}"
    assert "8 problem(s)" in out
    assert snapshot(site) == before  # not one byte or mtime changed


def test_clean_site_exit_0_with_summary(tmp_path):
    site = tmp_path / "site"
    _good_files(site)
    rows = [
        _row(0),
        _row(1, audio="", label="pneumonia", split="test"),
        _row(2, image="img/ok.dcm", **{"tab.crp": ""}, split="val"),
    ]
    write_manifest(site, rows, COLUMNS)
    before = snapshot(site)
    code, out = _run(site)
    assert code == 0, out
    assert "3 records, all valid" in out
    assert "splits: train 1, val 1, test 1" in out
    assert "image 3 (100%), report 3 (100%), audio 2 (67%), tabular 2 (67%)" in out
    assert "labels: no_finding 2, pneumonia 1" in out
    assert "tab.crp: 2 values, min 12, mean 12, max 12" in out
    assert len(out.splitlines()) < 20  # one screen
    assert snapshot(site) == before


def test_label_options(tmp_path):
    site = tmp_path / "site"
    _good_files(site)
    write_manifest(site, [_row(0, label="a|b")], COLUMNS)
    code, out = _run(site, "--classes", "a,b")
    assert code == 1 and "has several labels but the task is single-label" in out
    assert _run(site, "--classes", "a,b", "--task", "multi-label")[0] == 0
    assert _run(site, "--classes", "any", "--task", "multi-label")[0] == 0
