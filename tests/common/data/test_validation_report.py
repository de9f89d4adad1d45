"""A validation report a person can read: a problem that recurs in many rows of a file is one
line (its count and first rows), unknown labels come with how to name the run's classes, and
`fedfuse data check` takes a folder of site folders as `fedfuse simulate --data` does."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from fedfuse.cli import app
from fedfuse.common.errors import GROUP_AFTER, DataValidationError
from tests.support.mmutil import snapshot, write_manifest

COLUMNS = ["id", "report", "label", "split"]


def _yes_no_site(site: Path, n: int = 40) -> Path:
    """``n`` records labelled no / yes (a real data set's labels, not the run's default)."""
    rows: list[dict[str, object]] = [
        {"id": f"r{i}", "report": f"is there fibrosis {i}", "label": ("no", "yes")[i % 2],
         "split": "test" if i >= n - 10 else "train"}
        for i in range(n)
    ]  # fmt: skip
    return write_manifest(site, rows, COLUMNS)


def _invoke(*args: object) -> tuple[int, str]:
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return res.exit_code, res.output


def test_a_problem_in_many_rows_is_one_line_with_its_count_and_first_rows():
    many = [f"site-0/manifest.csv:{r}: label: unknown label 'yes' (known: a, b)" for r in
            range(2, 40, 2)]  # fmt: skip
    few = [f"site-1/manifest.csv:{r}: label: unknown label 'yes' (known: a, b)" for r in (3, 9)]
    other = ["site-0/manifest.csv:5: id: empty record id", "site-2: no manifest.csv found"]
    exc = DataValidationError([*many, *few, *other], source="data")
    assert exc.problems == [*many, *few, *other]  # the full list is kept for callers
    assert exc.lines() == [
        "site-0/manifest.csv: 19 rows (2, 4, 6, 8, 10, ...): label: unknown label 'yes' "
        "(known: a, b)",
        *few,  # below the grouping threshold: each row on its own line
        *other,
    ]
    assert len(many) > GROUP_AFTER >= len(few)
    assert str(exc).startswith("23 problem(s) in data; fix them and run again:\n")
    assert exc.advice() == []  # no labels were given: nothing to say about classes


def test_unknown_labels_say_how_to_name_the_classes(tmp_path):
    site = _yes_no_site(tmp_path / "site-0")
    before = snapshot(site)
    code, out = _invoke("data", "check", site)
    assert code == 1, out
    lines = out.splitlines()
    assert "40 problem(s)" in lines[0]
    assert lines[1] == (
        "  - site-0/manifest.csv: 20 rows (2, 4, 6, 8, 10, ...): label: unknown label 'no' "
        "(known: no_finding, pneumonia)"
    )
    assert lines[2].startswith("  - site-0/manifest.csv: 20 rows (3, 5, 7, 9, 11, ...): ")
    hint = lines[3]
    assert hint.startswith("hint: the labels in those manifests are no, yes and the run's "
                           "classes no_finding, pneumonia.")  # fmt: skip
    assert "--classes no,yes (fedfuse data check)" in hint
    assert "--set classes=no,yes (fedfuse simulate and plan)" in hint
    assert len(lines) == 4
    # What the hint says works.
    code, out = _invoke("data", "check", site, "--classes", "no,yes")
    assert code == 0 and "40 records, all valid" in out, out
    assert snapshot(site) == before


def test_simulate_groups_the_sites_problems_and_the_hint_works_for_plan(tmp_path):
    data = tmp_path / "data"
    for name in ("site-0", "site-1"):
        _yes_no_site(data / name)
    before = snapshot(data)
    code, out = _invoke("simulate", "--data", data, "--out", tmp_path / "runs", "--rounds", "1")
    assert code == 2, out
    assert "80 problem(s)" in out and len(out.splitlines()) <= 6, out  # not 80 lines
    assert "site-1/manifest.csv: 20 rows (2, 4, 6, 8, 10, ...)" in out
    assert "--set classes=no,yes" in out
    assert "Traceback" not in out
    assert snapshot(data) == before and not (tmp_path / "runs").exists()
    code, out = _invoke("plan", "--data", data, "--epsilon", "8", "--set", "classes=no,yes")
    assert code == 0, out
    assert "site-1" in out and "noise multiplier" in out


def test_data_check_takes_a_folder_of_site_folders(tmp_path):
    data = tmp_path / "data"
    _yes_no_site(data / "site-0")
    _yes_no_site(data / "site-1", n=20)
    (data / "site-1" / "manifest.csv").write_text(
        (data / "site-1" / "manifest.csv").read_text().replace(",yes,", ",maybe,", 1)
    )
    code, out = _invoke("data", "check", data, "--classes", "no,yes")
    assert code == 1, out
    lines = out.splitlines()
    assert lines[0] == "site-0:" and "40 records, all valid" in lines[1], out
    assert "site-1:" in lines
    problem = [x for x in lines if x.startswith("  - ")]
    assert problem == [
        "  - site-1/manifest.csv:3: label: unknown label 'maybe' (known: no, yes)"
    ], out
    assert lines[-1] == "1 of 2 site folders have problems (above)"
    code, out = _invoke("data", "check", data / "site-0", "--classes", "no,yes")
    assert code == 0 and "site-0:" not in out, out  # one site: as before, no heading
