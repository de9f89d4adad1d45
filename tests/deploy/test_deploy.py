"""Deployment end to end: a real flower-superlink and two real flower-supernode processes.

The federation is started by running the README's "Deploy" command block itself (ports, the
deploy/ folder and the runs/ folder substituted), on 127.0.0.1 with free ports, TLS, SuperNode
authentication and a state database. Every wait is bounded; every process the tests start, and
every process those start, is stopped at the end (tests/support/deploy_harness.py).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from fedfuse.client.budget import model_hash
from fedfuse.common.config import RunConfig
from fedfuse.common.deploy.certs import make_certs, make_node_key
from fedfuse.common.privacy.ledger import Ledger
from tests.support.deploy_harness import Managed, ProcessTracker, free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MARKER = "<!-- deploy-commands:"
# Ports and folders the README uses; the tests substitute free ports and a temporary folder.
README_PORTS = {"superlink": 9092, "site-0": 9094, "site-1": 9095}
RUN_TIMEOUT = 420.0  # one 2-round run takes about a minute on two busy cores
CMD_TIMEOUT = 120.0
# Seconds between polls that run the `flwr` command line: each call costs about 1.5 s of CPU
# (a Python start-up importing Flower), which a 0.5 s poll takes from the SuperNodes starting
# on the same two cores.
CLI_POLL = 2.0


def readme_deploy_commands() -> list[str]:
    """The command lines of the README's deploy block, without comments."""
    text = README.read_text()
    start = text.index(MARKER)
    block = text[start:].split("```bash\n", 1)[1].split("```", 1)[0]
    return [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]


def test_deploy_readme_block_has_the_secure_commands():
    """The README block the e2e tests run is the secure path (fast check, no federation)."""
    cmds = readme_deploy_commands()
    joined = "\n".join(cmds)
    assert "--insecure" not in joined
    assert any(c.startswith("fedfuse certs ") for c in cmds)
    assert any(c.startswith("fedfuse server run ") and c.endswith("&") for c in cmds)
    assert sum(c.startswith("fedfuse site run ") and c.endswith("&") for c in cmds) == 2
    assert sum(c.startswith("flwr supernode register ") for c in cmds) == 2
    assert any(c.startswith("flwr run . fedfuse ") for c in cmds)
    for port in README_PORTS.values():
        assert str(port) in joined


# --------------------------------------------------------------------------- ledgers


def ledger_entries(path: Path) -> int:
    """Entries in a site's SQLite ledger (0 before the site's first round made the file)."""
    return len(Ledger(path, create=False).entries()) if path.exists() else 0


# --------------------------------------------------------------------------- the federation


@dataclass
class Federation:
    tmp: Path
    env: dict[str, str]
    ports: dict[str, int]
    tracker: ProcessTracker
    run_line: str = ""
    superlink_line: str = ""
    site_lines: list[str] = field(default_factory=list)
    superlink: Managed | None = None
    sites: list[Managed] = field(default_factory=list)

    @property
    def certs(self) -> Path:
        return self.tmp / "deploy" / "certs"

    @property
    def runs(self) -> Path:
        return self.tmp / "runs"

    def ledger(self, site: int) -> Path:
        return self.tmp / "deploy" / f"site-{site}.ledger"

    def address(self) -> str:
        return f"127.0.0.1:{self.ports['superlink']}"

    def substitute(self, line: str) -> str:
        for key, port in README_PORTS.items():
            line = re.sub(rf"\b{port}\b", str(self.ports[key]), line)
        line = re.sub(r"(?<![\w/])deploy/", f"{self.tmp}/deploy/", line)
        return line.replace("$PWD/runs", str(self.runs))

    def sh(self, line: str, *, timeout: float = CMD_TIMEOUT, check: bool = True) -> str:
        """Run one command line with bash in the project folder (for `flwr run .`)."""
        res = subprocess.run(
            ["bash", "-c", line],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and res.returncode != 0:
            raise AssertionError(
                f"`{line}` exited {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
                f"\n{self.tracker.tails()}"
            )
        return res.stdout + res.stderr

    def background(self, name: str, line: str) -> Managed:
        # exec: the tracked PID becomes fedfuse, which execs flower-superlink/-supernode.
        return self.tracker.start(name, ["bash", "-c", "exec " + line.rstrip("&").strip()])

    def flwr_json(self, *args: str) -> dict[str, Any]:
        out = subprocess.run(
            ["flwr", *args, "--format", "json"],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=CMD_TIMEOUT,
        )
        try:
            return json.loads(out.stdout[out.stdout.index("{") :])
        except ValueError:
            return {"success": False, "stdout": out.stdout, "stderr": out.stderr}

    def runs_listed(self) -> dict[str, dict[str, Any]]:
        res = self.flwr_json("list", "fedfuse")
        return {str(r["run-id"]): r for r in res.get("runs", [])}

    def nodes_online(self) -> int:
        res = self.flwr_json("supernode", "list", "fedfuse")
        return sum(n.get("status") == "online" for n in res.get("nodes", []))

    def wait_nodes_online(self, n: int = 2, timeout: float = 120.0) -> None:
        def online() -> bool:
            self.tracker.check_running()
            return self.nodes_online() >= n

        try:
            wait_until(online, timeout=timeout, what=f"{n} nodes online", interval=CLI_POLL)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.tracker.tails()}") from None

    def wait_run(self, run_id: str, *, timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
        def finished() -> dict[str, Any] | None:
            r = self.runs_listed().get(run_id)
            return r if r and str(r["status"]).startswith("finished") else None

        try:
            return wait_until(finished, timeout=timeout, what=f"run {run_id}", interval=CLI_POLL)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.tracker.tails()}") from None


