"""Ledger benchmark: what the privacy ledger costs a site per round, and an audit per entry.

    python -m bench.ledger                     # 3 runs x 10 rounds, then audit
    python -m bench.ledger --runs 10 --rounds 10

Prints: seconds per append (chain verify + PRV over every earlier event + insert, in one
transaction) as the ledger grows; verify and audit time; two processes appending at once
(entries per second, all present, chain intact); and PRV over many rounds with and without
merging identical events (what keeps the append cheap).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from fedfuse.common.privacy.accounting import DpSgdEvent, epsilon_from_events  # noqa: E402
from fedfuse.common.privacy.ledger import Ledger  # noqa: E402
from fedfuse.common.privacy.ledger_audit import audit  # noqa: E402

_WRITER = """
import sys
from fedfuse.common.privacy.accounting import DpSgdEvent
from fedfuse.common.privacy.ledger import Ledger
led = Ledger(sys.argv[1])
for r in range(1, int(sys.argv[3]) + 1):
    led.append(site="s", run_id=sys.argv[2], run_name=sys.argv[2], round=r,
               event=DpSgdEvent(1.1, 0.05, 60), max_grad_norm=1.0, delta=1e-5,
               epsilon_budget=float("inf"), model_hash="m")
"""


def _append(led: Ledger, run: int, rnd: int) -> float:
    t = time.perf_counter()
    led.append(
        site="s",
        run_id=str(run),
        run_name=f"run-{run}",
        round=rnd,
        # Each run plans its own noise: one distinct (sigma, q) per run, as at a real site.
        event=DpSgdEvent(1.0 + 0.1 * run, 0.05, 60),
        max_grad_norm=1.0,
        delta=1e-5,
        epsilon_budget=float("inf"),
        model_hash="m" * 64,
    )
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--concurrent", type=int, default=10, help="appends per process")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    tmp = Path(tempfile.mkdtemp(prefix="fedfuse-bench-ledger-"))

    led = Ledger(tmp / "ledger.sqlite")
    print(f"append (verify + PRV over all earlier events + insert), {args.rounds} rounds per run")
    for run in range(args.runs):
        times = [_append(led, run, r) for r in range(1, args.rounds + 1)]
        print(
            f"  run {run + 1}: entries {run * args.rounds + 1}-{(run + 1) * args.rounds}: "
            f"mean {sum(times) / len(times):.3f} s, max {max(times):.3f} s"
        )
    n = args.runs * args.rounds
    t = time.perf_counter()
    assert led.verify().ok
    print(f"verify chain of {n} entries: {time.perf_counter() - t:.4f} s")
    t = time.perf_counter()
    report = audit(led.path)
    dt = time.perf_counter() - t
    print(f"audit of {n} entries (PRV + RDP per entry): {dt:.2f} s ({dt / n:.3f} s per entry)")
    assert report.exit_code == 0

    path = tmp / "concurrent.sqlite"
    Ledger(path)
    t = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), run, str(args.concurrent)],
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        )
        for run in ("A", "B")
    ]
    for p in procs:
        p.wait()
    dt = time.perf_counter() - t
    entries = Ledger(path).entries()
    print(
        f"two processes x {args.concurrent} appends: {len(entries)} entries present, chain "
        f"{'intact' if Ledger(path).verify().ok else 'BROKEN'}, {dt:.1f} s wall incl. start-up"
    )

    events = [DpSgdEvent(1.1, 0.05, 60)] * 20
    t = time.perf_counter()
    merged = epsilon_from_events(events, delta=1e-5)
    t_merged = time.perf_counter() - t
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [e.as_opacus() for e in events]
    t = time.perf_counter()
    unmerged = acc.get_epsilon(delta=1e-5)
    t_unmerged = time.perf_counter() - t
    print(
        f"PRV over 20 identical rounds: merged {t_merged:.2f} s (eps {merged:.4f}), "
        f"unmerged {t_unmerged:.2f} s (eps {unmerged:.4f})"
    )


if __name__ == "__main__":
    main()
