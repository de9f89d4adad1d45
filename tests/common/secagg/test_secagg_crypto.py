"""The primitives of SecAgg+: key agreement and secret sharing (common/secagg/crypto.py),
stochastic quantisation (common/secagg/masking.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.quantization import quantize as flwr_quantize

from fedfuse.common.secagg import crypto, masking


def test_a_pair_agrees_on_its_keys_and_nobody_else_does() -> None:
    (sk_a, pk_a), (sk_b, pk_b), (sk_c, pk_c) = (crypto.generate_key_pair() for _ in range(3))
    assert crypto.public_key_of(sk_a) == pk_a and crypto.is_public_key(pk_a)
    assert crypto.mask_seed(sk_a, pk_b) == crypto.mask_seed(sk_b, pk_a)
    assert crypto.mask_seed(sk_a, pk_b) != crypto.mask_seed(sk_a, pk_c)
    # One pair, two uses, two different keys.
    assert crypto.encryption_key(sk_a, pk_b) != crypto.mask_seed(sk_a, pk_b)
    token = encrypt(crypto.encryption_key(sk_a, pk_b), b"share")
    assert decrypt(crypto.encryption_key(sk_b, pk_a), token) == b"share"


def test_a_small_order_public_key_is_refused() -> None:
    sk, _ = crypto.generate_key_pair()
    with pytest.raises(ValueError):
        crypto.mask_seed(sk, bytes(32))  # the all-zero point: the shared secret would be 0
    assert not crypto.is_public_key(bytes(32))  # refused where keys enter (setup, share-keys)
    assert not crypto.is_public_key((1).to_bytes(32, "little"))  # another small-order point
    assert not crypto.is_public_key(b"short") and crypto.is_public_key(
        crypto.generate_key_pair()[1]
    )


@pytest.mark.parametrize(("threshold", "num"), [(2, 3), (3, 5), (11, 20)])
def test_any_threshold_of_the_shares_rebuild_the_secret(threshold: int, num: int) -> None:
    secret = os.urandom(32)
    shares = crypto.create_shares(secret, threshold, num)
    assert len(shares) == num and all(len(s) == crypto.SHARE_BYTES for s in shares)
    assert len({s[:4] for s in shares}) == num
    assert crypto.combine_shares(shares[-threshold:]) == secret
    assert crypto.combine_shares(shares[::-1][:threshold]) == secret
    assert crypto.combine_shares(shares) == secret  # more than the threshold is fine too


def test_fewer_than_the_threshold_or_malformed_shares_do_not_rebuild_the_secret() -> None:
    secret = os.urandom(32)
    shares = crypto.create_shares(secret, 3, 5)
    assert crypto.combine_shares(shares[:2]) != secret
    for bad in ([], [b"short"], [shares[0], shares[1][:-16], shares[2]], [shares[0]] * 3):
        with pytest.raises(ValueError):
            crypto.combine_shares(bad)
    with pytest.raises(ValueError):
        crypto.create_shares(b"x" * 31, 2, 3)


def test_quantisation_is_flowers_map_rounded_without_bias() -> None:
    c, q = 8.0, 2**22
    step = 2 * c / q
    rng = np.random.default_rng(0)
    # Exactly on the grid: no rounding, the same integers as Flower's quantize.
    on_grid = (rng.integers(0, q + 1, 1000) * step - c).astype(np.float64)
    ours = masking.quantize(on_grid, c, q, rng)
    assert ours.dtype == np.uint32
    assert np.array_equal(ours, flwr_quantize([on_grid], c, q)[0].astype(np.uint32))
    # Between grid points: rounded up with probability the fraction, so the mean is exact.
    between = np.full(200_000, 0.3 * step)
    back = dequantize([masking.quantize(between, c, q, rng)], c, q)[0]
    assert set(np.unique(back - 0.3 * step).round(12)) <= {
        round(-0.3 * step, 12),
        round(0.7 * step, 12),
    }
    assert abs(back.mean() - 0.3 * step) < 0.01 * step
    # Beyond the clipping range: clipped to the ends, never past Q.
    assert masking.quantize(np.array([100.0, c, -c, -100.0]), c, q, rng).tolist() == [q, q, 0, 0]
