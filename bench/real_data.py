"""Utility on real site folders: private federations against the non-private ones and the ceiling.

Run (from the repository, with the venv active):

    python -m bench.real_data --data ../shared/data/pathvqa-yesno --set classes=no,yes
    python -m bench.real_data --data ../shared/data/pathvqa-yesno --set classes=no,yes \
        --train-records 300 --epsilons 8 --no-private-baseline   # "small hospitals"

For every seed it runs, each as a user would (the real ``fedfuse simulate`` command: Flower's
simulation engine, or with ``--engine inprocess`` the same apps without Ray; SecAgg+ on, the
defaults a user gets plus ``--set``):

- the non-private federation (``--epsilon inf``),
- the federation at each epsilon of ``--epsilons`` (each site's budget for the whole run),
- the project's own centralised, non-private baseline (the same model, trained on the pooled
  train splits; simulation only, real sites never pool data).

Every run gets a fresh copy of the site folders (a run writes each site's ledger and DP secret
into ``<site>/.fedfuse/``, and the data may be read-only). ``--train-records N`` keeps N training
records per site (seeded; test records are all kept), the small-hospital setting.

AUROC is the final global model's on the pooled test splits of all sites, the metric of the
centralised baseline. Each federated row also says where the sites trained (``device``: ``cpu``,
or ``cuda`` on a machine with a GPU) and the mean wall time of one local epoch
(``epoch_seconds``, the training loop alone), read from the sites' own logs. Writes
``real_data.csv`` (one row per run, with its per-round curve) and ``real_data.png`` (AUROC
against epsilon with error bars and the centralised ceiling; the federation's per-round test
AUROC and training loss) into ``--out``, and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedfuse.common.config import RunConfig
from fedfuse.simulations.baseline import centralised_baseline, pooled_test_metrics

FIELDS = [
    "variant",
    "epsilon",
    "seed",
    "train_records",
    "auroc",
    "accuracy",
    "loss",
    "max_epsilon",
    "rounds",
    "seconds",
    "device",
    "epoch_seconds",
    "round_auroc",
    "round_train_loss",
]


def copy_sites(src: Path, dst: Path, *, train_records: int | None, seed: int) -> Path:
    """Copy every site folder of ``src`` into ``dst`` (without any ``.fedfuse/`` state).

    With ``train_records``, each site's manifest keeps that many of its training rows (a seeded
    choice) and every other row.
    """
    dst.mkdir(parents=True)
    for site in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")):
        shutil.copytree(site, dst / site.name, ignore=shutil.ignore_patterns(".fedfuse"))
        if train_records is None:
            continue
        manifest = dst / site.name / "manifest.csv"
        with open(manifest, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            fields = list(reader.fieldnames or [])
            rows = list(reader)
        train = [i for i, r in enumerate(rows) if r.get("split", "train") == "train"]
        rng = random.Random(f"{seed}/{site.name}")
        keep = set(rng.sample(train, min(train_records, len(train))))
        drop = set(train) - keep
        with open(manifest, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(r for i, r in enumerate(rows) if i not in drop)
    return dst


def fedfuse_command() -> list[str]:
    """The installed ``fedfuse`` command of this interpreter's environment."""
    exe = Path(sys.executable).parent / "fedfuse"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("fedfuse")
    if not found:
        sys.exit("bench/real_data.py: the `fedfuse` command is not installed (run `make setup`)")
    return [found]


def run_federation(
    data: Path, out: Path, *, epsilon: float, seed: int, args: argparse.Namespace
) -> tuple[Path, dict[str, Any]]:
    """One ``fedfuse simulate`` run; returns its run directory and its row of figures."""
    name = f"eps{epsilon:g}-seed{seed}"
    cmd = [
        *fedfuse_command(),
        "simulate",
        "--data",
        str(data),
        "--epsilon",
        "inf" if math.isinf(epsilon) else f"{epsilon:g}",
        "--seed",
        str(seed),
        "--out",
        str(out),
        "--run-name",
        name,
    ]
    if args.rounds:
        cmd += ["--rounds", str(args.rounds)]
    if args.engine != "simulation":
        cmd += ["--engine", args.engine]
    for kv in args.set:
        cmd += ["--set", kv]
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.time() - t0
    run_dir = out / name
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-15:])
        sys.exit(f"bench/real_data.py: `{' '.join(cmd)}` failed (exit {res.returncode}):\n{tail}")
    cfg = RunConfig.from_mapping(json.loads((run_dir / "config.json").read_text()))
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    pooled = pooled_test_metrics(cfg, run_dir / "model.pt")
    eps = rounds[-1].get("max-epsilon") if rounds else None
    row = {
        "variant": "federated",
        "epsilon": epsilon,
        "seed": seed,
        "auroc": pooled["auroc"],
        "accuracy": pooled["accuracy"],
        "loss": pooled["loss"],
        "max_epsilon": math.inf if eps in (None, "inf") else float(eps),
        "rounds": len(rounds),
        "seconds": round(seconds, 1),
        "round_auroc": " ".join(f"{_num(r.get('eval-auroc')):.4f}" for r in rounds),
        "round_train_loss": " ".join(f"{x:.4f}" for x in site_train_loss(data, name)),
        **site_epoch_time(data, name, epochs=cfg.local_epochs),
    }
    return run_dir, row


