"""The site manifest: read, validate every row at once, and resolve records.

A site folder holds ``manifest.csv`` (or ``manifest.jsonl``) and the files it names, paths
relative to the folder. Columns (see DESIGN.md): ``id``, ``image``, ``report``, ``audio``,
``tab.<name>``, ``label`` (``a|b`` for multi-label), ``split``. Empty cells mean "this record lacks
that modality", which is normal. Validation never modifies anything on disk.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fedfuse.common.data.audio import check_audio
from fedfuse.common.data.images import check_image
from fedfuse.common.errors import DataValidationError

MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl")
MODALITIES = ("image", "report", "audio", "tabular")
SPLITS = ("train", "val", "test")
# Seeded split when the manifest has no split column: fractions of train / val / test.
DEFAULT_SPLIT = (0.7, 0.15, 0.15)
# Largest magnitude of a tab.<name> value: no lab value comes near it, and squares of larger
# values overflow float64 in the site's scaler (1e308 ** 2 = inf). A bigger value is a unit or
# export error.
TABULAR_LIMIT = 1e12
# A cell a spreadsheet would run as a formula when our CSV or the site's is opened in one
# (OWASP "CSV injection"): =..., @..., +/- followed by something that is not a number.
_FORMULA = re.compile(r"^(?:[=@\t\r]|[+-][^\d\s.])")


def formula_like(cell: str) -> bool:
    """Whether a spreadsheet would treat ``cell`` as a formula."""
    return bool(_FORMULA.match(cell))


def csv_safe(value: object) -> object:
    """``value`` as it may go into a CSV we write: a formula-like string gets a leading
    apostrophe (the OWASP escape), so a spreadsheet shows it as text and never runs it."""
    if isinstance(value, str) and formula_like(value):
        return "'" + value
    return value


@dataclass(frozen=True)
class Record:
    """One validated row. Paths are absolute; missing modalities are None."""

    id: str
    labels: tuple[str, ...]
    split: str
    image: Path | None = None
    report: str | None = None
    audio: Path | None = None
    tabular: dict[str, float] = field(default_factory=dict)
    row: int = 0
    # Labels of extra tasks (label.<task> columns); a task without a label here is absent.
    task_labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    site_dir: Path
    path: Path
    records: tuple[Record, ...]
    tabular_columns: tuple[str, ...]
    # Legal but risky cells (spreadsheet formulas): shown by `data check`, never fatal.
    warnings: tuple[str, ...] = ()

    def split(self, name: str) -> list[Record]:
        return [r for r in self.records if r.split == name]

    def modalities_present(self) -> dict[str, int]:
        counts = dict.fromkeys(MODALITIES, 0)
        for r in self.records:
            counts["image"] += r.image is not None
            counts["report"] += r.report is not None
            counts["audio"] += r.audio is not None
            counts["tabular"] += bool(r.tabular)
        return counts

    def label_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.records:
            for lab in r.labels:
                counts[lab] = counts.get(lab, 0) + 1
        return dict(sorted(counts.items()))


def find_manifest(site_dir: Path) -> Path:
    site_dir = Path(site_dir)
    if not site_dir.is_dir():
        raise DataValidationError(
            [f"{site_dir}: site folder does not exist (give the folder holding manifest.csv)"],
            source=str(site_dir),
        )
    for name in MANIFEST_NAMES:
        if (site_dir / name).is_file():
            return site_dir / name
    raise DataValidationError(
        [f"{site_dir}: no {' or '.join(MANIFEST_NAMES)} found in the site folder"],
        source=str(site_dir),
    )


def _decode(path: Path, problems: list[str]) -> str | None:
    """The manifest's text (a UTF-8 byte-order mark, as Excel's "CSV UTF-8" writes, is read),
    or None with the line of the first byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        problems.append(
            f"{path.name}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the "
            "manifest as UTF-8"
        )
        return None
    nul = text.find("\x00")
    if nul >= 0:
        problems.append(
            f"{path.name}:{text.count(chr(10), 0, nul) + 1}: a NUL byte; the manifest must be "
            "plain UTF-8 text (is it UTF-16 or a binary file?)"
        )
        return None
    return text


