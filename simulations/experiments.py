"""Experiment sweeps over simulated federations, written as CSV and drawn as PNG.

- utility vs epsilon: test AUROC of the final global model for each epsilon (inf = no DP) and
  seed, beside the centralised non-private baseline (the ceiling). ``auroc`` is measured on the
  pooled test splits of all sites for both (the same metric); ``sites_auroc`` is the
  federation's own report (mean of the sites' AUROCs, each on its own split);
- fusion: each fusion head (and, where the model supports it, each single modality).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedfuse.common.config import RunConfig
from fedfuse.common.data.manifest import csv_safe
from fedfuse.common.models import FUSION_HEADS
from fedfuse.simulations.baseline import centralised_baseline, pooled_test_metrics
from fedfuse.simulations.runner import simulate

Progress = Callable[[str], None]
FIELDS = [
    "experiment",
    "variant",
    "epsilon",
    "seed",
    "auroc",
    "sites_auroc",
    "loss",
    "accuracy",
    "max_epsilon",
    "seconds",
    "run_dir",
]


def _final(run_dir: Path, cfg: RunConfig, num_sites: int | None) -> dict[str, Any]:
    """The final global model's pooled-test metrics (as the baseline's), and the run's own."""
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = rounds[-1]
    eps = last.get("max-epsilon")
    pooled = pooled_test_metrics(cfg, run_dir / "model.pt", num_sites=num_sites)
    return {
        "auroc": pooled["auroc"],
        "sites_auroc": last.get("eval-auroc"),
        "loss": pooled["loss"],
        "accuracy": pooled["accuracy"],
        "max_epsilon": math.inf if eps in (None, "inf") else eps,
        "seconds": sum(r.get("seconds", 0) for r in rounds),
    }


def time_left(run_seconds: Sequence[float], runs_left: int) -> str:
    """What is left of a sweep, from the runs done so far (their mean wall time)."""
    if runs_left <= 0:
        return "done"
    if not run_seconds:
        return "estimate after the first run"
    left = statistics.fmean(run_seconds) * runs_left
    return f"about {left / 60:.0f} min left" if left >= 90 else f"about {left:.0f} s left"


class _Runs:
    """Counts a sweep's runs and says ``run N of M`` with an estimate of what is left."""

    def __init__(self, total: int, progress: Progress) -> None:
        self.total, self.progress = total, progress
        self.seconds: list[float] = []
        self._t0 = 0.0

    def start(self, what: str) -> None:
        n = len(self.seconds) + 1
        left = time_left(self.seconds, self.total - n + 1)
        self.progress(f"run {n} of {self.total}: {what} ({left})")
        self._t0 = time.monotonic()

    def done(self) -> None:
        self.seconds.append(time.monotonic() - self._t0)


def _write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            # Run names and config values come from users: no cell may run as a formula.
            w.writerow({k: csv_safe(r.get(k, "")) for k in FIELDS})
    return path