def site_train_loss(data: Path, run_id: str) -> list[float]:
    """The sites' mean training loss after each round of run ``run_id``. Training loss does not
    leave a site; each keeps it in ``<site>/.fedfuse/train.jsonl``, which a simulation can read."""
    per_round: dict[int, list[float]] = {}
    for log in sorted(data.glob("*/.fedfuse/train.jsonl")):
        for line in log.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row.get("run-id") == run_id and row.get("train-loss") is not None:
                per_round.setdefault(int(row["round"]), []).append(float(row["train-loss"]))
    return [statistics.fmean(v) for _, v in sorted(per_round.items())]


def site_epoch_time(data: Path, run_id: str, *, epochs: int) -> dict[str, Any]:
    """Where the sites of run ``run_id`` trained (``cpu``, ``cuda``) and the mean wall time of
    one local epoch, over sites and rounds: from each site's own ``train.jsonl`` (the training
    loop alone, as ``client/training.py`` times it; nothing of it leaves a site)."""
    devices: set[str] = set()
    seconds: list[float] = []
    for log in sorted(data.glob("*/.fedfuse/train.jsonl")):
        for line in log.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row.get("run-id") != run_id:
                continue
            if row.get("device"):
                devices.add(str(row["device"]))
            if row.get("train-seconds") is not None:
                seconds.append(float(row["train-seconds"]) / max(epochs, 1))
    return {
        "device": "+".join(sorted(devices)),
        "epoch_seconds": round(statistics.fmean(seconds), 3) if seconds else "",
    }


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k, "") for k in FIELDS})
    return path


