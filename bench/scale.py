"""Scale benchmark: many virtual sites, a sample of them per round, DP on, small model.

    python -m bench.scale                  # 100 sites x 3 rounds, 10 per round
    python -m bench.scale --sites 1000 --fraction 0.01 --records 20

Prints wall time, seconds per round and per site-round, and the peak resident memory of the
whole process tree (driver + Ray workers).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench._procmem import PeakMemory  # noqa: E402
from fedfuse.common.config import RunConfig  # noqa: E402
from fedfuse.simulations.runner import simulate  # noqa: E402
from fedfuse.simulations.scenarios import DataSpec, ensure_data  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fraction", type=float, default=0.1, help="sites sampled per round")
    ap.add_argument("--records", type=int, default=60, help="records per site")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-scale"))
    args = ap.parse_args()

    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    t0 = time.time()
    data = ensure_data(DataSpec(sites=args.sites, records=args.records), seed=0)
    t_data = time.time() - t0
    per_round = max(2, round(args.sites * args.fraction))
    cfg = RunConfig(
        data_dir=str(data),
        out_dir=str(args.out),
        run_name=f"scale-{args.sites}-{int(t0)}",
        num_rounds=args.rounds,
        fraction_train=args.fraction,
        fraction_evaluate=args.fraction,
        min_sites=per_round,
        local_epochs=1,
        batch_size=16,
        target_epsilon=args.epsilon,
    )
    t1 = time.time()
    with PeakMemory() as mem:
        run_dir = simulate(cfg, num_sites=args.sites)
    wall = time.time() - t1
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    site_rounds = sum(r.get("num-sites", 0) for r in rounds)
    print(
        f"sites {args.sites}, rounds {args.rounds}, sampled per round {per_round}, "
        f"records/site {args.records}, epsilon {args.epsilon:g}"
    )
    print(f"data generation            {t_data:8.1f} s (cached after the first run)")
    print(f"federation wall time       {wall:8.1f} s")
    for r in rounds:
        print(
            f"  round {r['round']}: {r['seconds']:6.1f} s, {r.get('num-sites')} sites, "
            f"test AUROC {r.get('eval-auroc')}, max epsilon {r.get('max-epsilon')}"
        )
    print(f"seconds per site-round     {wall / max(site_rounds, 1):8.2f}")
    print(f"peak RSS, process tree     {mem.peak_gib:8.2f} GiB")
    print(f"run directory              {run_dir}")


if __name__ == "__main__":
    main()