def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]], list[str]]:
    """Rows as (line number, raw dict of strings); problems that stop reading entirely."""
    problems: list[str] = []
    rows: list[tuple[int, dict[str, str]]] = []
    text = _decode(path, problems)
    if text is None:
        return [], [], problems
    if path.suffix == ".jsonl":
        columns: list[str] = []
        # "\n" only: str.splitlines would also split inside a JSON string at U+2028 and kin.
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{path.name}:{lineno}: not valid JSON ({exc.msg})")
                continue
            except RecursionError:
                problems.append(f"{path.name}:{lineno}: JSON nested too deeply")
                continue
            if not isinstance(obj, dict):
                problems.append(f"{path.name}:{lineno}: expected a JSON object per line")
                continue
            for k in obj:
                if k not in columns:
                    columns.append(k)
            rows.append((lineno, {k: _cell(v) for k, v in obj.items()}))
        return columns, rows, problems
    reader = csv.DictReader(io.StringIO(text, newline=""))
    last = 0  # the last line read without an error: a bad row starts on the next one
    try:
        columns = [c.strip() for c in (reader.fieldnames or [])]
        last = reader.line_num
        for raw in reader:
            i = last = reader.line_num  # the row's last line (a quoted cell may span lines)
            if None in raw:
                problems.append(f"{path.name}:{i}: more cells than header columns")
                raw.pop(None)  # type: ignore[call-overload]
            rows.append((i, {(k or "").strip(): (v or "").strip() for k, v in raw.items()}))
    except csv.Error as exc:
        why = str(exc)
        if "field larger than field limit" in why:
            why = (
                f"a cell is longer than {csv.field_size_limit():,} characters; put long reports "
                "in a .txt file and name it in the report column"
            )
        problems.append(f"{path.name}:{last + 1}: not a readable CSV row ({why})")
        return [], [], problems
    return columns, rows, problems


def _cell(v: object) -> str:
    """A JSONL value as a CSV-like cell (a list of labels becomes ``a|b``)."""
    if v is None:
        return ""
    if isinstance(v, list):
        return "|".join(str(x) for x in v)
    return str(v).strip()


def stable_split(record_id: str, seed: int) -> str:
    """Seeded split from a hash of the id: stable under reordering and adding records."""
    u = (zlib.crc32(f"{seed}:{record_id}".encode()) % 10_000) / 10_000
    if u < DEFAULT_SPLIT[0]:
        return "train"
    if u < DEFAULT_SPLIT[0] + DEFAULT_SPLIT[1]:
        return "val"
    return "test"


