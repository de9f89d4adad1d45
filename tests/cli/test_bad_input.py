"""Bad input (issue 18): one line naming the site, the file and the row; nothing changed; no
traceback; `simulate` refuses the same folder before any site trains (before Ray starts)."""

from __future__ import annotations

import csv
import os
import stat
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedfuse.cli import app
from fedfuse.common.data.manifest import csv_safe
from tests.support.broken_sites import (
    BROKEN,
    bom_site,
    formula_site,
    make_broken_sites,
    write_good_site,
)
from tests.support.mmutil import snapshot

KINDS = [b.kind for b in BROKEN]


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_broken_sites(tmp_path_factory.mktemp("broken"))


def _invoke(*args: object):
    result = CliRunner().invoke(app, [str(a) for a in args])
    # A traceback would come back as an exception other than the exit.
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        repr(result.exception),
        result.output,
    )
    return result.exit_code, result.output  # stdout and stderr together


def _location(kind: str) -> str:
    where = next(b.where for b in BROKEN if b.kind == kind)
    return "site-1:" if where == "site-1" else f"site-1/{where}:"


def test_the_generator_makes_one_folder_per_kind(broken):
    assert len(KINDS) == len(set(KINDS)) >= 30
    assert sorted(broken) == sorted(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_data_check_names_the_problem_in_one_line_and_changes_nothing(broken, kind):
    b = next(x for x in BROKEN if x.kind == kind)
    site = broken[kind] / "site-1"
    before = snapshot(site)
    code, out = _invoke("data", "check", site)
    assert code == 1, out
    lines = [x for x in out.splitlines() if x.startswith("  - ")]
    assert len(lines) == 1, out
    assert _location(kind) in lines[0] and b.needle in lines[0], out
    assert "Traceback" not in out
    assert snapshot(site) == before


@pytest.mark.parametrize("kind", KINDS)
def test_simulate_refuses_the_same_folder_before_any_site_trains(broken, kind, tmp_path):
    b = next(x for x in BROKEN if x.kind == kind)
    data = broken[kind]
    before = snapshot(data)
    t0 = time.monotonic()
    code, out = _invoke("simulate", "--data", data, "--out", tmp_path / "runs", "--rounds", "1")
    assert code == 2, out
    assert time.monotonic() - t0 < 30  # refused by validation, not by a failed round
    problem = [x for x in out.splitlines() if _location(kind) in x]
    assert len(problem) == 1 and b.needle in problem[0], out
    assert "site-0/manifest" not in out  # the good site is not blamed
    assert snapshot(data) == before  # no ledger, no secret, nothing written at any site
    assert not (tmp_path / "runs").exists()


def test_utf8_byte_order_mark_is_read(tmp_path):
    site = bom_site(tmp_path / "site-1")
    code, out = _invoke("data", "check", site)
    assert code == 0, out
    assert "8 records, all valid" in out


def test_formula_cells_warn_with_their_row_and_are_escaped_in_our_csvs(tmp_path):
    site = formula_site(tmp_path / "site-1")
    before = snapshot(site)
    code, out = _invoke("data", "check", site)
    assert code == 0, out
    warned = [x for x in out.splitlines() if x.startswith("warning: ")]
    assert len(warned) == 2, out
    assert "site-1/manifest.csv:3: report:" in warned[0] and "formula" in warned[0]
    assert "site-1/manifest.csv:4: report:" in warned[1]
    assert snapshot(site) == before
    # What we write: the escape makes a spreadsheet show text; numbers stay numbers.
    path = tmp_path / "ours.csv"
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerow([csv_safe(v) for v in ("=cmd|' /C calc'!A0", "@SUM(1)", -1.5)])
    assert path.read_text().strip() == "'=cmd|' /C calc'!A0,'@SUM(1),-1.5"
    assert csv_safe("-3.2") == "-3.2" and csv_safe("+cmd") == "'+cmd"


def _out_cases(tmp_path: Path) -> list[tuple[str, Path, str]]:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [
        ("a file", a_file, "a file is in the way"),
        ("below a file", a_file / "runs", "cannot write there"),
        ("under /proc", Path("/proc/fedfuse-runs"), "cannot write there"),
    ]
    if os.geteuid() != 0:  # root writes into read-only folders
        ro = tmp_path / "read-only"
        ro.mkdir()
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
        cases.append(("read-only", ro / "runs", "cannot write there"))
    return cases


def test_simulate_refuses_an_unwritable_out_in_one_line_before_training(tmp_path):
    data = tmp_path / "data"
    for name in ("site-0", "site-1"):
        write_good_site(data / name)
    before = snapshot(data)
    for label, out_dir, needle in _out_cases(tmp_path):
        code, out = _invoke("simulate", "--data", data, "--out", out_dir, "--rounds", "1")
        assert code == 2, (label, out)
        lines = [x for x in out.splitlines() if x.strip()]
        error = [x for x in lines if x.startswith("error:")]
        assert len(error) == 1 and f"--out '{out_dir}'" in error[0] and needle in error[0], (
            label,
            out,
        )
        assert "Traceback" not in out
    if os.geteuid() == 0:
        print("skipped the read-only --out case: root writes into read-only folders")
    assert snapshot(data) == before


def test_a_failing_site_is_named_not_numbered(tmp_path):
    """Once a site has named itself, its later errors and silences carry its name."""
    from flwr.app import ConfigRecord, Error, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedfuse.common.config import RunConfig
    from fedfuse.server.app import make_strategy
    from fedfuse.server.rundir import RunDirectory

    cfg = RunConfig(secagg=False)
    strategy = make_strategy(
        cfg,
        run_dir=RunDirectory(tmp_path, cfg, run_id="r"),
        on_round=None,
        min_train_nodes=1,
        min_available_nodes=1,
    )
    # Messages are made in a task's name (Flower reads this process-global; SuperNode-like).
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    ask = Message(RecordDict(), dst_node_id=7660176604983328544, message_type="train")
    named = Message(RecordDict({"site": ConfigRecord({"name": "site-2"})}), reply_to=ask)
    assert strategy._site_of(named) == "site-2"
    failed = Message(Error(code=0, reason="boom"), reply_to=ask)
    assert strategy._site_of(failed) == "site-2"
    assert strategy.name_of(7660176604983328544) == "site-2"
    assert strategy.name_of(12345) == "node-12345"  # never heard of: only its id is known