def _env(tmp: Path) -> dict[str, str]:
    """PATH with a `fedfuse` that runs THIS checkout, Flower's tools, HOME/FLWR_HOME in tmp."""
    bindir = tmp / "bin"
    bindir.mkdir()
    shim = bindir / "fedfuse"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m fedfuse.cli "$@"\n')
    shim.chmod(0o755)
    return {
        "PATH": os.pathsep.join([str(bindir), str(Path(sys.executable).parent), "/usr/bin:/bin"]),
        "HOME": str(tmp),
        "FLWR_HOME": str(tmp / "flwr-home"),
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "LANG": "C.UTF-8",
    }


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    """The README's deploy block up to (not including) `flwr run`: SuperLink + 2 SuperNodes."""
    tmp = tmp_path_factory.mktemp("deploy")
    env = _env(tmp)
    ports = {k: free_port() for k in README_PORTS}
    fed = Federation(tmp, env, ports, ProcessTracker(tmp / "logs", env, ROOT))
    try:
        for raw in readme_deploy_commands():
            line = fed.substitute(raw)
            if line.startswith("source "):
                continue  # the tests already run in the project's environment
            if line.startswith("export "):
                for kv in shlex.split(line)[1:]:
                    k, v = kv.split("=", 1)
                    env[k] = v
            elif line.startswith("flwr run "):
                fed.run_line = line
            elif line.startswith("fedfuse server run "):
                fed.superlink_line = line
                fed.superlink = fed.background("superlink", line)
            elif line.startswith("fedfuse site run "):
                fed.site_lines.append(line)
                fed.sites.append(fed.background(f"site-{len(fed.sites)}", line))
            elif line.startswith("flwr list"):
                continue  # used after the run
            else:
                fed.sh(line)
        assert fed.run_line and fed.superlink and len(fed.sites) == 2
        fed.wait_nodes_online(2)
        yield fed
    finally:
        fed.tracker.stop_all()


@pytest.fixture(scope="module")
def dp_run(federation: Federation) -> dict[str, Any]:
    """The README's `flwr run` as written (2 rounds, DP and SecAgg+ by default), followed to its
    end."""
    fed = federation
    before = [ledger_entries(fed.ledger(i)) for i in range(2)]
    fed.sh(fed.run_line, timeout=RUN_TIMEOUT)
    runs = fed.runs_listed()
    assert len(runs) == 1, runs
    run_id, info = next(iter(runs.items()))
    info = fed.wait_run(run_id, timeout=60)
    return {
        "run-id": run_id,
        "info": info,
        "run-dir": fed.runs / "deploy-demo",
        "ledger-before": before,
        "ledger-after": [ledger_entries(fed.ledger(i)) for i in range(2)],
    }


