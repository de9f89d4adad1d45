"""A generator of broken site folders: one problem per folder, for the bad-input tests.

``make_broken_sites(root)`` writes ``root/<kind>/site-0`` (a small valid site) and
``root/<kind>/site-1`` (the same site with exactly one problem) for every kind in
:data:`BROKEN`, so that ``fedfuse data check root/<kind>/site-1`` and
``fedfuse simulate --data root/<kind>`` can both be pointed at it. Each kind also says what
the one line reporting it must contain (besides the site, the file and the row).
"""

from __future__ import annotations

import csv
import json
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

COLUMNS = ["id", "image", "report", "tab.crp", "label", "split"]


@dataclass(frozen=True)
class Broken:
    """One kind of broken site: how to break it and what its report line says."""

    kind: str
    # The location the line names: "manifest.csv:4" (file and row) or "manifest.csv".
    where: str
    needle: str  # a phrase of the reason
    make: Callable[[Path], None]


def _row(i: int, **kw: str) -> dict[str, str]:
    row = {
        "id": f"r{i}",
        "image": "img/ok.png",
        "report": f"note {i}: cough and fever",
        "tab.crp": str(5 + i),
        "label": ("no_finding", "pneumonia")[i % 2],
        "split": "test" if i >= 6 else "train",
    }
    row.update(kw)
    return row


def _rows(**changes: dict[str, str]) -> list[dict[str, str]]:
    """Eight valid rows (lines 2-9); ``changes={'3': {...}}`` alters the row on that line."""
    return [_row(i, **changes.get(str(i + 2), {})) for i in range(8)]


def _write_csv(site: Path, rows: list[dict[str, str]], columns: list[str] = COLUMNS) -> None:
    with open(site / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def write_good_site(site: Path) -> Path:
    """A small valid site: 8 records (6 train, 2 test), an image and a report each."""
    (site / "img").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(site / "img" / "ok.png")
    _write_csv(site, _rows())
    return site


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_of_zeros(path: Path, width: int, height: int, *, rows: int | None = None) -> None:
    """A grayscale PNG of ``width x height`` black pixels; ``rows`` < height writes only that
    many rows of data (a decompression bomb needs only its header to be refused)."""
    comp = zlib.compressobj(9)
    line = b"\x00" * (width + 1)  # filter byte + pixels
    body = [comp.compress(line) for _ in range(height if rows is None else rows)]
    body.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(body))
        + _png_chunk(b"IEND", b"")
    )


def _edit(**changes: dict[str, str]) -> Callable[[Path], None]:
    return lambda site: _write_csv(site, _rows(**changes))


def _bomb(site: Path) -> None:
    png_of_zeros(site / "img" / "bomb.png", 40_000, 40_000, rows=16)
    _write_csv(site, _rows(**{"4": {"image": "img/bomb.png"}}))


def _huge(site: Path) -> None:
    png_of_zeros(site / "img" / "huge.png", 12_000, 12_000)
    _write_csv(site, _rows(**{"5": {"image": "img/huge.png"}}))


def _truncated_png(site: Path) -> None:
    (site / "img" / "bad.png").write_bytes((site / "img" / "ok.png").read_bytes()[:30])
    _write_csv(site, _rows(**{"3": {"image": "img/bad.png"}}))


def _jsonl(site: Path, lines: list[bytes]) -> None:
    (site / "manifest.csv").unlink()
    (site / "manifest.jsonl").write_bytes(b"\n".join(lines) + b"\n")


def _json_line(i: int, **kw: str) -> bytes:
    return json.dumps(_row(i, **kw)).encode()


def _jsonl_latin1(site: Path) -> None:
    lines = [_json_line(i) for i in range(8)]
    lines[2] = _json_line(2, report="Befund: Lungenentz\xfcndung").replace(b"\\u00fc", b"\xfc")
    _jsonl(site, lines)


def _jsonl_bad_json(site: Path) -> None:
    lines = [_json_line(i) for i in range(8)]
    lines[4] = lines[4][:-5]
    _jsonl(site, lines)


def _jsonl_not_object(site: Path) -> None:
    lines = [_json_line(i) for i in range(8)]
    lines[1] = b'["r1", "img/ok.png"]'
    _jsonl(site, lines)


def _csv_latin1(site: Path) -> None:
    _write_csv(site, _rows(**{"6": {"report": "Lungenentz\xfcndung"}}))
    p = site / "manifest.csv"
    p.write_bytes(p.read_bytes().replace("\xfc".encode(), b"\xfc"))


def _utf16(site: Path) -> None:
    p = site / "manifest.csv"
    p.write_bytes(p.read_text(encoding="utf-8").encode("utf-16"))


def _nul(site: Path) -> None:
    _write_csv(site, _rows(**{"3": {"report": "cough\x00fever"}}))


def _long_cell(site: Path) -> None:
    _write_csv(site, _rows(**{"7": {"report": "x" * 140_000}}))


def _header_only(site: Path) -> None:
    _write_csv(site, [])


def _no_manifest(site: Path) -> None:
    (site / "manifest.csv").unlink()


def _columns(columns: list[str]) -> Callable[[Path], None]:
    return lambda site: _write_csv(site, _rows(), columns)


def _more_cells(site: Path) -> None:
    p = site / "manifest.csv"
    lines = p.read_text().splitlines()
    lines[3] += ",surplus"
    p.write_text("\n".join(lines) + "\n")


def _empty_report_file(site: Path) -> None:
    (site / "empty.txt").write_text("  \n")
    _write_csv(site, _rows(**{"8": {"report": "empty.txt"}}))


def _report_not_utf8(site: Path) -> None:
    (site / "latin.txt").write_bytes(b"Lungenentz\xfcndung")
    _write_csv(site, _rows(**{"2": {"report": "latin.txt"}}))


