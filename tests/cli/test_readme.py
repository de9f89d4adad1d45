"""The README is a test: every fenced shell block of README.md runs, at a small size.

Each ``bash`` block is split into commands (continuation lines joined, comments dropped) and run
in order in one scratch folder (``HOME`` there too), so later commands see what earlier ones
made, as a reader's shell would. Sizes are substituted the way tests/deploy/test_deploy.py
substitutes ports and paths (:func:`shrink`): the smoke scenario's sites, one round where the number
of rounds does not change what the text claims, a few records. ``fedfuse`` commands run in this
process through the real command line (typer); every other command runs in ``bash``.

To fit the suite's budget (this file <= 5 minutes on two cores), the federations run their real
ServerApp and ClientApp over :class:`fedfuse.simulations.inprocess.InProcessGrid` instead of Ray
(whose start-up alone costs 10-18 s per run here); Flower's simulation engine itself is exercised by
tests/simulations/test_e2e_simulation.py and tests/cli/test_readme_failures.py.

A block preceded by ``<!-- readme-test: skip REASON -->`` is not run; the reason is printed.
The deployment block (``<!-- deploy-commands: ... -->``) is run by tests/deploy/test_deploy.py.
Wall times of the commands as run here are written to ``$FEDFUSE_README_TIMINGS`` when set.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedfuse.cli import app
from fedfuse.common.privacy.ledger import Ledger, cumulative_epsilon
from fedfuse.common.site_state import ledger_file
from fedfuse.simulations.scenarios import load_scenario
from tests.support import inprocess
from tests.support.inprocess import patch_simulation

ROOT = Path(__file__).resolve().parents[2]
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s+(.*?)\s*-->")
DEPLOY = re.compile(r"<!--\s*deploy-commands:")


@dataclass
class Block:
    source: str  # README.md:LINE
    commands: list[str]
    skip: str  # why it is not run here; empty = run it


def readme_blocks(path: Path) -> list[Block]:
    """Every ```bash block of ``path`` with the marker (if any) on the line before it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() in ("```bash", "```sh", "```shell"):
            start = i
            body: list[str] = []
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            before = next((x for x in reversed(lines[:start]) if x.strip()), "")
            skip = ""
            if m := SKIP.search(before):
                skip = m.group(1)
            elif DEPLOY.search(before):
                skip = "run by tests/deploy/test_deploy.py (ports and paths substituted)"
            name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
            blocks.append(Block(f"{name}:{start + 1}", split_commands(body), skip))
        i += 1
    return blocks


def split_commands(body: list[str]) -> list[str]:
    """Shell commands of a block: continuation lines joined; heredocs kept with their command."""
    out: list[str] = []
    i = 0
    while i < len(body):
        line = body[i]
        while line.rstrip().endswith(("\\", "||", "&&", "|")) and i + 1 < len(body):
            i += 1
            line = line.rstrip().removesuffix("\\") + " " + body[i].strip()
        if m := re.search(r"<<-?\s*'?(\w+)'?", line):
            end = m.group(1)
            while i + 1 < len(body):
                i += 1
                line += "\n" + body[i]
                if body[i].strip() == end:
                    break
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(line.strip())
        i += 1
    return out


def _set(argv: list[str], flag: str, value: str) -> None:
    """Set ``flag``'s value in ``argv`` (appended when absent)."""
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]


def _cap(argv: list[str], flag: str, most: int) -> None:
    if flag in argv:
        i = argv.index(flag) + 1
        argv[i] = str(min(int(argv[i]), most))


def keeps_size(argv: list[str]) -> bool:
    """Client-level DP's claim (it learns at its epsilon) holds only at the example's number of
    sites: that example runs as written."""
    level = argv[argv.index("--dp-level") + 1] if "--dp-level" in argv[:-1] else "record"
    return argv[0] == "simulate" and level in ("client", "record+client")


def shrink(argv: list[str], *, keep_rounds: bool) -> list[str]:
    """A ``fedfuse`` command at test size (the substitutions a reader would make on a laptop)."""
    argv = list(argv)
    if keeps_size(argv):
        return argv
    federation = argv[0] in ("simulate", "experiment") or argv[:2] == ["audit", "empirical"]
    if federation:
        if "--scenario" in argv:
            scenario = argv[argv.index("--scenario") + 1]
            if not scenario.endswith(".toml"):
                load_scenario(scenario)  # the named scenario exists and parses; it runs as smoke
        if "--data" not in argv and argv[0] != "audit":
            _set(argv, "--scenario", "smoke")
        if "--data" not in argv:
            _cap(argv, "--sites", 2)
            _cap(argv, "--records", 80)
            # A threshold above the sites left after the cap cannot be met.
            argv = [
                "reconstruction-threshold=2" if a.startswith("reconstruction-threshold=") else a
                for a in argv
            ]
        if not keep_rounds and argv[0] != "experiment":
            _set(argv, "--rounds", "1")
    if argv[0] == "experiment":
        _set(argv, "--seeds", "0")
        if argv[1] == "utility-vs-epsilon":
            _set(argv, "--epsilons", "2,inf")
        argv += ["--set", "num-rounds=1"]
    if argv[:2] == ["audit", "empirical"]:
        _set(argv, "--canaries", "20")
        _set(argv, "--guesses", "10")
    if argv[:2] == ["data", "synth"]:
        _cap(argv, "--records", 60)
    return argv