def _rounds(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_deploy_e2e_two_sites_tls_auth_dp(dp_run):
    """2 rounds over real SuperLink/SuperNodes with TLS, node auth, a state DB and DP-SGD."""
    assert dp_run["info"]["status"] == "finished:completed", dp_run["info"]
    run_dir = dp_run["run-dir"]
    rounds = _rounds(run_dir)
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert set(r["sites"]) == {"site-0", "site-1"}, r
        assert not r["failed"] and not r["rejected"], r
    # DP was on: each site reported a finite epsilon within its budget that grew per round.
    for site in ("site-0", "site-1"):
        e1, e2 = (float(r["sites"][site]["epsilon"]) for r in rounds)
        assert 0 < e1 < e2 <= RunConfig().target_epsilon + 1e-6
        # The site's noise, steps and lifetime spend stay at the site by default.
        assert "noise-multiplier" not in rounds[1]["sites"][site]
    state = torch.load(run_dir / "model.pt", weights_only=True)
    assert state and all(torch.isfinite(v).all() for v in state.values())
    assert (run_dir / "privacy.json").exists() and (run_dir / "summary.md").exists()
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["round"] == 2
    # Each site's ledger holds one entry per round of this run.
    grew = [a - b for a, b in zip(dp_run["ledger-after"], dp_run["ledger-before"], strict=True)]
    assert grew == [2, 2], dp_run


def _site_line(fed: Federation, *, key: Path, certs: Path | None = None, insecure=False) -> str:
    """Site 0's README command with another key / CA folder, failing fast, on a new port."""
    line = fed.site_lines[0].rstrip("&").strip()
    line = line.replace(str(fed.certs / "supernodes" / "site-0.key"), str(key))
    if certs is not None:
        line = line.replace(f"--certs {fed.certs}", f"--certs {certs}")
    if insecure:
        line = line.replace(f"--certs {fed.certs}", "--insecure")
    line = re.sub(r"--runtime-port \d+", f"--runtime-port {free_port()}", line)
    return line + " --max-retries 2"


def _wait_refused(fed: Federation, proc: Managed) -> tuple[int, str]:
    try:
        proc.popen.wait(timeout=90)
    except subprocess.TimeoutExpired:
        fed.tracker.stop(proc)
        pytest.fail(f"{proc.name} still running after 90 s: it was not refused\n{proc.tail()}")
    return int(proc.popen.returncode), proc.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def refused_sites(federation: Federation) -> dict[str, tuple[int, str]]:
    """Three SuperNodes that must not get in, started together (each spends most of its ~12 s
    in start-up and retry back-off, so side by side they take the time of one): an unregistered
    key, a CA other than the federation's, and no TLS. Name -> (exit code, log)."""
    fed = federation
    private, _ = make_node_key("intruder")
    intruder_key = fed.tmp / "intruder.key"
    intruder_key.write_bytes(private)
    intruder_key.chmod(0o600)
    other = make_certs(fed.tmp / "other-ca", server_host="127.0.0.1", sites=1)
    site_1_key = fed.certs / "supernodes" / "site-1.key"
    lines = {
        "intruder": _site_line(fed, key=intruder_key),
        "wrong-ca": _site_line(fed, key=site_1_key, certs=other.root),
        "plaintext": _site_line(fed, key=site_1_key, insecure=True),
    }
    procs = {
        name: fed.tracker.start(name, ["bash", "-c", "exec " + line], may_exit=True)
        for name, line in lines.items()
    }
    return {name: _wait_refused(fed, proc) for name, proc in procs.items()}


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_deploy_unregistered_key_is_refused(federation, refused_sites):
    fed = federation
    code, log = refused_sites["intruder"]
    # Flower's SuperNode reports exit code 305 (its process exits 1) when it cannot activate;
    # the SuperLink says why: it does not know the key.
    assert code != 0 and "Exit Code: 305" in log and "Failed to activate SuperNode" in log, log
    assert fed.superlink is not None
    assert "No SuperNode found with the given public key" in fed.superlink.tail(20_000)
    assert fed.nodes_online() == 2


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_deploy_wrong_ca_cannot_connect(federation, refused_sites):
    fed = federation
    code, log = refused_sites["wrong-ca"]
    assert code != 0, log[-3000:]
    assert "CERTIFICATE_VERIFY_FAILED" in log or "certificate verify failed" in log, log[-3000:]
    assert fed.nodes_online() == 2


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_deploy_plaintext_client_cannot_talk_to_tls_superlink(federation, refused_sites):
    fed = federation
    # A plain HTTP request gets no HTTP answer from the TLS port...
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)) as exc:
        urllib.request.urlopen(f"http://{fed.address()}/", timeout=10).read()
    assert not isinstance(exc.value, urllib.error.HTTPError)
    # ... while the same port does speak TLS with the federation's certificate.
    ctx = ssl.create_default_context(cafile=str(fed.certs / "ca.crt"))
    import socket

    with socket.create_connection(("127.0.0.1", fed.ports["superlink"]), timeout=10) as s:
        with ctx.wrap_socket(s, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    # And a SuperNode without TLS (--insecure, registered key) cannot join.
    code, log = refused_sites["plaintext"]
    assert code != 0, log[-3000:]
    assert fed.nodes_online() == 2


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_deploy_resume_continues_at_next_round(federation, dp_run):
    """Interrupt a 2-round run after round 1 (`flwr stop`), resume it: round 2 only, 2 in all.

    Both runs go through the capture app (fedfuse's ServerApp writing down what it receives),
    so the same federation also checks what crosses the wire in deployment
    (:func:`_assert_server_received_no_path_traceback_or_site_figure`) without a run of its own.
    """
    fed = federation
    fed.wait_nodes_online(2)
    capture = f"flwr run {_capture_app(fed.tmp)} "
    line = fed.run_line.replace("flwr run . ", capture)
    line = line.replace("run-name='deploy-demo'", "run-name='deploy-resume'")
    line = line.replace(" --stream", "") + " --format json"
    out = fed.sh(line)
    run_id = str(json.loads(out[out.index("{") :])["run-id"])
    run_dir = fed.runs / "deploy-resume"
    metrics = run_dir / "metrics.jsonl"
    wait_until(
        lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 1,
        timeout=RUN_TIMEOUT,
        what="round 1 of the run to be resumed",
    )
    # Interrupt while both sites train round 2, i.e. once every message of round 2 has been
    # delivered. (Flower 1.42: a message of a stopped run that reaches a SuperNode AFTER the
    # stop is ignored, yet can leave a ClientApp process retrying and the node stuck.)
    before = fed.tracker.running_named("flwr-clientapp")
    wait_until(
        lambda: len(fed.tracker.running_named("flwr-clientapp") - before) >= 2,
        timeout=120,
        what="both sites training round 2",
        interval=0.2,
    )
    fed.sh(f"flwr stop {run_id} fedfuse")
    stopped = fed.wait_run(run_id, timeout=120)
    assert stopped["status"] == "finished:stopped", stopped
    wait_until(
        lambda: not fed.tracker.running_named("flwr-clientapp"),
        timeout=180,
        what="the sites to finish the stopped run's last task",
    )
    first = metrics.read_text().splitlines()
    assert len(first) == 1, "the run was not interrupted after round 1"
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["round"] == 1
    after_round_1 = model_hash(ckpt["model"])

    fed.wait_nodes_online(2)
    resume = fed.run_line.replace("flwr run . ", capture)
    resume = resume.replace("run-name='deploy-demo'", f"resume-from='{run_dir}'")
    fed.sh(resume, timeout=RUN_TIMEOUT)
    runs = fed.runs_listed()
    new = sorted(set(runs) - {run_id, dp_run["run-id"]})
    assert len(new) == 1, runs
    resumed_id = new[0]
    assert fed.wait_run(resumed_id, timeout=60)["status"] == "finished:completed"

    lines = metrics.read_text().splitlines()
    assert lines[0] == first[0]  # round 1 kept as it was, not retrained
    rounds = [json.loads(x) for x in lines]
    uninterrupted = _rounds(dp_run["run-dir"])
    assert [r["round"] for r in rounds] == [r["round"] for r in uninterrupted] == [1, 2]
    assert set(rounds[1]["sites"]) == {"site-0", "site-1"}
    assert json.loads((run_dir / "resumes.json").read_text()) == [1]
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["round"] == 2
    assert "Resumed from a checkpoint after round(s) [1]" in (run_dir / "summary.md").read_text()
    # A resumed run accounts the rounds before the interruption: the sites' Context.state is
    # new in the resumed Flower run, and the ledger carries the spend across. A round 2
    # retrained after the interruption is a second attempt the ledger counts, so the resumed
    # spend is at least the uninterrupted one (never reset to round 2 alone).
    for site in ("site-0", "site-1"):
        assert rounds[1]["sites"][site]["epsilon"] >= (
            uninterrupted[1]["sites"][site]["epsilon"] * (1 - 1e-6)
        )
    # The resumed round 2 started from the round-1 checkpoint: each site's ledger names the
    # global model every round started from. (The models themselves are not compared with the
    # uninterrupted run's: each site keys its DP noise with its own secret over everything the
    # server sent, and SecAgg+ rounds stochastically, so two runs differ by design.)
    uid = (run_dir / "run-uid").read_text().strip()
    for i in range(2):
        entries = [e for e in Ledger(fed.ledger(i)).entries() if e.run_id == uid]
        by_round = {r: [e for e in entries if e.round == r] for r in (1, 2)}
        assert len(by_round[1]) == 1 and by_round[2], [e.label() for e in entries]
        assert {e.model_hash for e in by_round[2]} == {after_round_1}, i
        assert by_round[1][0].model_hash != after_round_1
    _assert_server_received_no_path_traceback_or_site_figure(fed, run_dir)


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_deploy_superlink_restart_keeps_runs(federation, dp_run):
    """The SuperLink restarted on the same --database lists the run; the sites come back."""
    fed = federation
    assert fed.superlink is not None
    code = fed.tracker.stop(fed.superlink)
    assert code is not None
    fed.superlink = fed.background("superlink-restarted", fed.superlink_line)
    wait_until(
        lambda: dp_run["run-id"] in fed.runs_listed(),
        timeout=90,
        what="the restarted SuperLink",
        interval=CLI_POLL,
    )
    assert fed.runs_listed()[dp_run["run-id"]]["status"] == "finished:completed"
    # Registrations live in the database too: the same keys are let in again.
    fed.wait_nodes_online(2, timeout=180)


def _capture_app(tmp: Path) -> Path:
    """A copy of the project whose ServerApp writes down every message it receives
    (tests/wire_capture.py); the ClientApp is fedfuse's own."""
    app_dir = tmp / "capture-app"
    if not app_dir.exists():
        top = {".venv", ".git", "runs", "data", "deploy", ".pytest_cache", ".ruff_cache"}

        def ignore(folder: str, names: list[str]) -> set[str]:
            skip = {n for n in names if n == "__pycache__" or n.endswith(".pyc")}
            return skip | (top & set(names) if Path(folder) == ROOT else set())

        shutil.copytree(ROOT, app_dir, ignore=ignore)
        pp = app_dir / "pyproject.toml"
        text = pp.read_text()
        assert 'serverapp = "fedfuse.server.app:app"' in text
        pp.write_text(text.replace('"fedfuse.server.app:app"', '"tests.wire_capture:app"'))
    return app_dir


def _assert_server_received_no_path_traceback_or_site_figure(fed: Federation, run_dir: Path):
    """Every message the ServerApp received over the real SuperLink and SuperNodes (SecAgg+
    on) holds only the README's fields: no file path, no traceback, no per-site evaluation
    figure (the sites did not opt in to share them)."""
    from tests.support.wire import EVAL_COLLECT, PATH_LIKE, SECAGG_STAGES, TRAIN_COLLECT

    received = [json.loads(x) for x in (run_dir / "received.jsonl").read_text().splitlines()]
    assert {m["type"] for m in received} == {"train", "evaluate"}, received
    for m in received:
        assert m["error"] is None, m
        stage = m["records"].get("secaggplus", {}).get("values", {}).get("stage")
        allowed = SECAGG_STAGES.get(stage) or (
            TRAIN_COLLECT if m["type"] == "train" else EVAL_COLLECT
        )
        assert set(m["records"]) <= set(allowed), m
        for name, rec in m["records"].items():
            assert set(rec["keys"]) <= allowed[name], (name, rec["keys"])
            assert not any(k.startswith("eval-") for k in rec["keys"]), (name, rec["keys"])
            for v in rec["values"].values():
                text = str(v)
                assert "Traceback" not in text and str(fed.tmp) not in text, text
                assert not (isinstance(v, str) and PATH_LIKE.search(text)), text
    stages = {m["records"].get("secaggplus", {}).get("values", {}).get("stage") for m in received}
    assert len(stages - {None}) >= 2, stages  # SecAgg+ rounds were among them
    for r in _rounds(run_dir):
        assert r["eval-sites"] == 2 and 0.0 <= r["eval-auroc"] <= 1.0
        for site in r["sites"].values():
            assert not any(k.startswith("eval-") for k in site), site


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_deploy_every_process_is_stopped(federation):
    """Stop everything; nothing the tests started (nor its helpers) is left running."""
    fed = federation
    assert len(fed.tracker.seen) >= 3
    survivors = fed.tracker.stop_all()
    assert survivors == [], survivors