def _outside(site: Path) -> None:
    _write_csv(site, _rows(**{"3": {"image": "../site-0/img/ok.png"}}))


def _symlink_outside(site: Path) -> None:
    (site / "img" / "link.png").symlink_to(site.parent / "site-0" / "img" / "ok.png")
    _write_csv(site, _rows(**{"4": {"image": "img/link.png"}}))


def _directory_as_image(site: Path) -> None:
    (site / "img" / "folder.png").mkdir()
    _write_csv(site, _rows(**{"5": {"image": "img/folder.png"}}))


def _no_modality(site: Path) -> None:
    _write_csv(site, _rows(**{"3": {"image": "", "report": "", "tab.crp": ""}}))


BROKEN: tuple[Broken, ...] = (
    Broken("decompression-bomb-png", "manifest.csv:4", "too large to decode safely", _bomb),
    Broken("image-12000x12000", "manifest.csv:5", "12000 x 12000 pixels is above", _huge),
    Broken("truncated-png", "manifest.csv:3", "cannot decode image", _truncated_png),
    Broken("jsonl-not-utf8", "manifest.jsonl:3", "not UTF-8", _jsonl_latin1),
    Broken("jsonl-bad-json", "manifest.jsonl:5", "not valid JSON", _jsonl_bad_json),
    Broken("jsonl-not-an-object", "manifest.jsonl:2", "JSON object", _jsonl_not_object),
    Broken("csv-not-utf8", "manifest.csv:6", "not UTF-8", _csv_latin1),
    Broken("csv-utf16", "manifest.csv:1", "not UTF-8", _utf16),
    Broken("nul-byte", "manifest.csv:3", "NUL byte", _nul),
    Broken("cell-over-131072-chars", "manifest.csv:7", "longer than 131,072", _long_cell),
    Broken("tab-plus-1e308", "manifest.csv:4", "beyond", _edit(**{"4": {"tab.crp": "1e308"}})),
    Broken("tab-minus-1e308", "manifest.csv:5", "beyond", _edit(**{"5": {"tab.crp": "-1e308"}})),
    Broken("tab-nan", "manifest.csv:6", "not a finite number", _edit(**{"6": {"tab.crp": "nan"}})),
    Broken("tab-text", "manifest.csv:7", "not a number", _edit(**{"7": {"tab.crp": "high"}})),
    Broken(
        "no-training-rows",
        "manifest.csv",
        "no record in the train split",
        lambda site: _write_csv(site, [dict(r, split="test") for r in _rows()]),
    ),
    Broken("header-only", "manifest.csv", "no records", _header_only),
    Broken("no-manifest", "site-1", "no manifest.csv", _no_manifest),
    Broken(
        "missing-label-column",
        "manifest.csv:1",
        "required column 'label'",
        _columns([c for c in COLUMNS if c != "label"]),
    ),
    Broken(
        "unknown-column", "manifest.csv:1", "unknown column 'notes'", _columns([*COLUMNS, "notes"])
    ),
    Broken("more-cells-than-header", "manifest.csv:4", "more cells", _more_cells),
    Broken(
        "missing-image", "manifest.csv:8", "does not exist", _edit(**{"8": {"image": "no.png"}})
    ),
    Broken("image-outside-site", "manifest.csv:3", "outside the site folder", _outside),
    Broken("symlink-outside-site", "manifest.csv:4", "outside the site folder", _symlink_outside),
    Broken("directory-as-image", "manifest.csv:5", "does not exist", _directory_as_image),
    Broken("empty-report-file", "manifest.csv:8", "is empty", _empty_report_file),
    Broken("report-not-utf8", "manifest.csv:2", "UTF-8", _report_not_utf8),
    Broken("duplicate-id", "manifest.csv:5", "duplicate id", _edit(**{"5": {"id": "r0"}})),
    Broken("empty-id", "manifest.csv:6", "empty record id", _edit(**{"6": {"id": ""}})),
    Broken("unknown-label", "manifest.csv:3", "unknown label", _edit(**{"3": {"label": "flu"}})),
    Broken("empty-label", "manifest.csv:4", "empty label", _edit(**{"4": {"label": ""}})),
    Broken(
        "two-labels-single-label-task",
        "manifest.csv:5",
        "several labels",
        _edit(**{"5": {"label": "no_finding|pneumonia"}}),
    ),
    Broken("bad-split", "manifest.csv:6", "is not one of", _edit(**{"6": {"split": "dev"}})),
    Broken("record-without-modality", "manifest.csv:3", "no modality", _no_modality),
)


def make_broken_sites(root: Path) -> dict[str, Path]:
    """Write every kind of :data:`BROKEN` under ``root``; returns kind -> its data folder."""
    good = write_good_site(root / ".template")
    out = {}
    for b in BROKEN:
        data = root / b.kind
        shutil.copytree(good, data / "site-0")
        shutil.copytree(good, data / "site-1")
        b.make(data / "site-1")
        out[b.kind] = data
    shutil.rmtree(good)
    return out


# Legal input that must be read as intended (exit 0), with what `data check` shows.
def bom_site(site: Path) -> Path:
    """Excel's "CSV UTF-8": a byte-order mark before the header."""
    write_good_site(site)
    p = site / "manifest.csv"
    p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())
    return site


def formula_site(site: Path) -> Path:
    """Cells a spreadsheet would run as formulas (CSV injection): warned about, read as text."""
    write_good_site(site)
    _write_csv(
        site,
        _rows(
            **{
                "3": {"report": "=cmd|' /C calc'!A0"},
                "4": {"report": "@SUM(1+1)*cmd|' /C calc'!A0"},
            }
        ),
    )
    return site
