"""A fixed hashing tokenizer: text to ids with no vocabulary learned from site data.

A vocabulary built from a site's reports would itself leak words of private reports (rare names,
places), and it would differ between sites. Hashing words and word n-grams into a fixed number of
buckets needs no fitting, is identical in every process, and keeps negations ("no fever") as
features of their own through the bigrams.
"""

from __future__ import annotations

import re
import zlib

import torch

_WORD = re.compile(r"[a-z0-9]+")
PAD_ID = 0


class HashingTokenizer:
    """Stateless text -> fixed-length id tensor.

    Ids are in ``[1, num_buckets)``; ``0`` is padding. CRC32 is used rather than Python's
    ``hash`` because the latter is salted per process (PYTHONHASHSEED).

    Args:
        num_buckets: size of the id space (the text encoder's embedding rows).
        max_tokens: output length; longer texts are truncated, shorter ones padded.
        ngrams: the longest word n-gram emitted: 1 words only, 2 also bigrams, 3 also trigrams.
            Ids come in order of n (all words, then all bigrams, ...), so truncation drops the
            longest n-grams first.
    """

    def __init__(self, *, num_buckets: int, max_tokens: int, ngrams: int = 2) -> None:
        if num_buckets < 2:
            raise ValueError(f"num_buckets must be >= 2; found {num_buckets}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1; found {max_tokens}")
        if not 1 <= ngrams <= 3:
            raise ValueError(f"ngrams must be 1, 2 or 3; found {ngrams}")
        self.num_buckets = num_buckets
        self.max_tokens = max_tokens
        self.ngrams = ngrams

    def _bucket(self, token: str) -> int:
        return 1 + zlib.crc32(token.encode("utf-8")) % (self.num_buckets - 1)

    def ids(self, text: str) -> list[int]:
        words = _WORD.findall(text.lower())
        out = [self._bucket(w) for w in words]
        for n in range(2, self.ngrams + 1):
            grams = zip(*(words[i:] for i in range(n)), strict=False)
            out += [self._bucket("_".join(gram)) for gram in grams]
        return out[: self.max_tokens]

    def __call__(self, text: str) -> torch.Tensor:
        ids = self.ids(text)
        padded = ids + [PAD_ID] * (self.max_tokens - len(ids))
        return torch.tensor(padded, dtype=torch.long)
