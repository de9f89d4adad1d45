"""TLS certificates for the SuperLink and SuperNode authentication keys, made with `cryptography`.

One folder holds everything a small federation needs::

    ca.crt ca.key                     certificate authority (ca.key never leaves the coordinator)
    superlink.crt superlink.key       the SuperLink's TLS certificate, signed by the CA
    superexec.secret                  shared secret of the SuperLink and a separate ServerApp
                                      container (process isolation, docker/compose.yml)
    supernodes/site-0.key (.pub) ...  one ECDSA P-384 key pair per site, OpenSSH format
    supernodes/site-0-runtime.crt/.key  TLS for the SuperNode's own Runtime API, where a
                                      separate ClientApp container connects (names
                                      localhost, 127.0.0.1, ::1, supernode-0)

Flower's SuperNode authentication accepts only EC keys on NIST curves (it checks this in
``flwr supernode register``); P-384 is the strongest of them that every OpenSSH reads.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedfuse.common.errors import ConfigError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "superlink.crt"
SERVER_KEY = "superlink.key"
SUPEREXEC_SECRET = "superexec.secret"
NODE_DIR = "supernodes"
# Always in the SuperLink certificate: a SuperLink on this machine is reachable by these names.
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
CA_DAYS = 3650
# Browsers cap server certificates at 825 days; gRPC does not, but short-lived is safer.
SERVER_DAYS = 825


@dataclass(frozen=True)
class CertBundle:
    """Where :func:`make_certs` wrote each file."""

    root: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    superexec_secret: Path
    node_keys: tuple[Path, ...]

    @property
    def node_public_keys(self) -> tuple[Path, ...]:
        return tuple(public_key_path(p) for p in self.node_keys)

    def runtime_cert(self, site: int) -> Path:
        return self.root / NODE_DIR / f"{site_key_name(site)}-runtime.crt"

    def runtime_key(self, site: int) -> Path:
        return self.root / NODE_DIR / f"{site_key_name(site)}-runtime.key"

    def all_files(self) -> list[Path]:
        files = [self.ca_cert, self.ca_key, self.server_cert, self.server_key]
        files.append(self.superexec_secret)
        for i, k in enumerate(self.node_keys):
            files += [k, public_key_path(k), self.runtime_cert(i), self.runtime_key(i)]
        return files


def supernode_host(index: int) -> str:
    """The SuperNode's host name in docker/compose.yml (its Runtime API certificate names it)."""
    return f"supernode-{index}"


def site_key_name(index: int) -> str:
    """The key name of site ``index``: ``site-0``, ... (the synthetic data's folder names)."""
    return f"site-{index}"


def public_key_path(private_key: Path) -> Path:
    return private_key.with_suffix(".pub")


def bundle_paths(out: Path, sites: int) -> CertBundle:
    nodes = tuple(out / NODE_DIR / f"{site_key_name(i)}.key" for i in range(sites))
    return CertBundle(
        root=out,
        ca_cert=out / CA_CERT,
        ca_key=out / CA_KEY,
        server_cert=out / SERVER_CERT,
        server_key=out / SERVER_KEY,
        superexec_secret=out / SUPEREXEC_SECRET,
        node_keys=nodes,
    )


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Write ``data``; a private key is created 0600 from the start (never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)  # os.open's mode is filtered by the umask


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _check_host(host: str) -> None:
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    ok = (
        bool(host)
        and len(host) <= 253
        and all(
            0 < len(lab) <= 63 and lab.replace("-", "").isalnum() and not lab.startswith("-")
            for lab in labels
        )
    )
    if not ok:
        raise ConfigError(
            f"--server-host '{host}' is neither an IP address nor a DNS name; give the name or "
            "address the sites will use to reach the SuperLink (e.g. superlink.example.org)"
        )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedfuse"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(
    *, now: dt.datetime, days: int = CA_DAYS
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name("fedfuse federation CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    *,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: list[str],
    now: dt.datetime,
    days: int = SERVER_DAYS,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate valid for every name in ``hosts`` (IPs become IP SANs)."""
    key = ec.generate_private_key(ec.SECP384R1())
    unique = list(dict.fromkeys(hosts))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(unique[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in unique]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_node_key(comment: str) -> tuple[bytes, bytes]:
    """An ECDSA P-384 key pair as (OpenSSH private key, ``ecdsa-sha2-nistp384 ... comment``)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + f" {comment}\n".encode()


def make_certs(out: str | Path, *, server_host: str, sites: int, force: bool = False) -> CertBundle:
    """Write a CA, a SuperLink certificate and ``sites`` SuperNode key pairs under ``out``.

    The SuperLink certificate names ``localhost``, ``127.0.0.1``, ``::1`` and ``server_host``.
    Refuses (ConfigError) to replace any existing file unless ``force``: overwriting a CA or a
    site key silently would lock every site out of the federation.
    """
    if sites < 0:
        raise ConfigError(f"--sites must be an integer >= 0; found {sites}")
    _check_host(server_host)
    paths = bundle_paths(Path(out), sites)
    existing = [str(p) for p in paths.all_files() if p.exists()]
    if existing and not force:
        raise ConfigError(
            f"{len(existing)} file(s) already exist, e.g. {existing[0]}; refusing to overwrite "
            "keys (sites registered with them would be locked out). Use another --out, or "
            "--force to replace them all"
        )
    now = dt.datetime.now(dt.UTC)
    ca_key, ca_cert = make_ca(now=now)
    srv_key, srv_cert = make_server_cert(
        ca_key=ca_key, ca_cert=ca_cert, hosts=[*LOCAL_NAMES, server_host], now=now
    )
    _write(paths.ca_key, _pem_key(ca_key), private=True)
    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(paths.server_key, _pem_key(srv_key), private=True)
    _write(paths.server_cert, srv_cert.public_bytes(serialization.Encoding.PEM), private=False)
    # 32 random bytes as hex: Flower reads the file's exact bytes, and text survives copying.
    _write(paths.superexec_secret, secrets.token_hex(32).encode(), private=True)
    for i, key_path in enumerate(paths.node_keys):
        private, public = make_node_key(f"fedfuse-{site_key_name(i)}")
        _write(key_path, private, private=True)
        _write(public_key_path(key_path), public, private=False)
        rt_key, rt_cert = make_server_cert(
            ca_key=ca_key, ca_cert=ca_cert, hosts=[*LOCAL_NAMES, supernode_host(i)], now=now
        )
        _write(paths.runtime_key(i), _pem_key(rt_key), private=True)
        _write(
            paths.runtime_cert(i), rt_cert.public_bytes(serialization.Encoding.PEM), private=False
        )
    return paths
