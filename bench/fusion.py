"""Fusion heads vs single modalities on synthetic data: 3 sites, DP epsilon 8 per site.

Run:  python -m bench.fusion [--records 1000] [--rounds 4] [--seeds 0,1]
      [--learning-rate 0.03] [--plot fusion.png]

For each fusion head (all four modalities) and each single modality, runs a federation and
prints the final global model's AUROC on the pooled test splits of the three sites (as
``fedfuse experiment``: the mean of the sites' own AUROCs, each on a label-skewed split, is
noisier), on complete data and with 30% of records missing one modality, and each run's last
rounds (the sites' mean test AUROC; ``--plot`` draws every round): a run still climbing at its
end is under-trained, and its number says where the last round landed. The federation is
the real one -- ``fedfuse.server.app.run_federation`` and the ClientApp (Opacus DP-SGD, whole-run
noise plan, ledger) -- over ``fedfuse.simulations.inprocess.InProcessGrid``: sites run one after
another in this process instead of in Ray workers, which fits a sweep of ~30 federations on
two shared cores. SecAgg+ is off (``--secagg`` turns it on): it changes who can see the
updates, not what is learned (up to its quantisation).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from fedfuse.client.app import app as client_app  # noqa: E402
from fedfuse.common.config import RunConfig  # noqa: E402
from fedfuse.common.data.synthetic import TABULAR_COLUMNS, TABULAR_RANGES, generate  # noqa: E402
from fedfuse.server.app import run_federation  # noqa: E402
from fedfuse.server.rundir import RunDirectory  # noqa: E402
from fedfuse.simulations.baseline import pooled_test_metrics  # noqa: E402
from fedfuse.simulations.inprocess import InProcessGrid  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("flwr").setLevel(logging.ERROR)
ALL = ("image", "report", "audio", "tabular")


class Federation(NamedTuple):
    """A finished federation: the final model's AUROC on the pooled test splits, and the
    sites' mean test AUROC after every round (is it still climbing at the end?)."""

    auroc: float
    curve: list[float]


def federate(cfg: RunConfig, data_dir: Path, out: Path, *, seed: int) -> Federation:
    """One federation over the site folders of ``data_dir``."""
    cfg = cfg.replace(seed=seed, data_dir=str(data_dir), out_dir=str(out))
    run_dir = RunDirectory(
        out, cfg, run_id=f"{cfg.fusion}-{cfg.modalities}-{seed}".replace(",", "+")
    )
    run_federation(InProcessGrid(client_app, 3, seed=seed), cfg, run_dir=run_dir)
    eps = json.loads((run_dir.path / "privacy.json").read_text())["sites"]
    assert all(float(s["epsilon"]) <= cfg.target_epsilon + 1e-6 for s in eps.values())
    auroc = pooled_test_metrics(cfg, run_dir.path / "model.pt", num_sites=3)["auroc"]
    return Federation(auroc, [float(r.get("eval-auroc", math.nan)) for r in run_dir.rounds])


def plot_curves(curves: dict[str, dict[str, list[float]]], path: Path) -> Path:
    """Per-round test AUROC: one panel per model; a colour per seed, dashed with missing data."""
    from matplotlib.ticker import MaxNLocator

    from fedfuse.common.plots import plt

    fig, axes = plt.subplots(
        1, len(curves), figsize=(3.2 * len(curves), 3.2), sharey=True, squeeze=False
    )
    low = 0.4
    for ax, (model, runs) in zip(axes[0], curves.items(), strict=True):
        seeds = sorted({label.rsplit(" ", 1)[-1] for label in runs})
        for label, ys in runs.items():
            colour = f"C{seeds.index(label.rsplit(' ', 1)[-1])}"
            style = "--" if label.startswith("missing") else "-"
            ax.plot(range(1, len(ys) + 1), ys, style, color=colour, label=label)
            low = min([low, *(y - 0.05 for y in ys if math.isfinite(y))])
        ax.set_title(model)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylim(max(low, 0.0), 1.0)
    axes[0][0].set_ylabel("sites' mean test AUROC")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    ap.add_argument("--plot", default="", help="draw every run's per-round AUROC to this PNG")
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
        curves: dict[str, dict[str, list[float]]] = {}
        for name, cfg in rows:
            t0 = time.time()
            fa = [federate(cfg, root / "complete", Path(tmp) / "runs", seed=s) for s in seeds]
            fb = [federate(cfg, root / "missing", Path(tmp) / "runs-m", seed=s) for s in seeds]
            a, b = [f.auroc for f in fa], [f.auroc for f in fb]
            ma, mb = statistics.mean(a), statistics.mean(b)
            spread = lambda v: f"±{(max(v) - min(v)) / 2:.3f}" if len(v) > 1 else ""  # noqa: E731
            print(
                f"{name:<22}{ma:>10.3f}{spread(a):>6}{mb:>10.3f}{spread(b):>6}"
                f"{mb - ma:>+8.3f}{time.time() - t0:>6.0f}   per seed {a} / {b}",
                flush=True,
            )
            # A run still climbing at its last rounds is under-trained: its number is where
            # the last round happened to land, not what the head can do.
            runs = {
                f"{d} seed {s}": f.curve
                for d, fs in (("complete", fa), ("missing", fb))
                for s, f in zip(seeds, fs, strict=True)
            }
            for label, ys in runs.items():
                tail = ", ".join(f"{y:.3f}" for y in ys[-4:])
                print(f"{'':<4}{label:<20}last rounds {tail}", flush=True)
            curves[name] = runs
        if args.plot:
            print(f"per-round AUROC: {plot_curves(curves, Path(args.plot))}")


if __name__ == "__main__":
    main()