def summarise(rows: list[dict[str, Any]]) -> list[tuple[str, float, float, int]]:
    """(label, mean AUROC, standard deviation, runs) per variant and epsilon, in run order."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        eps = float(r["epsilon"])
        if r["variant"] == "centralised":
            label = "centralised, non-private"
        else:
            label = "federated, no DP" if math.isinf(eps) else f"federated, epsilon {eps:g}"
        groups.setdefault(label, []).append(float(r["auroc"]))
    return [
        (k, statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
        for k, v in groups.items()
    ]


def plot(rows: list[dict[str, Any]], path: Path, *, title: str) -> Path:
    """Left: AUROC against epsilon (mean and standard deviation over seeds) with the centralised
    ceiling; middle and right: the federation's per-round test AUROC and training loss (mean over
    seeds, one line per epsilon)."""
    from matplotlib import pyplot as plt

    from fedfuse.common import plots  # noqa: F401  (selects the headless backend)

    fed = [r for r in rows if r["variant"] == "federated"]
    eps_values = sorted({float(r["epsilon"]) for r in fed})
    finite = [e for e in eps_values if math.isfinite(e)]
    inf_x = max(finite) * 2 if finite else 1.0  # "no DP" one step right of the largest epsilon
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ax = axes[0]
    xs, means, sds, lows = [], [], [], []
    for e in eps_values:
        vals = [float(r["auroc"]) for r in fed if float(r["epsilon"]) == e]
        xs.append(e if math.isfinite(e) else inf_x)
        means.append(statistics.fmean(vals))
        sds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
        lows.append(min(vals))
    ax.errorbar(xs, means, yerr=sds, fmt="o-", capsize=4, label="federated (DP at each site)")
    for x, m in zip(xs, means, strict=True):
        ax.annotate(f"{m:.3f}", (x, m), textcoords="offset points", xytext=(0, 8), ha="center")
    base = [float(r["auroc"]) for r in rows if r["variant"] == "centralised"]
    if base:
        ax.axhline(statistics.fmean(base), color="green", ls="--", label="centralised, no DP")
        lows.append(min(base))
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{e:g}" if math.isfinite(e) else "no DP" for e in eps_values])
    ax.set_ylim(max(0.0, min(lows) - 0.05), 1.0)
    ax.set_xlabel("epsilon per site (whole run)")
    ax.set_ylabel("pooled test AUROC")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    for ax, key, ylabel in (
        (axes[1], "round_auroc", "sites' test AUROC (server's figure)"),
        (axes[2], "round_train_loss", "sites' mean training loss (kept at the sites)"),
    ):
        groups = {
            "no DP" if math.isinf(e) else f"epsilon {e:g}": [
                r[key] for r in fed if float(r["epsilon"]) == e
            ]
            for e in eps_values
        }
        plot_round_curves(ax, groups, ylabel=ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_round_curves(ax: Any, groups: dict[str, list[str]], *, ylabel: str) -> None:
    """One line per group on ``ax``: the mean over its runs of a per-round figure, each run's
    given as the CSV's space-separated string (runs of different lengths are cut to the
    shortest); a group with no figures is left out."""
    from matplotlib.ticker import MaxNLocator

    for i, (label, texts) in enumerate(groups.items()):
        curves = [c for c in ([float(x) for x in str(t).split()] for t in texts) if c]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        mean = [statistics.fmean(c[j] for c in curves) for j in range(n)]
        ax.plot(range(1, n + 1), mean, "o-", color=f"C{i}", label=label)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--data", type=Path, required=True, help="folder of site folders")
    ap.add_argument("--epsilons", default="8,2,1", help="comma list of per-site epsilons")
    ap.add_argument("--seeds", default="0,1,2", help="comma list of seeds")
    ap.add_argument("--rounds", type=int, default=0, help="federated rounds (0: the defaults')")
    ap.add_argument(
        "--train-records", type=int, default=None, help="keep this many train records per site"
    )
    ap.add_argument(
        "--no-private-baseline",
        action="store_true",
        help="skip the non-private federation and the centralised baseline",
    )
    ap.add_argument("--set", action="append", default=[], help="run-config key=value for every run")
    ap.add_argument(
        "--engine",
        choices=["simulation", "inprocess"],
        default="simulation",
        help="fedfuse simulate --engine: Flower's (Ray) or in this process, sites in turn",
    )
    ap.add_argument("--out", type=Path, default=Path("runs/real_data"), help="CSV/PNG folder")
    args = ap.parse_args(argv)
    epsilons = [float(e) for e in args.epsilons.split(",") if e]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    variants: list[float] = ([] if args.no_private_baseline else [math.inf]) + epsilons
    if not variants:
        ap.error("nothing to run: give --epsilons or drop --no-private-baseline")
    args.out.mkdir(parents=True, exist_ok=True)
    total = len(seeds) * (len(variants) + (0 if args.no_private_baseline else 1))
    rows: list[dict[str, Any]] = []
    started = time.time()
    done = 0

    def progress(what: str) -> None:
        elapsed = time.time() - started
        left = elapsed / done * (total - done) if done else math.nan
        eta = f", about {left / 60:.0f} min left" if math.isfinite(left) else ""
        print(f"[{done}/{total}, {elapsed / 60:.1f} min{eta}] {what}", flush=True)

    with tempfile.TemporaryDirectory(prefix="fedfuse-real-") as tmp:
        for seed in seeds:
            run_cfg: RunConfig | None = None
            for eps in variants:
                data = copy_sites(
                    args.data,
                    Path(tmp) / f"sites-{seed}-{eps:g}",
                    train_records=args.train_records,
                    seed=seed,
                )
                run_dir, row = run_federation(
                    data, Path(tmp) / "runs", epsilon=eps, seed=seed, args=args
                )
                row["train_records"] = args.train_records or ""
                rows.append(row)
                if math.isinf(eps):
                    run_cfg = RunConfig.from_mapping(
                        json.loads((run_dir / "config.json").read_text())
                    )
                done += 1
                progress(
                    f"seed {seed}, {'no DP' if math.isinf(eps) else f'epsilon {eps:g}'}: "
                    f"AUROC {row['auroc']:.4f} ({row['seconds']:.0f} s; per round "
                    f"{row['round_auroc']}; train loss {row['round_train_loss']})"
                )
                write_csv(rows, args.out / "real_data.csv")  # partial results survive a crash
            if run_cfg is not None:
                # The same model and recipe, non-private, on the pooled train splits.
                base = centralised_baseline(run_cfg.replace(data_dir=str(data), seed=seed))
                rows.append(
                    {
                        "variant": "centralised",
                        "epsilon": math.inf,
                        "seed": seed,
                        "train_records": args.train_records or "",
                        "auroc": base["auroc"],
                        "accuracy": base["accuracy"],
                        "loss": base["loss"],
                        "max_epsilon": math.inf,
                        "seconds": round(base["seconds"], 1),
                    }
                )
                done += 1
                progress(f"seed {seed}, centralised baseline: AUROC {base['auroc']:.4f}")
                write_csv(rows, args.out / "real_data.csv")
    csv_path = write_csv(rows, args.out / "real_data.csv")
    size = f", {args.train_records} train records per site" if args.train_records else ""
    png = plot(rows, args.out / "real_data.png", title=f"{args.data.name}{size}, seeds {seeds}")
    print(f"\n{'':<28}{'AUROC':>8}{'sd':>8}{'runs':>6}")
    for label, mean, sd, n in summarise(rows):
        print(f"{label:<28}{mean:>8.3f}{sd:>8.3f}{n:>6}")
    print(f"\nwrote {csv_path} and {png}")


if __name__ == "__main__":
    main()