def utility_vs_epsilon(
    cfg: RunConfig,
    *,
    num_sites: int,
    epsilons: Sequence[float] = (1, 2, 4, 8, math.inf),
    seeds: Sequence[int] = (0, 1, 2),
    out: Path,
    progress: Progress = print,
) -> Path:
    """Run every (epsilon, seed); write ``utility_vs_epsilon.csv`` and ``.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    runs = _Runs(len(seeds) * (len(epsilons) + 1), progress)
    for seed in seeds:
        runs.start(f"centralised baseline, seed {seed}")
        base = centralised_baseline(cfg.replace(seed=seed), num_sites=num_sites)
        rows.append(
            {
                "experiment": "utility-vs-epsilon",
                "variant": "centralised",
                "epsilon": math.inf,
                "seed": seed,
                **base,
                "max_epsilon": math.inf,
                "run_dir": "",
            }
        )
        runs.done()
        progress(f"centralised baseline, seed {seed}: AUROC {base['auroc']:.4f}")
        for eps in epsilons:
            name = f"eps{eps:g}-seed{seed}"
            run_cfg = cfg.replace(
                target_epsilon=float(eps), seed=seed, out_dir=str(out / "runs"), run_name=name
            )
            runs.start(f"epsilon {eps:g}, seed {seed}")
            run_dir = simulate(run_cfg, num_sites=num_sites)
            res = _final(run_dir, run_cfg, num_sites)
            runs.done()
            rows.append(
                {
                    "experiment": "utility-vs-epsilon",
                    "variant": "federated",
                    "epsilon": float(eps),
                    "seed": seed,
                    **res,
                    "run_dir": str(run_dir),
                }
            )
            progress(f"epsilon {eps:g}, seed {seed}: AUROC {res['auroc']:.4f}")
            _write_csv(rows, out / "utility_vs_epsilon.csv")  # partial results survive a crash
    csv_path = _write_csv(rows, out / "utility_vs_epsilon.csv")
    plot_utility_vs_epsilon(rows, out / "utility_vs_epsilon.png")
    return csv_path


def plot_utility_vs_epsilon(rows: list[dict[str, Any]], path: Path) -> Path:
    # lazy: matplotlib takes a second and writes its cache under $HOME when imported; only the
    # plots need it (common/plots.py selects the headless backend)
    import matplotlib.pyplot as plt

    from fedfuse.common import plots  # noqa: F401

    fed = [r for r in rows if r["variant"] == "federated"]
    eps_values = sorted({float(r["epsilon"]) for r in fed})
    finite = [e for e in eps_values if math.isfinite(e)]
    # inf is drawn one step right of the largest finite epsilon, labelled "no DP"
    inf_x = (max(finite) * 2) if finite else 1.0
    xs, means, sds = [], [], []
    for e in eps_values:
        vals = [float(r["auroc"]) for r in fed if float(r["epsilon"]) == e]
        xs.append(e if math.isfinite(e) else inf_x)
        means.append(statistics.fmean(vals))
        sds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.errorbar(xs, means, yerr=sds, fmt="o-", capsize=4, label="federated (DP at each site)")
    base = [float(r["auroc"]) for r in rows if r["variant"] == "centralised"]
    if base:
        ax.axhline(
            statistics.fmean(base),
            color="green",
            ls="--",
            label="centralised, non-private (ceiling)",
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{e:g}" if math.isfinite(e) else "no DP" for e in eps_values])
    ax.set_xlabel("epsilon per site (whole run)")
    ax.set_ylabel("test AUROC")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fusion_variants() -> list[tuple[str, dict[str, Any]]]:
    """One variant per registered fusion head, plus single-modality variants when the run
    config can select modalities."""
    variants = [(f"fusion:{h}", {"fusion": h}) for h in FUSION_HEADS.names()]
    if "modalities" in RunConfig().to_mapping():
        default_mods = RunConfig().to_mapping()["modalities"].split(",")
        variants += [(f"only:{m}", {"modalities": m}) for m in default_mods]
    return variants


def fusion_comparison(
    cfg: RunConfig,
    *,
    num_sites: int,
    seeds: Sequence[int] = (0,),
    variants: Sequence[tuple[str, dict[str, Any]]] | None = None,
    out: Path,
    progress: Progress = print,
) -> Path:
    """Run each fusion variant; write ``fusion.csv`` and ``fusion.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    chosen = list(variants or fusion_variants())
    runs = _Runs(len(chosen) * len(seeds), progress)
    for name, overrides in chosen:
        for seed in seeds:
            run_cfg = RunConfig.from_mapping(
                {
                    **cfg.to_mapping(),
                    **overrides,
                    "seed": seed,
                    "out-dir": str(out / "runs"),
                    "run-name": f"{name.replace(':', '-')}-seed{seed}",
                }
            )
            runs.start(f"{name}, seed {seed}")
            res = _final(simulate(run_cfg, num_sites=num_sites), run_cfg, num_sites)
            runs.done()
            rows.append(
                {
                    "experiment": "fusion",
                    "variant": name,
                    "epsilon": run_cfg.target_epsilon,
                    "seed": seed,
                    **res,
                }
            )
            progress(f"{name}, seed {seed}: AUROC {res['auroc']:.4f}")
            _write_csv(rows, out / "fusion.csv")
    csv_path = _write_csv(rows, out / "fusion.csv")
    plot_fusion(rows, out / "fusion.png")
    return csv_path


def plot_fusion(rows: list[dict[str, Any]], path: Path) -> Path:
    # lazy: matplotlib takes a second and writes its cache under $HOME when imported; only the
    # plots need it (common/plots.py selects the headless backend)
    import matplotlib.pyplot as plt

    from fedfuse.common import plots  # noqa: F401

    names = list(dict.fromkeys(r["variant"] for r in rows))
    means = [statistics.fmean(float(r["auroc"]) for r in rows if r["variant"] == n) for n in names]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names)), 3.6))
    ax.bar(names, means, color=["C0" if n.startswith("fusion") else "C7" for n in names])
    for i, m in enumerate(means):
        ax.text(i, m + 0.01, f"{m:.3f}", ha="center", fontsize=8)
    ax.set_ylim(0.4, 1.0)
    ax.set_ylabel("test AUROC")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
