"""Deployment building blocks without a federation: certificates, command lines, connections."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from cryptography.x509.oid import ExtendedKeyUsageOID
from flwr.cli.flower_config import parse_superlink_connection
from flwr.common.config import parse_config_args

from fedfuse.common.deploy import flower
from fedfuse.common.deploy.certs import make_certs
from fedfuse.common.deploy.flower import (
    InsecureDeploymentWarning,
    SiteOptions,
    SuperLinkOptions,
    format_node_config,
    node_config,
    superlink_command,
    supernode_command,
    wait_for_superlink,
    write_connection,
)
from fedfuse.common.errors import ConfigError
from tests.support.deploy_harness import free_port
from tests.support.flower_help import help_flags

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"), server_host="fl.example.org", sites=2)


# --------------------------------------------------------------------------- certificates


def test_deploy_certs_chain_sans_and_usage(bundle):
    ca = x509.load_pem_x509_certificate(bundle.ca_cert.read_bytes())
    srv = x509.load_pem_x509_certificate(bundle.server_cert.read_bytes())
    # The server certificate is signed by the CA (raises if not).
    srv.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not srv.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "fl.example.org"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    eku = srv.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    for cert in (ca, srv):
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert cert.public_key().curve.name == "secp384r1"


def test_deploy_certs_ip_server_host_is_an_ip_san(tmp_path):
    b = make_certs(tmp_path, server_host="10.1.2.3", sites=0)
    srv = x509.load_pem_x509_certificate(b.server_cert.read_bytes())
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.1.2.3") in san.get_values_for_type(x509.IPAddress)
    assert b.node_keys == ()


def test_deploy_site_keys_are_openssh_p384_that_flower_accepts(bundle):
    from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

    assert len(bundle.node_keys) == 2
    seen = set()
    for key_path, pub_path in zip(bundle.node_keys, bundle.node_public_keys, strict=True):
        text = key_path.read_text()
        assert text.startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
        private = load_ssh_private_key(key_path.read_bytes(), password=None)
        public = load_ssh_public_key(pub_path.read_bytes())
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert public.curve.name == "secp384r1" and uses_nist_ec_curve(public)
        assert pub_path.read_text().startswith("ecdsa-sha2-nistp384 ")
        assert private.public_key().public_numbers() == public.public_numbers()
        seen.add(pub_path.read_text().split()[1])
    assert len(seen) == 2  # distinct keys per site


def test_deploy_private_keys_are_0600_public_files_are_not_secret(bundle):
    private = [bundle.ca_key, bundle.server_key, bundle.superexec_secret, *bundle.node_keys]
    private += [bundle.runtime_key(i) for i in range(2)]
    for p in private:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    for p in [bundle.ca_cert, bundle.server_cert, *bundle.node_public_keys]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


def test_deploy_certs_refuse_overwrite_unless_force(tmp_path):
    b = make_certs(tmp_path, server_host="localhost", sites=1)
    before = b.node_keys[0].read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite.*--force"):
        make_certs(tmp_path, server_host="localhost", sites=1)
    assert b.node_keys[0].read_bytes() == before  # untouched
    make_certs(tmp_path, server_host="localhost", sites=1, force=True)
    assert b.node_keys[0].read_bytes() != before
    assert stat.S_IMODE(b.node_keys[0].stat().st_mode) == 0o600


@pytest.mark.parametrize("host", ["bad host", "", "-x.org", "a..b"])
def test_deploy_certs_reject_bad_server_host(tmp_path, host):
    with pytest.raises(ConfigError, match="--server-host"):
        make_certs(tmp_path, server_host=host, sites=1)
    assert not (tmp_path / "ca.key").exists()


def test_deploy_runtime_cert_names_the_compose_supernode(bundle):
    cert = x509.load_pem_x509_certificate(bundle.runtime_cert(1).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "supernode-1" in san.get_values_for_type(x509.DNSName)


# --------------------------------------------------------------------------- command lines


def _site(bundle, tmp_path, **kw) -> SiteOptions:
    base = dict(
        superlink="127.0.0.1:9092",
        data=tmp_path / "site-a",
        ledger=tmp_path / "site-a.ledger",
        epsilon_budget=8.0,
        certs=bundle.root,
        key=bundle.node_keys[0],
    )
    base.update(kw)
    return SiteOptions(**base)


def test_deploy_superlink_command_is_secure_and_uses_real_flags(bundle, tmp_path):
    cmd = superlink_command(SuperLinkOptions(bundle.root, tmp_path / "state.db", port=9123))
    assert "--insecure" not in cmd
    for flag in (
        "--ssl-ca-certfile",
        "--ssl-certfile",
        "--ssl-keyfile",
        "--enable-supernode-auth",
        "--database",
        "--disable-runtime-dependency-installation",
    ):
        assert flag in cmd
    assert cmd[cmd.index("--database") + 1] == str((tmp_path / "state.db").resolve())
    assert cmd[cmd.index("--port") + 1] == "9123"
    flags = {a for a in cmd if a.startswith("--")}
    assert flags <= help_flags("flower-superlink")


def test_deploy_supernode_command_is_secure_and_uses_real_flags(bundle, tmp_path):
    cmd = supernode_command(_site(bundle, tmp_path, runtime_port=9200, max_retries=3))
    assert "--insecure" not in cmd
    assert cmd[cmd.index("--root-certificates") + 1] == str(bundle.ca_cert.resolve())
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(bundle.node_keys[0])
    assert cmd[cmd.index("--port") + 1] == "9200"
    flags = {a for a in cmd if a.startswith("--")}
    assert flags <= help_flags("flower-supernode")


def test_deploy_node_config_round_trips_through_flowers_parser(bundle, tmp_path):
    odd = tmp_path / "site with space"
    cfg = node_config(_site(bundle, tmp_path, data=odd, delta=1e-6, site_name="St Mary's"))
    parsed = parse_config_args([format_node_config(cfg)])
    assert parsed == cfg
    assert parsed["data-path"] == str(odd.resolve()) and parsed["site-name"] == "St Mary's"
    assert parsed["epsilon-budget"] == 8.0 and parsed["delta"] == 1e-6
    assert Path(parsed["ledger-path"]).is_absolute()


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"epsilon_budget": 0.0}, "--epsilon-budget must be in range (0, inf)"),
        ({"epsilon_budget": float("inf")}, "--epsilon-budget"),
        ({"delta": 1.0}, "--delta must be in range (0, 1)"),
        ({"superlink": "127.0.0.1"}, "--superlink '127.0.0.1' must look like HOST:PORT"),
        ({"superlink": "host:70000"}, "port in [1, 65535]"),
        ({"key": None}, "--key is required"),
        ({"certs": None}, "--certs is required"),
        ({"key": Path("/nonexistent/site.key")}, "--key '/nonexistent/site.key' does not exist"),
        ({"ledger": Path("/nonexistent/dir/l.db")}, "folder '/nonexistent/dir' does not exist"),
        ({"data": Path('/tmp/a"b')}, "double quote"),
    ],
)
def test_deploy_site_options_refused_with_the_flag_named(bundle, tmp_path, change, needle):
    with pytest.raises(ConfigError) as exc:
        supernode_command(_site(bundle, tmp_path, **change))
    assert needle in str(exc.value)


def test_deploy_world_readable_key_is_refused(bundle, tmp_path):
    key = tmp_path / "loose.key"
    key.write_bytes(bundle.node_keys[0].read_bytes())
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        supernode_command(_site(bundle, tmp_path, key=key))


def test_deploy_insecure_only_explicit_and_warns(bundle, tmp_path):
    with pytest.warns(InsecureDeploymentWarning, match="NOT encrypted"):
        cmd = superlink_command(SuperLinkOptions(None, tmp_path / "s.db", insecure=True))
    assert "--insecure" in cmd and "--enable-supernode-auth" in cmd
    with pytest.raises(ConfigError, match="--certs is required"):
        superlink_command(SuperLinkOptions(None, tmp_path / "s.db"))
    with pytest.warns(InsecureDeploymentWarning):
        cmd = supernode_command(_site(bundle, tmp_path, insecure=True, certs=None))
    assert "--insecure" in cmd and "--root-certificates" not in cmd


def test_deploy_flower_env_disables_telemetry_and_uv_sync():
    env = flower.flower_env({"PATH": "/usr/bin", "FLWR_TELEMETRY_ENABLED": "1"})
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)


# --------------------------------------------------------------------------- connections


def test_deploy_connection_is_merged_into_flwr_config(bundle, tmp_path):
    home = tmp_path / "flwr"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "mine"\n\n[superlink.mine]\naddress = "10.0.0.1:9092"\n'
    )
    path = write_connection(
        "fedfuse", address="127.0.0.1:9092", root_certificates=bundle.ca_cert, home=home
    )
    import tomllib

    data = tomllib.loads(path.read_text())
    assert data["superlink"]["default"] == "mine"  # the user's default is kept
    assert data["superlink"]["mine"]["address"] == "10.0.0.1:9092"
    conn = parse_superlink_connection(data["superlink"]["fedfuse"], "fedfuse")
    assert conn.address == "127.0.0.1:9092"
    assert conn.root_certificates == str(bundle.ca_cert.resolve())
    assert not conn.insecure


def test_deploy_new_flwr_config_keeps_flowers_local_connection(bundle, tmp_path):
    import tomllib

    path = write_connection(
        "fedfuse", address="127.0.0.1:9092", root_certificates=bundle.ca_cert, home=tmp_path
    )
    data = tomllib.loads(path.read_text())
    assert data["superlink"]["local"]["address"] == ":local:"
    assert set(data["superlink"]) >= {"fedfuse", "local", "default"}


class _TlsServer:
    """A real TLS server on 127.0.0.1 presenting ``cert``/``key`` (handshakes, then closes)."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                with self.ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self.sock.close()


