"""Transfer learning on real sites: a frozen pretrained image encoder against training from scratch.

Run (from the repository, with the venv active):

    python -m bench.transfer --data ../shared/data/pathvqa-yesno --set classes=no,yes --text-only

No pretrained weights exist on this machine and nothing is downloaded, so the encoder is
pretrained here, by fedfuse's own code, on data that is no site's: the synthetic generator's
chest-X-ray-like images (common/data/synthetic.py, ``generate``, image only, its own seed),
supervised on their label (an opacity or none), non-private, with
``fedfuse.client.training.train_round``. Only the image encoder (``cnn``, set explicitly
in both (a) and (b), which therefore differ only in where the weights come from and what trains) is
saved, to a file identified by its SHA-256. A real deployment would use ImageNet or pathology
weights instead (README "Several modalities").

Variants, each a real ``fedfuse simulate`` run (Flower's simulation engine, SecAgg+ on, DP at
every site, ``--epsilon`` per site for the whole run, the plan's defaults plus ``--set``):

- ``scratch``: the image ``cnn`` trained from a random start (the default image encoder when
  this benchmark was written; the default is now ``pool``);
- ``frozen``: the pretrained ``cnn`` with ``image-freeze = head`` (the convolutional tower
  fixed; its projection and the rest of the model train);
- ``text-only`` (``--text-only``): ``modalities = report``.

Writes ``transfer.csv`` (one row per run: pooled test AUROC of the final model, wall seconds of
the run and per round, the per-round AUROC) and ``transfer.png`` into ``--out`` and prints a
table.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.real_data import copy_sites, plot_round_curves, run_federation
from fedfuse.client.training import train_round
from fedfuse.common.config import RunConfig
from fedfuse.common.data.dataset import load_site
from fedfuse.common.data.synthetic import generate
from fedfuse.common.metrics import evaluate
from fedfuse.common.models import build_model

FIELDS = [
    "variant",
    "epsilon",
    "seed",
    "auroc",
    "accuracy",
    "rounds",
    "seconds",
    "seconds_per_round",
    "round_auroc",
    "image_weights_sha256",
]


def pretrain_image_encoder(
    out: Path, *, image_size: int, embed_dim: int, records: int, epochs: int, seed: int
) -> tuple[Path, str, float]:
    """Pretrain the ``cnn`` image encoder on synthetic images (not a site's data).

    Returns the weights file, its SHA-256 and the encoder's AUROC on the synthetic test split.
    """
    sites = generate(
        out / "synthetic",
        sites=1,
        records=records,
        seed=seed,
        alpha=100.0,  # balanced labels
        image_size=64,
        modalities=("image",),
    )
    cfg = RunConfig(
        modalities="image",
        image_size=image_size,
        embed_dim=embed_dim,
        fusion="linear",
        batch_size=64,
        learning_rate=0.003,
        local_epochs=epochs,
        modality_dropout=0.0,
        seed=seed,
    )
    _, ds = load_site(sites[0], cfg)
    torch.manual_seed(seed)
    model = build_model(cfg)
    train_round(
        model, ds["train"], cfg=cfg, plan=None, history=[], seed=seed, device=torch.device("cpu")
    )
    auroc = float(evaluate(model, ds["test"], device=torch.device("cpu"))["auroc"])
    path = out / "cnn-synthetic-pretrained.pt"
    torch.save(model.encoders["image"].state_dict(), path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest(), auroc


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k, "") for k in FIELDS})
    return path


def plot(rows: list[dict[str, Any]], path: Path, *, title: str) -> Path:
    """Left: final pooled test AUROC per variant (mean, and each seed); right: AUROC per round."""
    from matplotlib import pyplot as plt

    from fedfuse.common import plots  # noqa: F401  (selects the headless backend)

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for i, v in enumerate(variants):
        vals = [float(r["auroc"]) for r in rows if r["variant"] == v]
        per_round = [float(r["seconds_per_round"]) for r in rows if r["variant"] == v]
        ax.bar(i, statistics.fmean(vals), color=f"C{i}")
        ax.plot([i] * len(vals), vals, "k.")
        ax.annotate(
            f"{statistics.fmean(vals):.3f}\n{statistics.fmean(per_round):.0f} s/round",
            (i, statistics.fmean(vals)),
            textcoords="offset points",
            xytext=(0, 4),
            ha="center",
            fontsize=8,
        )
    ax.set_xticks(range(len(variants)))
    ax.set_xticklabels(variants)
    low = min(float(r["auroc"]) for r in rows)
    ax.set_ylim(max(0.0, low - 0.1), 1.0)
    ax.set_ylabel("pooled test AUROC (final model)")
    ax.grid(alpha=0.3, axis="y")
    ax = axes[1]
    plot_round_curves(
        ax,
        {v: [r["round_auroc"] for r in rows if r["variant"] == v] for v in variants},
        ylabel="sites' test AUROC (server's figure)",
    )
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--data", type=Path, required=True, help="folder of site folders")
    ap.add_argument("--epsilon", type=float, default=8.0, help="per-site epsilon (whole run)")
    ap.add_argument("--seeds", default="0", help="comma list of seeds")
    ap.add_argument("--rounds", type=int, default=3, help="federated rounds")
    ap.add_argument("--text-only", action="store_true", help="also run modalities=report")
    ap.add_argument("--pretrain-records", type=int, default=2000)
    ap.add_argument("--pretrain-epochs", type=int, default=3)
    ap.add_argument("--pretrain-seed", type=int, default=1234)
    ap.add_argument("--set", action="append", default=[], help="run-config key=value for every run")
    ap.add_argument("--out", type=Path, default=Path("runs/transfer"), help="CSV/PNG folder")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    args.out.mkdir(parents=True, exist_ok=True)
    default = RunConfig()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedfuse-transfer-") as tmp:
        t0 = time.time()
        weights, sha, pre_auroc = pretrain_image_encoder(
            Path(tmp),
            image_size=default.image_size,
            embed_dim=default.embed_dim,
            records=args.pretrain_records,
            epochs=args.pretrain_epochs,
            seed=args.pretrain_seed,
        )
        print(
            f"pretrained cnn on {args.pretrain_records} synthetic images "
            f"(seed {args.pretrain_seed}, {args.pretrain_epochs} epochs, "
            f"{time.time() - t0:.0f} s): synthetic test AUROC {pre_auroc:.3f}, "
            f"SHA-256 {sha}",
            flush=True,
        )
        variants: dict[str, list[str]] = {
            "scratch": ["image-encoder=cnn"],
            "frozen": [
                "image-encoder=cnn",
                f"image-weights={weights}",
                f"image-weights-sha256={sha}",
                "image-freeze=head",
            ],
        }
        if args.text_only:
            variants["text-only"] = ["modalities=report"]
        for seed in seeds:
            for name, extra in variants.items():
                data = copy_sites(
                    args.data, Path(tmp) / f"sites-{name}-{seed}", train_records=None, seed=seed
                )
                run_args = argparse.Namespace(rounds=args.rounds, set=[*args.set, *extra])
                _, fed = run_federation(
                    data,
                    Path(tmp) / f"runs-{name}",
                    epsilon=args.epsilon,
                    seed=seed,
                    args=run_args,
                )
                row = {
                    "variant": name,
                    "epsilon": args.epsilon,
                    "seed": seed,
                    "auroc": round(float(fed["auroc"]), 4),
                    "accuracy": round(float(fed["accuracy"]), 4),
                    "rounds": fed["rounds"],
                    "seconds": fed["seconds"],
                    "seconds_per_round": round(fed["seconds"] / max(1, fed["rounds"]), 1),
                    "round_auroc": fed["round_auroc"],
                    "image_weights_sha256": sha if name == "frozen" else "",
                }
                rows.append(row)
                print(
                    f"seed {seed}, {name}: AUROC {row['auroc']:.4f}, {row['seconds']:.0f} s "
                    f"({row['seconds_per_round']:.0f} s/round), per round {row['round_auroc']}",
                    flush=True,
                )
                write_csv(rows, args.out / "transfer.csv")  # partial results survive a crash
    csv_path = write_csv(rows, args.out / "transfer.csv")
    eps = "no DP" if math.isinf(args.epsilon) else f"epsilon {args.epsilon:g}"
    png = plot(
        rows,
        args.out / "transfer.png",
        title=f"{args.data.name}, {eps}, {args.rounds} rounds, seeds {seeds}",
    )
    print(f"\n{'':<12}{'AUROC':>8}{'sd':>8}{'s/round':>9}{'runs':>6}")
    for v in dict.fromkeys(r["variant"] for r in rows):
        vals = [float(r["auroc"]) for r in rows if r["variant"] == v]
        sec = [float(r["seconds_per_round"]) for r in rows if r["variant"] == v]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        print(
            f"{v:<12}{statistics.fmean(vals):>8.3f}{sd:>8.3f}{statistics.fmean(sec):>9.1f}"
            f"{len(vals):>6}"
        )
    print(f"\nwrote {csv_path} and {png}")


if __name__ == "__main__":
    main()
