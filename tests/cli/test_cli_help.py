"""`fedfuse --version`, `-h` on every command, and a help text on every option (issue 18)."""

from __future__ import annotations

import re

import click
import pytest
import typer
from typer.testing import CliRunner

from fedfuse.cli import app

ROOT = typer.main.get_command(app)


def _commands(cmd: click.Command, path: tuple[str, ...] = ()):
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(ROOT))


@pytest.mark.parametrize("path,cmd", COMMANDS[1:], ids=[" ".join(p) for p, _ in COMMANDS[1:]])
def test_every_command_summary_is_one_line(path, cmd):
    """A command's summary (its help's first paragraph) is what `--help` lists beside its name:
    a line break inside it shows there as a broken sentence."""
    summary = (cmd.help or "").strip().split("\n\n")[0]
    assert summary and "\n" not in summary, (path, summary)


def test_version():
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0
    assert re.fullmatch(
        r"fedfuse (\d+\.\d+\.\d+\S*|\(not installed; version unknown\))\n", res.output
    )


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=lambda p: " ".join(p) or "fedfuse")
def test_dash_h_everywhere_and_no_option_text_lost(path):
    res = CliRunner(env={"COLUMNS": "220"}).invoke(app, [*path, "-h"])
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.output
    # Rich reads "[...]" in a help text as markup and drops it, leaving "text ." behind.
    assert not re.search(r" \.\s*(│|$)", res.output, re.M), res.output


@pytest.mark.parametrize(
    ("path", "cmd"), COMMANDS, ids=[" ".join(p) or "fedfuse" for p, _ in COMMANDS]
)
def test_every_option_has_a_help_text(path, cmd):
    for param in cmd.params:
        if isinstance(param, click.Option):
            text = (param.help or "").strip()
            assert text, f"fedfuse {' '.join(path)} {param.opts[0]} has no help text"
            assert not text.endswith(" ."), text
            assert "[" not in text, f"{param.opts[0]}: rich drops '[...]' from help: {text}"


def test_each_flower_log_line_is_printed_once():
    """Opacus' logging.basicConfig at import used to print every Flower line twice."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import common, opacus.utils.module_utils\n"
        "from logging import WARNING\n"
        "from flwr.common.logger import log\n"
        "log(WARNING, 'fedfuse-once-marker')\n"
    )
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "FLWR_TELEMETRY_ENABLED": "0"},
        timeout=120,
    )
    assert (res.stdout + res.stderr).count("fedfuse-once-marker") == 1, res.stderr
