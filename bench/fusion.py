"""Fusion heads vs single modalities on synthetic data: 3 sites, DP epsilon 8 per site.

Run:  PYTHONPATH=. python bench/fusion.py [--records 600] [--rounds 4] [--seeds 0,1]

For each fusion head (all four modalities) and each single modality, trains a federation and
prints the test AUROC of the final global model (pooled over the three sites' test splits),
on complete data and with 30% of records missing one modality. Every site trains with the
ClientApp's own code (``client.training.train_round``: Opacus DP-SGD, Poisson sampling, the
whole-run noise plan) and the server step is FedAvg weighted by training records, as
``server.strategy`` does. To fit a sweep of ~40 federations on two shared cores, the rounds run
in this process rather than through Flower's simulation engine (no Ray actors, no messages);
the learning itself is the same.
"""

from __future__ import annotations

import argparse
import math
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

from client.training import plan_site_privacy, train_round  # noqa: E402
from common.config import RunConfig  # noqa: E402
from common.data.dataset import load_site  # noqa: E402
from common.data.synthetic import TABULAR_COLUMNS, TABULAR_RANGES, generate  # noqa: E402
from common.metrics import predict, scores  # noqa: E402
from common.models import build_model  # noqa: E402

warnings.filterwarnings("ignore")
ALL = ("image", "report", "audio", "tabular")


def federate(cfg: RunConfig, sites: list[Path], *, seed: int) -> float:
    """Train ``cfg.num_rounds`` rounds of DP FedAvg over ``sites``; pooled test AUROC."""
    torch.manual_seed(seed)
    cfg = cfg.replace(seed=seed)
    data = [load_site(s, cfg)[1] for s in sites]
    model = build_model(cfg)
    plans = [
        plan_site_privacy(cfg=cfg, num_train=len(d["train"])) if cfg.private else None for d in data
    ]
    history: list[list] = [[] for _ in sites]
    for rnd in range(1, cfg.num_rounds + 1):
        states, weights = [], []
        for i, d in enumerate(data):
            local = build_model(cfg)
            local.load_state_dict(model.state_dict())
            res = train_round(
                local,
                d["train"],
                cfg=cfg,
                plan=plans[i],
                history=history[i],
                seed=seed * 1000 + i * 10 + rnd,
                device=torch.device("cpu"),
            )
            if res.event is not None:
                history[i].append(res.event)
            assert res.epsilon <= cfg.target_epsilon + 1e-6
            states.append(local.state_dict())
            weights.append(res.num_examples)
        total = sum(weights)
        model.load_state_dict(
            {
                k: sum(w * s[k] for w, s in zip(weights, states, strict=True)) / total
                for k in states[0]
            }
        )
    preds = [predict(model, d["test"], device=torch.device("cpu")) for d in data]
    pooled = type(preds[0])(
        torch.cat([p.labels for p in preds]),
        torch.cat([p.logits for p in preds]),
        torch.cat([p.mask for p in preds]),
        None,
    )
    return scores(pooled, multi_label=cfg.multi_label)["auroc"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=600, help="records per site (average)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--seeds", default="0,1", help="federation seeds (data stays the same)")
    ap.add_argument("--missing-rate", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="comma list of rows to run (e.g. gated,image)")
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
        target_epsilon=args.epsilon,
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
        f"{args.local_epochs}, batch {args.batch_size}, epsilon {args.epsilon} per site, "
        f"seeds {seeds}; test AUROC pooled over sites"
    )
    with tempfile.TemporaryDirectory() as tmp:
        complete = generate(
            Path(tmp) / "complete", sites=3, records=args.records, seed=11, modalities=ALL
        )
        missing = generate(
            Path(tmp) / "missing",
            sites=3,
            records=args.records,
            seed=11,
            modalities=ALL,
            missing_rate=args.missing_rate,
        )
        print(
            f"\n{'model':<22}{'complete':>16}{f'{args.missing_rate:.0%} missing':>16}"
            f"{'diff':>8}{'s':>6}"
        )
        for name, cfg in rows:
            t0 = time.time()
            a = [federate(cfg, complete, seed=s) for s in seeds]
            b = [federate(cfg, missing, seed=s) for s in seeds]
            ma, mb = statistics.mean(a), statistics.mean(b)
            spread = lambda v: f"±{(max(v) - min(v)) / 2:.3f}" if len(v) > 1 else ""  # noqa: E731
            print(
                f"{name:<22}{ma:>10.3f}{spread(a):>6}{mb:>10.3f}{spread(b):>6}"
                f"{mb - ma:>+8.3f}{time.time() - t0:>6.0f}",
                flush=True,
            )
            if any(math.isnan(x) for x in a + b):
                print("  (NaN: a test split with one class only)")


if __name__ == "__main__":
    main()