def load_manifest(
    site_dir: str | Path,
    *,
    classes: tuple[str, ...] | None = None,
    split_seed: int = 0,
    check_files: bool = True,
    multi_label: bool | None = None,
    dicom_frame: int = 0,
    tasks: Mapping[str, tuple[str, ...]] | None = None,
    labelled: bool = True,
) -> Manifest:
    """Read and validate a site's manifest; report every problem at once.

    Args:
        site_dir: the site folder.
        classes: the label names the run knows; any other label is an error. None accepts all.
        split_seed: seed of the split for records without a ``split`` value.
        check_files: decode every image and WAV (and read every report file) to catch corrupt
            files before training starts.
        multi_label: False rejects records with several labels (``a|b``); None accepts both.
        dicom_frame: the frame a multi-frame DICOM must have (checked with ``check_files``).
        tasks: extra tasks' class names, by task; their labels come from ``label.<task>``
            columns, where an empty cell (or no column) means the record lacks that label.
        labelled: False also accepts a manifest without a ``label`` column (new records to
            predict for; each record's labels are then empty). A ``label`` column present is
            checked as always.

    Raises:
        DataValidationError: with one line per problem (file:line: field: reason).
    """
    site_dir = Path(site_dir).resolve()
    path = find_manifest(site_dir)
    columns, rows, problems = _read_rows(path)
    name = path.name
    if not problems and not rows:
        problems.append(f"{name}: the manifest has no records")
    unlabelled = not labelled and "label" not in columns
    required_cols = ("id",) if unlabelled else ("id", "label")
    for required in required_cols:
        if columns and required not in columns:
            problems.append(f"{name}:1: required column '{required}' is missing")
    tab_cols = tuple(c for c in columns if c.startswith("tab."))
    modality_cols = [c for c in ("image", "report", "audio") if c in columns] + list(tab_cols)
    if columns and not modality_cols:
        problems.append(
            f"{name}:1: no modality column; expected at least one of image, report, audio, "
            "tab.<name>"
        )
    task_cols = tuple(c for c in columns if c.startswith("label."))
    known_cols = {"id", "label", "split", "image", "report", "audio", *tab_cols, *task_cols}
    for c in columns:
        if c not in known_cols:
            problems.append(
                f"{name}:1: unknown column '{c}' (known: id, image, report, audio, "
                "tab.<name>, label, label.<task>, split)"
            )
    if problems and (not rows or not modality_cols or not set(required_cols) <= set(columns)):
        # Without rows, or without a required column, per-row checks would only repeat it.
        raise DataValidationError(problems, source=str(path))

    seen: dict[str, int] = {}
    records: list[Record] = []
    warnings: list[str] = []
    used: set[str] = set()  # every label the manifest uses
    unknown = False  # some of them are not the run's classes
    for lineno, raw in rows:
        where = f"{name}:{lineno}"
        for col, cell in raw.items():
            if formula_like(cell):
                warnings.append(
                    f"{where}: {col}: '{cell[:40]}' looks like a spreadsheet formula; it is "
                    "read as text (fedfuse escapes it in every CSV it writes)"
                )
        row_problems: list[str] = []
        rid = raw.get("id", "")
        if not rid:
            row_problems.append(f"{where}: id: empty record id")
        elif rid in seen:
            row_problems.append(f"{where}: id: duplicate id '{rid}' (first on line {seen[rid]})")
        else:
            seen[rid] = lineno
        label_raw = raw.get("label", "")
        labels = tuple(dict.fromkeys(lab.strip() for lab in label_raw.split("|") if lab.strip()))
        if not labels and not unlabelled:
            row_problems.append(f"{where}: label: empty label")
        if multi_label is False and len(labels) > 1:
            row_problems.append(
                f"{where}: label: '{label_raw}' has several labels but the task is single-label "
                "(set task=multi-label for a|b labels)"
            )
        used.update(labels)
        if classes is not None:
            for lab in labels:
                if lab not in classes:
                    unknown = True
                    row_problems.append(
                        f"{where}: label: unknown label '{lab}' (known: {', '.join(classes)})"
                    )
        task_labels: dict[str, str] = {}
        for task, task_classes in (tasks or {}).items():
            cell = raw.get(f"label.{task}", "").strip()
            if cell and cell not in task_classes:
                row_problems.append(
                    f"{where}: label.{task}: unknown label '{cell}' (known: "
                    f"{', '.join(task_classes)}; leave the cell empty where it is not known)"
                )
            elif cell:
                task_labels[task] = cell
        split = raw.get("split", "").lower()
        if split and split not in SPLITS:
            row_problems.append(f"{where}: split: '{split}' is not one of {', '.join(SPLITS)}")
        image_check = (lambda p: check_image(p, frame=dicom_frame)) if check_files else None
        image = _resolve_file(
            site_dir, raw.get("image", ""), where, "image", row_problems, check=image_check
        )
        audio = _resolve_file(
            site_dir,
            raw.get("audio", ""),
            where,
            "audio",
            row_problems,
            check=check_audio if check_files else None,
        )
        report = _resolve_report(site_dir, raw.get("report", ""), where, row_problems)
        tabular: dict[str, float] = {}
        for col in tab_cols:
            cell = raw.get(col, "")
            if cell == "":
                continue
            try:
                value = float(cell)
            except ValueError:
                row_problems.append(f"{where}: {col}: '{cell}' is not a number")
                continue
            if not math.isfinite(value):
                row_problems.append(f"{where}: {col}: '{cell}' is not a finite number")
                continue
            if abs(value) > TABULAR_LIMIT:
                row_problems.append(
                    f"{where}: {col}: '{cell}' is beyond +-{TABULAR_LIMIT:g} (TABULAR_LIMIT); "
                    "check the value's unit"
                )
                continue
            tabular[col[4:]] = value
        if not row_problems and image is None and report is None and audio is None and not tabular:
            row_problems.append(f"{where}: record '{rid}' has no modality at all")
        problems.extend(row_problems)
        if not row_problems:
            records.append(
                Record(
                    id=rid,
                    labels=labels,
                    split=split or stable_split(rid, split_seed),
                    image=image,
                    report=report,
                    audio=audio,
                    tabular=tabular,
                    row=lineno,
                    task_labels=task_labels,
                )
            )
    if problems:
        raise DataValidationError(
            problems,
            source=str(path),
            labels=used if unknown else (),
            classes=classes if unknown and classes is not None else (),
        )
    return Manifest(
        site_dir=site_dir,
        path=path,
        records=tuple(records),
        tabular_columns=tuple(c[4:] for c in tab_cols),
        warnings=tuple(warnings),
    )


def _resolve_file(
    site_dir: Path,
    cell: str,
    where: str,
    column: str,
    problems: list[str],
    *,
    check: Callable[[Path], str | None] | None,
) -> Path | None:
    if not cell:
        return None
    p = (site_dir / cell).resolve()
    if not p.is_relative_to(site_dir):
        problems.append(f"{where}: {column}: '{cell}' points outside the site folder")
        return None
    if not p.is_file():
        problems.append(f"{where}: {column}: file '{cell}' does not exist")
        return None
    if check is not None:
        reason = check(p)
        if reason:
            problems.append(f"{where}: {column}: '{cell}': {reason}")
            return None
    return p


def _resolve_report(site_dir: Path, cell: str, where: str, problems: list[str]) -> str | None:
    if not cell:
        return None
    if cell.lower().endswith(".txt"):
        p = (site_dir / cell).resolve()
        if not p.is_relative_to(site_dir):
            problems.append(f"{where}: report: '{cell}' points outside the site folder")
            return None
        if not p.is_file():
            problems.append(f"{where}: report: file '{cell}' does not exist")
            return None
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{where}: report: cannot read '{cell}' as UTF-8 text ({exc})")
            return None
        if not text.strip():
            problems.append(f"{where}: report: '{cell}' is empty")
            return None
        return text
    return cell
