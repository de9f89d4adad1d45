"""The site's secret: where a round's DP randomness (noise, Poisson sampling, dropout) comes from.

DP-SGD protects a record only while the coordinator cannot predict the noise or the batches. So
a round's random seed is an HMAC-SHA256, keyed with a secret that never leaves the site
(``<data>/.fedfuse/dp-secret``, 32 random bytes, created on first use with mode 0600), of
everything the server sent that shapes the update: the global model, the run config, the round,
the privacy plan. Two consequences:

* The server cannot regenerate the noise (it does not know the key), so it cannot subtract it.
* Any change the server makes to what it sends (another model, another learning rate) draws
  fresh, independent randomness; only an exact replay repeats the reply, which tells the server
  nothing new. Noise is never reused on different inputs, so no two replies can be differenced
  to cancel it. (The ledger still counts every attempt.)

Synthetic sites (``fedfuse data synth``) get a secret derived from the generator's public seed so
that simulations are reproducible; their data is synthetic, so nothing is lost. A real site's
secret is random; keep it with the data and never copy it to the coordinator.

The seed drives torch's generators (Mersenne Twister on CPU, Philox on CUDA), which are not
cryptographic -- the same standard as Opacus without ``secure_mode``. So a deployed site draws its
DP-SGD noise and Poisson batches from a ChaCha20 keystream under a fresh random key instead
(common/privacy/secure_rng.py; Opacus' ``secure_mode`` needs ``torchcsprng``, which has no build
for the pinned torch); the keyed seed still drives its modality dropout, and all of a
simulation's randomness, which must be reproducible.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedfuse.common.errors import SiteSecretError
from fedfuse.common.site_state import secret_file

SECRET_BYTES = 32


def secret_path(data_path: Path) -> Path:
    return secret_file(data_path)


def load_or_create_secret(data_path: Path) -> bytes:
    """The site's secret; 32 random bytes written (0600, atomically) the first time."""
    return load_or_create_secret_file(secret_path(data_path))


def load_or_create_secret_file(path: Path) -> bytes:
    """The secret in ``path``; 32 random bytes written (0600, atomically) the first time."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_exclusive(path, os.urandom(SECRET_BYTES))
    return _read(path)


def existing_secret(secret_file: Path) -> bytes | None:
    """The secret in ``secret_file`` if there is one (an audit never creates one)."""
    return _read(secret_file) if secret_file.exists() else None


def ledger_key(secret: bytes) -> bytes:
    """The key of the site's authenticated ledger head (common/privacy/anchor.py): derived,
    so that the secret itself keys only the round seeds."""
    return hmac.new(secret, b"fedfuse-ledger-head-v1", hashlib.sha256).digest()


def write_synthetic_secret(data_path: Path, *, seed: int, site: str) -> Path:
    """A secret derived from a PUBLIC seed: for synthetic sites only (reproducible runs)."""
    path = secret_path(data_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    value = hashlib.sha256(f"fedfuse-synthetic-site-secret|{seed}|{site}".encode()).digest()
    path.unlink(missing_ok=True)
    _write_exclusive(path, value)
    return path


def round_seed(secret: bytes, inputs: Mapping[str, Any]) -> int:
    """A 63-bit seed: HMAC-SHA256(secret, canonical JSON of ``inputs``)."""
    if len(secret) < 16:
        raise SiteSecretError("the site secret is shorter than 16 bytes")
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    digest = hmac.new(secret, canonical.encode(), hashlib.sha256).digest()
    # Keep room for the +1/+2 offsets of the noise and dropout streams below 2**63.
    return int.from_bytes(digest[:8], "big") >> 2


def _write_exclusive(path: Path, value: bytes) -> None:
    """Write ``value`` to ``path`` unless it exists; never leaves a partly written file there."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(value)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic, and fails if another process made it first
        except FileExistsError:
            pass  # use theirs
    finally:
        tmp.unlink(missing_ok=True)


def _read(path: Path) -> bytes:
    try:
        value = path.read_bytes()
    except OSError as e:
        raise SiteSecretError(f"{path}: cannot read the site's DP secret ({e})") from e
    if len(value) != SECRET_BYTES:
        raise SiteSecretError(
            f"{path}: the site's DP secret must be {SECRET_BYTES} bytes, found {len(value)}; "
            "delete the file to have a new random one made (only between runs)"
        )
    return value