def test_deploy_wait_for_superlink_verifies_ca_and_host(bundle, tmp_path):
    server = _TlsServer(bundle.server_cert, bundle.server_key)
    try:
        wait_for_superlink(f"127.0.0.1:{server.port}", ca_cert=bundle.ca_cert, timeout=10)
        other = make_certs(tmp_path / "other", server_host="localhost", sites=0)
        with pytest.raises(ConfigError, match="does not vouch for"):
            wait_for_superlink(f"127.0.0.1:{server.port}", ca_cert=other.ca_cert, timeout=10)
    finally:
        server.close()
    with pytest.raises(ConfigError, match="no SuperLink answered"):
        wait_for_superlink(f"127.0.0.1:{free_port()}", ca_cert=bundle.ca_cert, timeout=1)


# --------------------------------------------------------------------------- CLI


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedfuse.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(ROOT),
            "HOME": str(cwd),
            "FLWR_HOME": str(cwd / "flwr"),
        },
    )


def test_deploy_cli_site_run_checks_data_first_and_prints_the_command(bundle, tmp_path, synth_root):
    site = synth_root / "site-0"
    ok = _cli(
        "site", "run", "--superlink", "127.0.0.1:9092", "--data", str(site),
        "--ledger", str(tmp_path / "s0.ledger"), "--epsilon-budget", "4",
        "--certs", str(bundle.root), "--key", str(bundle.node_keys[0]), "--dry-run",
        cwd=tmp_path,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "records, all valid" in ok.stdout
    assert "flower-supernode --superlink 127.0.0.1:9092 --root-certificates" in ok.stdout
    bad = tmp_path / "bad-site"
    bad.mkdir()
    (bad / "manifest.csv").write_text("id,image,label\n1,missing.png,pneumonia\n")
    res = _cli(
        "site", "run", "--superlink", "127.0.0.1:9092", "--data", str(bad),
        "--ledger", str(tmp_path / "s0.ledger"), "--epsilon-budget", "4",
        "--certs", str(bundle.root), "--key", str(bundle.node_keys[0]), "--dry-run",
        cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 1
    assert "missing.png" in res.stdout + res.stderr
    assert "flower-supernode" not in res.stdout


def test_deploy_cli_certs_and_server_run(tmp_path):
    res = _cli("certs", "--out", "c", "--server-host", "127.0.0.1", "--sites", "1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    again = _cli("certs", "--out", "c", "--server-host", "127.0.0.1", cwd=tmp_path)
    assert again.returncode == 2 and "--force" in again.stderr
    run = _cli("server", "run", "--certs", "c", "--database", "s.db", "--dry-run", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "--enable-supernode-auth" in run.stdout and "--insecure" not in run.stdout
    insecure = _cli("server", "run", "--insecure", "--dry-run", cwd=tmp_path)
    assert insecure.returncode == 0 and "WARNING" in insecure.stderr
    assert "NOT encrypted" in insecure.stderr


def test_deploy_no_warning_on_secure_path(bundle, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        superlink_command(SuperLinkOptions(bundle.root, tmp_path / "s.db"))
        supernode_command(_site(bundle, tmp_path))
