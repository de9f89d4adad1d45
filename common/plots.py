"""Pictures people would rather look at than read: learning and privacy-budget curves."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: sites and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _finite(x: object) -> float:
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def learning_curve(rounds: Sequence[Mapping], path: Path) -> Path:
    """Test AUROC and losses against rounds."""
    xs = [r["round"] for r in rounds]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.plot(xs, [_finite(r.get("eval-auroc")) for r in rounds], "o-", label="test AUROC")
    ax1.set_ylim(0.4, 1.0)
    ax1.set_xlabel("round")
    ax1.set_ylabel("AUROC")
    ax1.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax1.legend(loc="lower right")
    ax2.plot(xs, [_finite(r.get("train-loss")) for r in rounds], "o-", label="train loss")
    ax2.plot(xs, [_finite(r.get("eval-loss")) for r in rounds], "s-", label="test loss")
    ax2.set_xlabel("round")
    ax2.set_ylabel("loss")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def epsilon_curves(
    per_site: Mapping[str, Sequence[tuple[int, float]]],
    path: Path,
    *,
    budget: float | None = None,
    title: str = "privacy spent per site",
) -> Path:
    """Cumulative epsilon against rounds, one curve per site, with the budget line."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    top = 0.0
    for name, points in sorted(per_site.items()):
        # every curve starts at round 0 with nothing spent
        pts = [(0, 0.0), *points] if points and points[0][0] > 0 else list(points)
        ys = [_finite(p[1]) for p in pts]
        top = max([top, *[y for y in ys if not math.isnan(y)]])
        ax.plot([p[0] for p in pts], ys, "o-", label=name, ms=3)
    if budget is not None and math.isfinite(budget):
        ax.axhline(budget, color="red", ls="--", lw=1, label=f"budget {budget:g}")
        top = max(top, budget)
    ax.set_ylim(0, top * 1.08 if top > 0 else 1.0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon (cumulative)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(per_site) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
