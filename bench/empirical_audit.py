"""Figures for the empirical privacy audit: time, bounds and guess accuracy per setting.

Runs the default audit (DP at epsilon 2), the control (no DP), both with white-box scores, each a
real Flower simulation, and the planted bug (noise dropped, epsilon still reported; planted by
tests/support/faults.py in an in-process federation, since production code has no switch for it),
and prints one table. For each run it also prints, from the saved scores, what other splits of the
200 guesses into "in"/"out" would have given -- exploration only: an audit must fix its split
before it looks at which canaries were included, as ``fedfuse audit empirical`` does.

    python -m bench.empirical_audit [--out DIR] [--seed N] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import time
from pathlib import Path

import numpy as np  # noqa: E402

from fedfuse.common.privacy.empirical import audit_from_scores  # noqa: E402
from fedfuse.simulations.empirical_audit import AuditSettings, run_empirical_audit  # noqa: E402
from fedfuse.simulations.runner import federate_in_process  # noqa: E402
from tests.support.faults import noise_dropped  # noqa: E402

SETTINGS = {
    "dp-eps2": {"epsilon": 2.0},
    "no-dp": {"epsilon": math.inf},
    "dp-eps2-white": {"epsilon": 2.0, "white_box": True},
    "no-dp-white": {"epsilon": math.inf, "white_box": True},
    "bug-eps2": {"epsilon": 2.0, "fault": True},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-audit"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", choices=sorted(SETTINGS), default=None)
    args = ap.parse_args()
    rows = []
    for name in args.only or SETTINGS:
        spec = dict(SETTINGS[name])
        fault = spec.pop("fault", False)
        with noise_dropped() if fault else contextlib.nullcontext():
            t0 = time.time()
            res = run_empirical_audit(
                AuditSettings(out=args.out / f"{name}-s{args.seed}", seed=args.seed, **spec),
                federate=federate_in_process if fault else None,
            )
            wall = time.time() - t0
        a = res.audit
        alt = _other_splits(args.out / f"{name}-s{args.seed}" / "canaries.csv", res)
        rows.append((name, res.claimed_epsilon, a.lower_bound, a.correct, a.guesses, wall, alt))
        print(
            f"{name}: claim {res.claimed_epsilon:.3f} lower bound {a.lower_bound:.3f} "
            f"({a.correct}/{a.guesses} right) verdict {res.verdict} in {wall:.1f} s "
            f"(training {res.train_seconds:.1f} s); other splits {alt}",
            flush=True,
        )
    print()
    print(
        "| setting | claimed epsilon | lower bound | correct / guesses | wall time | "
        "bound with 100 in + 100 out | with 200 in |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, claim, lb, v, r, wall, alt in rows:
        print(
            f"| {name} | {claim:.3f} | {lb:.3f} | {v} / {r} | {wall:.0f} s | "
            f"{alt['100/100']:.3f} | {alt['200/0']:.3f} |"
        )


def _other_splits(path: Path, res) -> dict[str, float]:  # noqa: ANN001
    with open(path, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    scores = np.array([float(r["score"]) for r in rows])
    included = np.array([r["included"] == "1" for r in rows])
    out = {}
    for k_pos, k_neg in ((100, 100), (200, 0)):
        a = audit_from_scores(scores, included, k_pos=k_pos, k_neg=k_neg, delta=res.settings.delta)
        out[f"{k_pos}/{k_neg}"] = round(a.lower_bound, 3)
    return out


if __name__ == "__main__":
    main()
