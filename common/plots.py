"""Pictures people would rather look at than read: learning and privacy-budget curves."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: sites and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

# Above this many sites one line per site is unreadable: draw the median and range instead,
# and label only the sites that spent most.
MAX_SITE_LINES = 12
TOP_SITES = 3

# The test figures beside AUROC (sensitivity/specificity once the run records them): a model
# stuck at the majority class has a high accuracy and a sensitivity of 0, whatever its AUROC.
SCORES = (
    ("eval-auroc", "AUROC", "o-"),
    ("eval-accuracy", "accuracy", "s-"),
    ("eval-sensitivity", "sensitivity", "^-"),
    ("eval-specificity", "specificity", "v-"),
)


def _finite(x: object) -> float:
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def _fit(values: Sequence[float], *, low: float, high: float, margin: float = 0.05):
    """Axis limits that show every finite value (within [low, high]) with a margin; [low,
    high] (or [low, low + 1] for an open bound) when nothing is drawn, e.g. a run that stopped
    before any round finished."""
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return low, high if math.isfinite(high) else low + 1.0
    lo, hi = min(vals), max(vals)
    pad = max(margin, (hi - lo) * 0.1)
    return max(low, lo - pad), min(high, hi + pad)


def run_title(run_id: str, rounds: Sequence[Mapping], *, target_epsilon: float | None) -> str:
    """``run <id>: epsilon <spent> of <target>`` (the largest epsilon any site reported), and the
    client-level epsilon where the server added client-level noise."""
    spent = [_finite(r.get("max-epsilon")) for r in rounds]
    spent = [e for e in spent if not math.isnan(e)]
    client = client_level_history(rounds)
    if target_epsilon is None or math.isinf(target_epsilon):
        eps = "no DP"
    elif spent:
        eps = f"epsilon {max(spent):.3g} of {target_epsilon:g}"
    elif client:
        eps = "no record-level DP"  # dp-level client: the sites train without DP-SGD
    else:
        eps = f"epsilon target {target_epsilon:g}"
    if client:
        eps += f", client-level epsilon {client[-1][1]:.3g}"
    return f"run {run_id}: {eps}"


def client_level_history(rounds: Sequence[Mapping]) -> list[tuple[int, float]]:
    """The run's client-level epsilon after each round (every site's, the same for all): from
    server-side client-level DP (``client-dp``) or distributed DP (``distributed-dp``)."""
    out = []
    for r in rounds:
        record = r.get("client-dp") or r.get("distributed-dp") or {}
        eps = _finite(record.get("epsilon"))
        if not math.isnan(eps):
            out.append((int(r["round"]), eps))
    return out


def learning_curve_figure(rounds: Sequence[Mapping], *, title: str = "") -> Figure:
    """Test AUROC, accuracy (sensitivity, specificity where recorded) and losses per round."""
    xs = [r["round"] for r in rounds]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.5, 3.8))
    shown: list[float] = [0.5]
    for key, label, style in SCORES:
        ys = [_finite(r.get(key)) for r in rounds]
        if all(math.isnan(y) for y in ys):
            continue
        ax1.plot(xs, ys, style, label=f"test {label}", ms=4)
        shown += ys
    ax1.set_ylim(*_fit(shown, low=0.0, high=1.0))
    ax1.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax1.set_xlabel("round")
    ax1.set_ylabel("test score")
    _legend(ax1, loc="best")
    losses: list[float] = []
    for key, label, style in (("train-loss", "train loss", "o-"), ("eval-loss", "test loss", "s-")):
        ys = [_finite(r.get(key)) for r in rounds]
        if all(math.isnan(y) for y in ys):
            continue  # train loss stays at the sites unless they share it
        ax2.plot(xs, ys, style, label=label, ms=4)
        losses += ys
    ax2.set_ylim(*_fit(losses, low=0.0, high=math.inf))
    ax2.set_xlabel("round")
    ax2.set_ylabel("loss")
    _legend(ax2, loc="best")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def learning_curve(rounds: Sequence[Mapping], path: Path, *, title: str = "") -> Path:
    """Draw :func:`learning_curve_figure` into ``path``."""
    return _save(learning_curve_figure(rounds, title=title), path)


def epsilon_history(rounds: Sequence[Mapping]) -> dict[str, list[tuple[int, float]]]:
    """Each site's cumulative epsilon at the rounds it took part in (a site not sampled in a
    round has no point there: it spent nothing)."""
    per_site: dict[str, list[tuple[int, float]]] = {}
    for rec in rounds:
        for name, s in rec.get("sites", {}).items():
            if "epsilon" in s:
                per_site.setdefault(name, []).append((int(rec["round"]), float(s["epsilon"])))
    return per_site


def site_budgets(rounds: Sequence[Mapping]) -> dict[str, float]:
    """The lifetime budget of each site that shares it (node config ``share-site-metrics``)."""
    out: dict[str, float] = {}
    for rec in rounds:
        for name, s in rec.get("sites", {}).items():
            b = _finite(s.get("epsilon-budget"))
            if not math.isnan(b):
                out[name] = b
    return out


def _stepped(points: Sequence[tuple[int, float]], last_round: int) -> tuple[list, list]:
    """A site's spend as a step curve from round 0 to ``last_round``: flat where it was not
    sampled (it spent nothing there), rising only at rounds it trained."""
    xs, ys = [0], [0.0]
    for r, e in points:
        xs.append(r)
        ys.append(_finite(e))
    if xs[-1] < last_round:
        xs.append(last_round)
        ys.append(ys[-1])
    return xs, ys


def _at(points: Sequence[tuple[int, float]], r: int) -> float:
    """A site's cumulative epsilon after round ``r`` (0 before its first round)."""
    spent = 0.0
    for rr, e in points:
        if rr <= r and not math.isnan(_finite(e)):
            spent = float(e)
    return spent


