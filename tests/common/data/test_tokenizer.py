import subprocess
import sys

import torch

from fedfuse.common.data.tokenizer import PAD_ID, HashingTokenizer

TEXT = "No evidence of consolidation. Patient denies fever; cough for 3 days."


def test_ids_are_deterministic_and_bounded():
    tok = HashingTokenizer(num_buckets=1024, max_tokens=64)
    a = tok(TEXT)
    assert a.dtype == torch.long and a.shape == (64,)
    ids = a[a != PAD_ID]
    assert len(ids) > 0 and int(ids.min()) >= 1 and int(ids.max()) < 1024
    # stateless: the same text gives the same ids, before and after other texts
    tok("completely different words here")
    assert torch.equal(tok(TEXT), a)
    assert torch.equal(HashingTokenizer(num_buckets=1024, max_tokens=64)(TEXT), a)


def test_same_ids_in_another_process():
    """Python's hash() is salted per process; the tokenizer must not depend on it."""
    tok = HashingTokenizer(num_buckets=1024, max_tokens=64)
    code = (
        "from fedfuse.common.data.tokenizer import HashingTokenizer;"
        f"print(HashingTokenizer(num_buckets=1024, max_tokens=64)({TEXT!r}).tolist())"
    )
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
            cwd=str(__import__("pathlib").Path(__file__).resolve().parents[3]),
        ).stdout
        assert eval(out) == tok(TEXT).tolist()


def test_negation_bigrams_and_truncation():
    tok = HashingTokenizer(num_buckets=4096, max_tokens=200)
    assert set(tok.ids("no fever")) != set(tok.ids("fever no"))  # bigram order matters
    short = HashingTokenizer(num_buckets=4096, max_tokens=3)
    assert short("a b c d e f").tolist() == short.ids("a b c")
    assert short("").tolist() == [PAD_ID] * 3


def test_trigrams_add_ids_after_the_bigrams():
    words = HashingTokenizer(num_buckets=4096, max_tokens=200, ngrams=1).ids("is fever present")
    bi = HashingTokenizer(num_buckets=4096, max_tokens=200, ngrams=2).ids("is fever present")
    tri = HashingTokenizer(num_buckets=4096, max_tokens=200, ngrams=3).ids("is fever present")
    assert len(words) == 3 and bi[:3] == words and len(bi) == 5
    assert tri[:5] == bi and len(tri) == 6
    # the trigram is its own feature: not any of the words' or bigrams' ids by construction
    assert tri[5] == HashingTokenizer(num_buckets=4096, max_tokens=200)._bucket("is_fever_present")
