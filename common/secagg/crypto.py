"""The key agreement and secret sharing of SecAgg+, from vetted libraries.

- Key pairs and agreement: X25519 (``cryptography``), HKDF-SHA256 over the shared secret as in
  Flower's ``generate_shared_key``, with a label per use so a pair's encryption key and mask seed
  differ. Flower's primitives use NIST P-384, whose key agreement costs about 10x more here
  (0.26 ms vs 0.024 ms, ``bench/secagg.py``); a round makes two per pair of neighbours.
- Shamir secret sharing: pycryptodome's ``Shamir`` (GF(2^128), 16-byte chunks), the library
  behind Flower's ``create_shares``/``combine_shares``, in Flower's share layout (4-byte index,
  then one 16-byte share per chunk). Flower's wrappers start a thread pool on every call, which
  costs more than the sharing of a 32-byte secret itself (2.9 ms vs 0.15 ms at 5 shares), and
  pad the secret, which adds a whole chunk to a 32-byte one. Every secret shared here (a mask
  seed, an X25519 private key) is exactly 32 bytes, so the chunks need no padding: two chunks
  instead of Flower's three, a third less work to share and to rebuild.
- Authenticated encryption of the shares stays Flower's (Fernet, ``symmetric_encryption``).
"""

from __future__ import annotations

import base64

from Crypto.Protocol.SecretSharing import Shamir
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32  # raw X25519 private and public keys
SECRET_BYTES = 32  # what is Shamir-shared: a mask seed or an X25519 private key
_CHUNK = 16

# HKDF labels: one key pair per use already, and the label keeps the two uses apart anyway.
ENCRYPTION = b"fedfuse.secagg+ share encryption"
MASK = b"fedfuse.secagg+ pairwise mask"


def generate_key_pair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw bytes: ``(private, public)``, 32 bytes each."""
    key = X25519PrivateKey.generate()
    return key.private_bytes_raw(), key.public_key().public_bytes_raw()


def public_key_of(private_key: bytes) -> bytes:
    """The public key of a raw private key."""
    return X25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes_raw()


# A fixed key to test public keys with: every X25519 scalar is a multiple of 8, so a point of
# small order gives the all-zero secret (cryptography raises) with this key as with any other.
_PROBE = X25519PrivateKey.from_private_bytes(bytes(range(KEY_BYTES)))


def is_public_key(value: object) -> bool:
    """Whether ``value`` is a usable X25519 public key: 32 bytes, not of small order."""
    if not isinstance(value, bytes) or len(value) != KEY_BYTES:
        return False
    try:
        _PROBE.exchange(X25519PublicKey.from_public_bytes(value))
    except ValueError:
        return False
    return True


def derive(private_key: bytes, public_key: bytes, label: bytes) -> bytes:
    """32 bytes both ends of a pair derive: HKDF-SHA256 over their X25519 shared secret.

    Raises ValueError for a public key that is malformed or of small order (the shared secret
    would be all zeros and known to anyone).
    """
    secret = X25519PrivateKey.from_private_bytes(private_key).exchange(
        X25519PublicKey.from_public_bytes(public_key)
    )
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(secret)


def encryption_key(private_key: bytes, public_key: bytes) -> bytes:
    """The Fernet key (url-safe base64) sealing the shares one site sends another."""
    return base64.urlsafe_b64encode(derive(private_key, public_key, ENCRYPTION))


def mask_seed(private_key: bytes, public_key: bytes) -> bytes:
    """The 32-byte seed of the pairwise mask two sites share."""
    return derive(private_key, public_key, MASK)


SHARE_BYTES = 4 + SECRET_BYTES  # index + one 16-byte share per chunk


def create_shares(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """``num`` Shamir shares of a 32-byte ``secret``, any ``threshold`` of which rebuild it."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secrets shared here are {SECRET_BYTES} bytes; got {len(secret)}")
    shares = [bytearray(i.to_bytes(4, "little")) for i in range(1, num + 1)]
    for start in range(0, SECRET_BYTES, _CHUNK):
        for idx, share in Shamir.split(threshold, num, secret[start : start + _CHUNK], ssss=False):
            shares[idx - 1] += share
    return [bytes(s) for s in shares]


def combine_shares(shares: list[bytes]) -> bytes:
    """The 32-byte secret behind ``shares`` (any ``threshold`` of them; fewer give garbage,
    which the caller detects: a seed's masks do not cancel, a key does not match its public
    key). ValueError for malformed or repeated shares."""
    if not shares or any(not isinstance(s, bytes) or len(s) != SHARE_BYTES for s in shares):
        raise ValueError(f"malformed Shamir shares: each must be {SHARE_BYTES} bytes")
    indexed = [(int.from_bytes(s[:4], "little"), s) for s in shares]
    if len({i for i, _ in indexed}) != len(indexed) or min(i for i, _ in indexed) < 1:
        raise ValueError("Shamir shares with repeated or zero indices")
    out = bytearray()
    for lo in range(4, SHARE_BYTES, _CHUNK):
        out += Shamir.combine([(i, s[lo : lo + _CHUNK]) for i, s in indexed], ssss=False)
    return bytes(out)
