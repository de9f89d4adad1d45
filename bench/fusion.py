"""Fusion heads vs single modalities on synthetic data: 3 sites, DP epsilon 8 per site.

Run:  PYTHONPATH=. python bench/fusion.py [--records 1000] [--rounds 4] [--seeds 0,1]
      [--learning-rate 0.03]

For each fusion head (all four modalities) and each single modality, runs a federation and
prints the final global model's AUROC on the pooled test splits of the three sites (as
``fedfuse experiment``: the mean of the sites' own AUROCs, each on a label-skewed split, is
noisier), on complete data and with 30% of records missing one modality. The federation is
the real one -- ``server.app.run_federation`` and the ClientApp (Opacus DP-SGD, whole-run
noise plan, ledger) -- over ``simulations.inprocess.InProcessGrid``: sites run one after
another in this process instead of in Ray workers, which fits a sweep of ~30 federations on
two shared cores. SecAgg+ is off (``--secagg`` turns it on): it changes who can see the
updates, not what is learned (up to its quantisation).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from client.app import app as client_app  # noqa: E402
from common.config import RunConfig  # noqa: E402
from common.data.synthetic import TABULAR_COLUMNS, TABULAR_RANGES, generate  # noqa: E402
from server.app import run_federation  # noqa: E402
from server.rundir import RunDirectory  # noqa: E402
from simulations.baseline import pooled_test_metrics  # noqa: E402
from simulations.inprocess import InProcessGrid  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("flwr").setLevel(logging.ERROR)
ALL = ("image", "report", "audio", "tabular")


def federate(cfg: RunConfig, data_dir: Path, out: Path, *, seed: int) -> float:
    """One federation over the site folders of ``data_dir``; the final test AUROC."""
    cfg = cfg.replace(seed=seed, data_dir=str(data_dir), out_dir=str(out))
    run_dir = RunDirectory(
        out, cfg, run_id=f"{cfg.fusion}-{cfg.modalities}-{seed}".replace(",", "+")
    )
    run_federation(InProcessGrid(client_app, 3, seed=seed), cfg, run_dir=run_dir)
    eps = json.loads((run_dir.path / "privacy.json").read_text())["sites"]
    assert all(float(s["epsilon"]) <= cfg.target_epsilon + 1e-6 for s in eps.values())
    return pooled_test_metrics(cfg, run_dir.path / "model.pt", num_sites=3)["auroc"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=600, help="records per site (average)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument(
        "--learning-rate", type=float, default=RunConfig.learning_rate, help="sites' Adam rate"
    )
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--seeds", default="0,1", help="federation seeds (data stays the same)")
    ap.add_argument("--missing-rate", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="comma list of rows to run (e.g. gated,image)")
    ap.add_argument("--secagg", action="store_true", help="aggregate with SecAgg+")
    ap.add_argument(
        "--work", default="", help="keep the generated sites here (reused by later calls)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    base = RunConfig(
        modalities=",".join(ALL),
        tabular_columns=",".join(TABULAR_COLUMNS),
        tabular_ranges=TABULAR_RANGES,
        num_rounds=args.rounds,
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        target_epsilon=args.epsilon,
        secagg=args.secagg,
        min_sites=3,
    )
    rows: list[tuple[str, RunConfig]] = [
        (f"{h} (all four)", base.replace(fusion=h))
        for h in ("concat", "gated", "attention", "late")
    ]
    rows += [(f"{m} only", base.replace(modalities=m, fusion="concat")) for m in ALL]
    if args.only:
        keep = args.only.split(",")
        rows = [r for r in rows if r[0].split()[0] in keep]
    print(
        f"3 sites x ~{args.records} records, rounds {args.rounds}, local epochs "
        f"{args.local_epochs}, batch {args.batch_size}, Adam {args.learning_rate}, "
        f"epsilon {args.epsilon} per site, "
        f"seeds {seeds}; final AUROC on the pooled test splits, mean ± half-range"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.work) / f"records-{args.records}" if args.work else Path(tmp)
        for name, rate in (("complete", 0.0), ("missing", args.missing_rate)):
            if (root / name).is_dir():
                continue  # generated by an earlier call with --work
            generate(
                root / name,
                sites=3,
                records=args.records,
                seed=11,
                modalities=ALL,
                missing_rate=rate,
            )
        print(
            f"\n{'model':<22}{'complete':>16}{f'{args.missing_rate:.0%} missing':>16}"
            f"{'diff':>8}{'s':>6}"
        )
        for name, cfg in rows:
            t0 = time.time()
            a = [federate(cfg, root / "complete", Path(tmp) / "runs", seed=s) for s in seeds]
            b = [federate(cfg, root / "missing", Path(tmp) / "runs-m", seed=s) for s in seeds]
            ma, mb = statistics.mean(a), statistics.mean(b)
            spread = lambda v: f"±{(max(v) - min(v)) / 2:.3f}" if len(v) > 1 else ""  # noqa: E731
            print(
                f"{name:<22}{ma:>10.3f}{spread(a):>6}{mb:>10.3f}{spread(b):>6}"
                f"{mb - ma:>+8.3f}{time.time() - t0:>6.0f}   per seed {a} / {b}",
                flush=True,
            )


if __name__ == "__main__":
    main()
