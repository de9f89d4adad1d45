"""Command lines for Flower's deployment engine (1.42): SuperLink, SuperNode, `flwr` connections.

Every flag here was checked against ``--help`` of flwr 1.42. Secure by default: TLS and
SuperNode authentication are on unless the caller asks for ``insecure`` explicitly.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import ssl
import sys
import time
import tomllib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w  # a dependency of Flower's own CLI, which writes the same file

from fedfuse.common.deploy.certs import CA_CERT, SERVER_CERT, SERVER_KEY
from fedfuse.common.errors import ConfigError

DEFAULT_SUPERLINK_PORT = 9092
DEFAULT_SUPERNODE_RUNTIME_PORT = 9094
INSECURE_WARNING = (
    "--insecure: traffic between SuperLink and SuperNodes is NOT encrypted and the peer is NOT "
    "verified; model updates and metrics can be read and altered in transit. Use only for a "
    "throw-away test on one machine."
)


class InsecureDeploymentWarning(UserWarning):
    """A SuperLink or SuperNode is started without TLS."""


def flower_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment Flower's processes run in.

    Telemetry off (a privacy tool must not phone home); no ``uv sync`` of the app's
    dependencies at run time (they are installed already, and fetching gigabytes of CUDA wheels
    mid-run is not what a hospital's firewall allows); and this interpreter's ``bin`` first on
    PATH, because the SuperLink and SuperNode start ``flower-superexec`` by name.
    """
    env = dict(os.environ if base is None else base)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    bindir = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if bindir not in path.split(os.pathsep):
        env["PATH"] = bindir + (os.pathsep + path if path else "")
    return env


def flower_executable(name: str) -> str:
    """Path of a Flower console script (next to this interpreter first, then on PATH)."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise ConfigError(
            f"'{name}' not found next to {sys.executable} nor on PATH; install Flower "
            "(pip install 'flwr[simulation]==1.42.*') in this environment"
        )
    return found


def parse_address(address: str, *, flag: str = "--superlink") -> tuple[str, int]:
    """Split ``HOST:PORT`` (IPv6 as ``[::1]:PORT``), checking the port range."""
    host, sep, port_s = address.rpartition(":")
    if not sep or not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ConfigError(
            f"{flag} '{address}' must look like HOST:PORT with a port in [1, 65535], "
            "e.g. 127.0.0.1:9092 or superlink.example.org:9092"
        )
    return host.strip("[]"), int(port_s)


def _require_file(path: Path, what: str, fix: str) -> Path:
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' does not exist; {fix}")
    return path.resolve()


def check_private_key_mode(path: Path) -> None:
    """Refuse a private key that other users can read (as OpenSSH does)."""
    if os.name == "posix" and path.stat().st_mode & 0o077:
        raise ConfigError(
            f"private key '{path}' is readable by other users "
            f"(mode {oct(path.stat().st_mode & 0o777)}); run: chmod 600 {path}"
        )


# --------------------------------------------------------------------------- SuperLink


@dataclass(frozen=True)
class SuperLinkOptions:
    """What ``fedfuse server run`` needs to start a SuperLink."""

    certs: Path | None
    database: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_SUPERLINK_PORT
    insecure: bool = False
    log_file: Path | None = None


def superlink_command(opts: SuperLinkOptions) -> list[str]:
    """``flower-superlink`` argv: TLS, SuperNode authentication, persistent state, no uv sync."""
    if not 0 < opts.port < 65536:
        raise ConfigError(f"--port must be in range [1, 65535]; found {opts.port}")
    cmd = [flower_executable("flower-superlink")]
    if opts.insecure:
        warnings.warn(INSECURE_WARNING, InsecureDeploymentWarning, stacklevel=2)
        cmd.append("--insecure")
    else:
        if opts.certs is None:
            raise ConfigError(
                "--certs is required (a folder made by `fedfuse certs`); "
                "or pass --insecure for an unencrypted local test"
            )
        fix = "make it with: fedfuse certs --out DIR --server-host HOST"
        ca = _require_file(opts.certs / CA_CERT, "CA certificate", fix)
        cert = _require_file(opts.certs / SERVER_CERT, "SuperLink certificate", fix)
        key = _require_file(opts.certs / SERVER_KEY, "SuperLink private key", fix)
        check_private_key_mode(key)
        cmd += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert)]
        cmd += ["--ssl-keyfile", str(key)]
    # Node authentication stays on even with --insecure: only registered sites may join.
    cmd.append("--enable-supernode-auth")
    opts.database.parent.mkdir(parents=True, exist_ok=True)
    cmd += ["--database", str(opts.database.resolve())]
    cmd.append("--disable-runtime-dependency-installation")
    cmd += ["--host", opts.host, "--port", str(opts.port)]
    if opts.log_file is not None:
        cmd += ["--log-file", str(opts.log_file.resolve())]
    return cmd


# --------------------------------------------------------------------------- SuperNode


@dataclass(frozen=True)
class SiteOptions:
    """What ``fedfuse site run`` needs to start a site's SuperNode."""

    superlink: str
    data: Path
    ledger: Path
    epsilon_budget: float
    delta: float = 1e-5
    certs: Path | None = None
    key: Path | None = None
    site_name: str = ""
    runtime_port: int = DEFAULT_SUPERNODE_RUNTIME_PORT
    insecure: bool = False
    max_retries: int | None = None
    max_wait_time: float | None = None
    # The site's own figures and privacy internals also go to the server, in the clear.
    share_site_metrics: bool = False