def epsilon_figure(
    per_site: Mapping[str, Sequence[tuple[int, float]]],
    *,
    budget: float | None = None,
    site_budget: Mapping[str, float] | None = None,
    title: str = "privacy spent per site",
) -> Figure:
    """Cumulative epsilon against rounds with the run's target and each site's own budget.

    Up to :data:`MAX_SITE_LINES` sites: one step curve per site. More: the median and the
    range (min to max) over all sites per round, and the :data:`TOP_SITES` that spent most.
    """
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    last = max((p[0] for pts in per_site.values() for p in pts), default=1)
    top = 0.0
    finals = {n: _at(pts, last) for n, pts in per_site.items()}
    if len(per_site) <= MAX_SITE_LINES:
        for name in sorted(per_site):
            xs, ys = _stepped(per_site[name], last)
            ax.step(xs, ys, where="post", label=name, lw=1.2)
            ax.plot(
                xs[1 : len(per_site[name]) + 1],
                ys[1 : len(per_site[name]) + 1],
                "o",
                ms=3,
                color=ax.lines[-1].get_color(),
            )
        top = max([top, *finals.values()])
    else:
        rs = list(range(0, last + 1))
        grid = [[_at(pts, r) for pts in per_site.values()] for r in rs]
        med = [sorted(g)[len(g) // 2] for g in grid]
        ax.fill_between(
            rs,
            [min(g) for g in grid],
            [max(g) for g in grid],
            step="post",
            alpha=0.25,
            label=f"range over {len(per_site)} sites",
        )
        ax.step(rs, med, where="post", color="black", lw=1.5, label="median site")
        for name in sorted(finals, key=lambda n: (-finals[n], n))[:TOP_SITES]:
            xs, ys = _stepped(per_site[name], last)
            ax.step(xs, ys, where="post", lw=1, ls="--", label=f"{name} (spent most)")
        top = max([top, *finals.values()])
    if budget is not None and math.isfinite(budget):
        ax.axhline(budget, color="red", ls="--", lw=1, label=f"run target {budget:g}")
        top = max(top, budget)
    for value in sorted(set((site_budget or {}).values())):
        names = sorted(n for n, b in (site_budget or {}).items() if b == value)
        if not math.isfinite(value):
            continue
        who = ", ".join(names) if len(names) <= 3 else f"{len(names)} sites"
        ax.axhline(value, color="darkred", ls=":", lw=1, label=f"budget {value:g} ({who})")
        top = max(top, value)
    ax.set_ylim(0, top * 1.08 if top > 0 else 1.0)
    ax.set_xlim(0, max(last, 1) + 0.3)  # the last step stays visible
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon (cumulative)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def epsilon_curves(
    per_site: Mapping[str, Sequence[tuple[int, float]]],
    path: Path,
    *,
    budget: float | None = None,
    site_budget: Mapping[str, float] | None = None,
    title: str = "privacy spent per site",
) -> Path:
    """Draw :func:`epsilon_figure` into ``path``."""
    fig = epsilon_figure(per_site, budget=budget, site_budget=site_budget, title=title)
    return _save(fig, path)


def _legend(ax: plt.Axes, **kwargs: object) -> None:
    """A legend when something is drawn (a run with no evaluated round has nothing to label)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, **kwargs)  # type: ignore[arg-type]


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
