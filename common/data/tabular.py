"""Tabular values (``tab.<name>`` columns) -> a fixed-size, scaled vector with missing-value flags.

Scaling uses either fixed ranges from the run config or, in non-private runs only, the mean and
standard deviation of the site's own train split. Under DP a fitted statistic is refused: one
record would move every other record's scaled features, so DP-SGD's per-record sensitivity
would not hold and the statistic itself would be released outside epsilon. Fitted statistics
stay in the site's dataset object: never part of the model state or of any message.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from fedfuse.common.config import tabular_ranges_required
from fedfuse.common.errors import ConfigError

# Scaled values are clipped: one extreme lab value must not dominate a record's gradient.
CLIP = 5.0


@dataclass(frozen=True)
class TabularScaler:
    """Per-column ``(value - center) / scale``; the input vector is ``[values, observed]``.

    ``observed`` flags (1 = the record has this value) let the model tell "missing" from
    "average": a missing value is encoded as 0 with flag 0.
    """

    columns: tuple[str, ...]
    center: tuple[float, ...]
    scale: tuple[float, ...]

    @property
    def dim(self) -> int:
        return 2 * len(self.columns)

    @classmethod
    def fit(
        cls,
        rows: Iterable[Mapping[str, float]],
        *,
        columns: tuple[str, ...],
        ranges: Mapping[str, tuple[float, float]] | None = None,
        private: bool,
    ) -> TabularScaler:
        """Fixed ranges where given (mapped to [-1, 1]); site-local mean/std elsewhere, which
        ``private`` (a DP run) refuses with :class:`ConfigError`."""
        ranges = ranges or {}
        unranged = [c for c in columns if c not in ranges]
        if private and unranged:
            raise ConfigError(tabular_ranges_required(unranged))
        rows = list(rows)
        center, scale = [], []
        for c in columns:
            if c in ranges:
                lo, hi = ranges[c]
                center.append((lo + hi) / 2)
                scale.append((hi - lo) / 2)
                continue
            vals = [r[c] for r in rows if c in r]
            if not vals:  # the site has no value of this column: everything will be "missing"
                center.append(0.0)
                scale.append(1.0)
                continue
            mean = math.fsum(vals) / len(vals)
            center.append(mean)
            if len(vals) < 2:  # no spread to estimate: scale relative to the value itself
                scale.append(max(1.0, abs(mean)))
                continue
            var = math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
            # Floor: a constant column must not divide by ~0.
            scale.append(max(math.sqrt(var), 1e-6 * max(1.0, abs(mean))))
        return cls(tuple(columns), tuple(center), tuple(scale))

    def __call__(self, values: Mapping[str, float]) -> torch.Tensor:
        out = torch.zeros(self.dim, dtype=torch.float32)
        k = len(self.columns)
        for i, (c, m, s) in enumerate(zip(self.columns, self.center, self.scale, strict=True)):
            if c in values:
                out[i] = max(-CLIP, min(CLIP, (values[c] - m) / s))
                out[k + i] = 1.0
        return out

    def present(self, values: Mapping[str, float]) -> bool:
        """A record has the tabular modality when it has at least one of the model's columns."""
        return any(c in values for c in self.columns)