def _toml_string(key: str, value: str) -> str:
    # Flower's --node-config parser takes "..." with no '"' inside; TOML escapes backslashes.
    if '"' in value or "\n" in value:
        raise ConfigError(
            f"{key} '{value}' contains a double quote or a line break, which Flower's "
            "--node-config cannot carry; rename or move it"
        )
    return '"' + value.replace("\\", "\\\\") + '"'


def node_config(opts: SiteOptions) -> dict[str, Any]:
    """The SuperNode's node config: where the site's data and ledger are, and its budget.

    The ClientApp reads ``data-path``/``site-name`` (client/site.py resolve_site) and
    ``ledger-path``/``epsilon-budget``/``delta`` (the site's privacy ledger). Paths are made
    absolute: the ClientApp runs in another process, from another working directory.
    """
    if math.isnan(opts.epsilon_budget) or not 0 < opts.epsilon_budget < math.inf:
        raise ConfigError(
            f"--epsilon-budget must be in range (0, inf) (the site's total epsilon over every "
            f"run); found {opts.epsilon_budget}"
        )
    if math.isnan(opts.delta) or not 0 < opts.delta < 1:
        raise ConfigError(f"--delta must be in range (0, 1); found {opts.delta}")
    data = opts.data.expanduser().resolve()
    ledger = opts.ledger.expanduser().resolve()
    if not ledger.parent.is_dir():
        raise ConfigError(
            f"--ledger '{opts.ledger}': folder '{ledger.parent}' does not exist; create it first"
        )
    config: dict[str, Any] = {
        "data-path": str(data),
        "site-name": opts.site_name or data.name,
        "ledger-path": str(ledger),
        "epsilon-budget": float(opts.epsilon_budget),
        "delta": float(opts.delta),
    }
    if opts.share_site_metrics:  # opt-in only: absent, the ClientApp shares nothing more
        config["share-site-metrics"] = True
    return config


def format_node_config(config: Mapping[str, Any]) -> str:
    """``key=value`` pairs as flower-supernode's ``--node-config`` parses them (TOML values)."""
    parts = []
    for k, v in config.items():
        if isinstance(v, str):
            parts.append(f"{k}={_toml_string(k, v)}")
        elif isinstance(v, bool):
            parts.append(f"{k}={'true' if v else 'false'}")
        elif isinstance(v, float):
            parts.append(f"{k}={v!r}")
        else:
            parts.append(f"{k}={v}")
    return " ".join(parts)


