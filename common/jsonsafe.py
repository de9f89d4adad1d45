"""Strict JSON for run files and reports: inf and nan (which JSON lacks) written as strings."""

from __future__ import annotations

import math
from typing import Any


def jsonable(x: Any) -> Any:
    """``x`` with every non-finite float replaced by "inf", "-inf" or "nan", recursively."""
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x