# What a block's text says it produces, checked after the block ran (by the README line).
RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "model.pt",
    "privacy.json",
    "summary.md",
    "learning_curve.png",
    "epsilon.png",
)


def _new_run_dirs(work: Path, before: set[Path]) -> list[Path]:
    now = {p.parent for p in work.glob("runs/**/privacy.json")}
    return sorted(now - before)


BLOCKS = readme_blocks(ROOT / "README.md") + readme_blocks(ROOT / "docker" / "README.md")
TIMINGS: list[dict[str, object]] = []
# A federation whose test-size command is the same as one already run (several scenarios all
# run as smoke here) is not run again: it would redo the same run. Command -> where it ran.
RAN: dict[tuple[str, ...], str] = {}


def same_run_key(small: list[str]) -> tuple[str, ...] | None:
    """What makes a test-size command's run distinct; None for a command that always runs.

    A simulate without ``--run-name`` is its whole command line. An experiment is its flags in
    any order without ``--out``: the README's utility-vs-epsilon lines on the smoke, utility-3 and
    utility-large scenarios all shrink to the same smoke sweep, and where a sweep's CSV and runs
    go is checked by the first run (and by tests/simulations/test_scenarios_experiments.py).
    """
    if small[0] == "simulate" and "--run-name" not in small:
        return tuple(small)
    if small[0] == "experiment" and all(a.startswith("--") for a in small[2::2]):
        flags = zip(small[2::2], small[3::2], strict=True)
        pairs = sorted((f, v) for f, v in flags if f != "--out")
        return (*small[:2], *(x for pair in pairs for x in pair))
    return None


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory):
    """One scratch folder for every block, in README order, as a reader's shell would be."""
    work = tmp_path_factory.mktemp("readme") / "work"
    (work / "home").mkdir(parents=True)
    # The README's "your own scenario file": the reader writes it; here a copy of smoke.
    (work / "my-scenario.toml").write_text(
        (ROOT / "simulations" / "scenarios" / "smoke.toml").read_text()
    )
    with pytest.MonkeyPatch.context() as mp:
        patch_simulation(mp)
        mp.chdir(work)
        mp.setenv("HOME", str(work / "home"))
        mp.setenv("FLWR_TELEMETRY_ENABLED", "0")
        mp.setenv("PWD", str(work))
        yield work, mp
    if dest := os.environ.get("FEDFUSE_README_TIMINGS"):
        Path(dest).write_text(json.dumps(TIMINGS, indent=1) + "\n")


