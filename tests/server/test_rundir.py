"""Run folders: two runs never share one."""

from __future__ import annotations

from fedfuse.common.config import RunConfig
from fedfuse.server.rundir import RunDirectory, new_run_id


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    # The clock is frozen (time.strftime is what names the folder), as when fast runs of a
    # README block start within one second: the README test once failed on exactly that.
    monkeypatch.setattr("fedfuse.server.rundir.time.strftime", lambda fmt: "20261207-065446")
    cfg = RunConfig(out_dir=str(tmp_path))
    names = [new_run_id(cfg, tmp_path) for _ in range(3)]
    assert names == ["20261207-065446", "20261207-065446-2", "20261207-065446-3"]
    assert all((tmp_path / n).is_dir() for n in names)
    first = RunDirectory(tmp_path / "other", cfg)
    second = RunDirectory(tmp_path / "other", cfg)
    assert first.path != second.path and first.path.parent == second.path.parent
    # A run name the user gives is theirs: no suffix, nothing claimed.
    named = cfg.replace(run_name="mine")
    assert new_run_id(named, tmp_path) == "mine" and not (tmp_path / "mine").exists()