def supernode_command(opts: SiteOptions) -> list[str]:
    """``flower-supernode`` argv: TLS against the federation's CA, authenticated by the site key."""
    parse_address(opts.superlink)
    if not 0 < opts.runtime_port < 65536:
        raise ConfigError(f"--runtime-port must be in range [1, 65535]; found {opts.runtime_port}")
    cmd = [flower_executable("flower-supernode"), "--superlink", opts.superlink]
    if opts.insecure:
        warnings.warn(INSECURE_WARNING, InsecureDeploymentWarning, stacklevel=2)
        cmd.append("--insecure")
    else:
        if opts.certs is None:
            raise ConfigError(
                "--certs is required (the folder holding the federation's ca.crt); "
                "or pass --insecure for an unencrypted local test"
            )
        ca = _require_file(
            opts.certs / CA_CERT, "CA certificate", "copy ca.crt from the coordinator there"
        )
        cmd += ["--root-certificates", str(ca)]
    if opts.key is None:
        if not opts.insecure:
            raise ConfigError(
                "--key is required: the site's private key from `fedfuse certs` "
                "(its .pub must be registered at the SuperLink with `flwr supernode register`)"
            )
    else:
        key = _require_file(
            opts.key, "--key", "give the site's private key made by `fedfuse certs`"
        )
        check_private_key_mode(key)
        cmd += ["--auth-supernode-private-key", str(key)]
    cmd += ["--node-config", format_node_config(node_config(opts))]
    # The SuperNode's local Runtime API, where its ClientApp processes connect (one per site).
    cmd += ["--port", str(opts.runtime_port)]
    if opts.max_retries is not None:
        cmd += ["--max-retries", str(opts.max_retries)]
    if opts.max_wait_time is not None:
        cmd += ["--max-wait-time", str(opts.max_wait_time)]
    return cmd


# --------------------------------------------------------------------------- flwr CLI


def flwr_home(env: Mapping[str, str] | None = None) -> Path:
    """``$FLWR_HOME`` or ``~/.flwr``, where `flwr` keeps ``config.toml``."""
    env = os.environ if env is None else env
    return Path(env.get("FLWR_HOME") or Path.home() / ".flwr").expanduser()


def write_connection(
    name: str,
    *,
    address: str,
    root_certificates: Path | None,
    insecure: bool = False,
    home: Path | None = None,
    make_default: bool = False,
) -> Path:
    """Add or replace ``[superlink.<name>]`` in ``$FLWR_HOME/config.toml``; keep everything else.

    ``flwr run . <name>`` and ``flwr supernode register KEY.pub <name>`` then reach the
    SuperLink at ``address`` over TLS, trusting ``root_certificates``.
    """
    # lazy: flwr takes seconds to load; only writing a connection needs it
    from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"connection name '{name}' must be letters, digits, '-' or '_'")
    parse_address(address)
    path = (home or flwr_home()) / "config.toml"
    # A new file starts from Flower's own default (its local simulation connection stays).
    text = path.read_text() if path.exists() else DEFAULT_FLOWER_CONFIG_TOML
    data: dict[str, Any] = tomllib.loads(text)
    links = data.setdefault("superlink", {})
    entry: dict[str, Any] = {"address": address}
    if insecure:
        warnings.warn(INSECURE_WARNING, InsecureDeploymentWarning, stacklevel=2)
        entry["insecure"] = True
    else:
        if root_certificates is None:
            raise ConfigError("--certs is required (the folder holding ca.crt), or --insecure")
        ca = _require_file(root_certificates, "CA certificate", "run `fedfuse certs` first")
        entry["root-certificates"] = str(ca)
    links[name] = entry
    if make_default or "default" not in links:
        links["default"] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(tomli_w.dumps(data))
    os.replace(tmp, path)
    return path


def wait_for_superlink(address: str, *, ca_cert: Path | None, timeout: float) -> None:
    """Wait until the SuperLink at ``address`` accepts a TLS handshake verified by ``ca_cert``.

    Fails at once (ConfigError) if the certificate is not valid for the host name: sites would
    be refused the same way. ``ca_cert=None`` only checks that the port accepts connections.
    """
    host, port = parse_address(address)
    ctx = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert is not None else None
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=5) as sock:
                if ctx is None:
                    return
                with ctx.wrap_socket(sock, server_hostname=host):
                    return
        except ssl.SSLCertVerificationError as exc:
            raise ConfigError(
                f"the SuperLink at {address} presents a certificate that {ca_cert} does not "
                f"vouch for as '{host}' ({exc.verify_message}); use the ca.crt of the same "
                "`fedfuse certs` folder, and a host name the certificate names"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"no SuperLink answered at {address} within {timeout:g} s ({exc}); "
                    "is `fedfuse server run` running there?"
                ) from None
            time.sleep(0.5)