@pytest.mark.e2e
@pytest.mark.parametrize("block", BLOCKS, ids=[b.source for b in BLOCKS])
def test_readme_block_runs(block: Block, workspace, capsys):
    work, mp = workspace
    if block.skip:
        pytest.skip(block.skip)
    # The ledger example's claims (the second run stays within site-1's lifetime budget, the
    # third is refused at round 1) hold for any number of rounds, as a run's epsilon is planned
    # for the whole run: it runs one round (:func:`_check_ledger_example` checks the claims).
    keep_rounds = "--rounds 2" in " ".join(block.commands) and any(
        "client-dp" in c or "ddp" in c for c in block.commands
    )
    runner = CliRunner()
    needs_docker = False
    for command in block.commands:
        argv = shlex.split(command.split("\n", 1)[0], comments=True)
        if argv[:1] == ["source"]:
            continue  # the test already runs in the venv
        # From the first command that needs the Docker engine on, the rest need its containers.
        needs_docker = needs_docker or "docker compose" in command or argv[:1] == ["docker"]
        if needs_docker:
            with capsys.disabled():
                print(f"\n{block.source}: skipped (needs a Docker engine): {command[:70]}")
            continue
        if argv[:1] == ["export"]:
            for kv in argv[1:]:
                k, _, v = kv.partition("=")
                mp.setenv(k, v)
            continue
        t0 = time.monotonic()
        if argv[:1] == ["fedfuse"]:
            before = {p.parent for p in work.glob("runs/**/privacy.json")}
            small = shrink(argv[1:], keep_rounds=keep_rounds)
            key = same_run_key(small)
            if key in RAN:
                shown = "fedfuse " + " ".join(small)
                TIMINGS.append({"block": block.source, "command": shown, "same_as": RAN[key]})
                with capsys.disabled():
                    print(f"\n{block.source}: {shown}: same as {RAN[key]}, not rerun")
                continue
            if key is not None:
                RAN[key] = block.source
            federations = len(inprocess.RUNS)
            res = runner.invoke(app, small)
            out, code = res.output, res.exit_code
            assert res.exception is None or isinstance(res.exception, SystemExit), (
                block.source,
                command,
                repr(res.exception),
                out[-3000:],
            )
            shown = "fedfuse " + " ".join(small)
        else:
            proc = subprocess.run(
                ["bash", "-c", command], cwd=work, capture_output=True, text=True, timeout=120
            )
            out, code, shown = proc.stdout + proc.stderr, proc.returncode, command
        seconds = time.monotonic() - t0
        TIMINGS.append({"block": block.source, "command": shown, "seconds": round(seconds, 1)})
        assert code == 0, (block.source, shown, out[-3000:])
        # What the text says each command produces.
        if argv[:2] == ["fedfuse", "simulate"]:
            assert len(inprocess.RUNS) == federations + 1, (shown, "did not run in process")
            new = _new_run_dirs(work, before)
            assert len(new) == 1, (shown, out[-2000:])
            private = "--epsilon inf" not in command
            for name in RUN_FILES:
                if name != "epsilon.png" or private:  # no epsilon curve without DP
                    assert (new[0] / name).is_file(), (shown, name)
            if "client-dp" in command:  # the README's client-level DP example learns
                rounds = [
                    json.loads(x) for x in (new[0] / "metrics.jsonl").read_text().splitlines()
                ]
                losses = [r["eval-loss"] for r in rounds]
                aurocs = [r["eval-auroc"] for r in rounds]
                assert len(rounds) == 3 and losses[-1] < losses[0], losses
                assert aurocs[-1] > aurocs[0] and aurocs[-1] > 0.7, aurocs
                client = json.loads((new[0] / "privacy.json").read_text())["client_level"]
                assert client["epsilon"] < 10 and client["noise_multiplier"] >= 1, client
        if argv[:3] == ["fedfuse", "data", "check"]:
            assert "all valid" in out, out
        if argv[:2] == ["fedfuse", "experiment"]:
            assert "Results:" in out, out
            csv_path = Path(out.split("Results:")[1].split(" and ")[0].strip())
            assert csv_path.is_file() and csv_path.with_suffix(".png").is_file()
    if any("data/ledger-demo" in c for c in block.commands):
        _check_ledger_example(work)


def _check_ledger_example(work: Path) -> None:
    """What the README says the ledger example shows: site-1 (budget 5) takes part in the first
    two runs within its lifetime budget, and is refused at the start of the third, with its
    figures as fields; the sites without a budget train in every run."""
    sites = {
        run: json.loads((work / "runs" / run / "privacy.json").read_text())["sites"]
        for run in ("first", "second", "third")
    }
    for run in ("first", "second"):
        assert sites[run]["site-1"]["rounds"] >= 1, (run, sites[run]["site-1"])
    # More noise in the second run: what it may spend is what the first left of the budget.
    assert sites["second"]["site-1"]["epsilon"] < sites["first"]["site-1"]["epsilon"], sites
    third = sites["third"]["site-1"]
    assert third["rounds"] == 0 and third["refused"][0]["round"] == 1, third
    assert "privacy budget exhausted" in third["refused"][0]["reason"], third
    for run in sites.values():
        assert run["site-0"]["rounds"] >= 1 and run["site-2"]["rounds"] >= 1, run
    refusal = json.loads((work / "runs" / "third" / "metrics.jsonl").read_text().splitlines()[0])[
        "refusals"
    ]["site-1"]
    assert refusal["budget"] == 5.0 and refusal["spent"] <= 5.0, refusal
    # The second run started where the first ended and stopped within the budget of 5.
    ledger = Ledger(ledger_file(work / "data" / "ledger-demo" / "site-1"), create=False)
    lifetime = cumulative_epsilon(ledger.entries(), delta=1e-5)
    assert sites["first"]["site-1"]["epsilon"] < lifetime <= 5.0, lifetime


def test_readme_blocks_parse_and_every_skip_has_a_reason():
    blocks = readme_blocks(ROOT / "README.md")
    for b in blocks:
        assert b.commands, b.source
        assert b.skip is not None
    for b in readme_blocks(ROOT / "docker" / "README.md"):
        assert b.skip or b.commands, b.source


def test_flwr_config_snippet_can_run_twice(tmp_path):
    """The README's `~/.flwr/config.toml` snippet: run twice, still one valid connection."""
    import tomllib

    block = next(
        b for b in readme_blocks(ROOT / "README.md") if "config.toml" in "".join(b.commands)
    )
    snippet = [c for c in block.commands if "config.toml" in c]
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for _ in range(2):
        for c in snippet:
            subprocess.run(["bash", "-ec", c], cwd=tmp_path, env=env, check=True)
    config = tomllib.loads((tmp_path / ".flwr" / "config.toml").read_text())
    assert config["superlink"]["fedfuse-local"]["address"] == ":local:"
