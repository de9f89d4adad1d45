"""Pooled evaluation from SecAgg+ sums vs the same figures computed in the clear, on real data.

Runs a real federation (the real ClientApp, the SecAgg+ protocol over an in-process Grid) on a
copy of the PathVQA yes/no sites, then evaluates the final global model on the pooled test
splits in the clear and prints both, their difference and the histogram's resolution bound.

    python -m bench.eval_sums --data ../shared/data/pathvqa-yesno --rounds 2
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset

from fedfuse.client.app import app as client_app
from fedfuse.client.site import SiteInfo, simulation_site_dirs, site_data
from fedfuse.common.config import RunConfig
from fedfuse.common.evaluation import evaluate_site
from fedfuse.common.models import build_model
from fedfuse.server.app import run_federation
from fedfuse.server.rundir import RunDirectory
from fedfuse.simulations.inprocess import InProcessGrid


def compare(cfg: RunConfig, run_dir: Path) -> list[tuple[str, float, float, float]]:
    """(figure, from SecAgg+ sums, in the clear, allowed difference) for the final round."""
    final = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    model = build_model(cfg)
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    tests = [
        site_data(SiteInfo(d.name, d), cfg)[1]["test"] for d in simulation_site_dirs(cfg.data_dir)
    ]
    clear = evaluate_site(model, ConcatDataset(tests), cfg=cfg, device=torch.device("cpu"))
    res = float(final["eval-auroc-resolution"])
    rows = [
        (
            "test records",
            final["eval-records"],
            clear["num-examples"],
            0.0,
        ),
        ("loss", final["eval-loss"], clear["eval-loss"], 5e-4),
        ("accuracy", final["eval-accuracy"], clear["eval-accuracy"], 0.0),
        ("AUROC", final["eval-auroc"], clear["eval-auroc"], res),
    ]
    for m in cfg.modality_names:
        rows.append((f"AUROC without {m}", final[f"eval-auroc-without-{m}"],
                     clear[f"eval-auroc-without-{m}"], res))  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/pathvqa-yesno")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        shutil.copytree(args.data, data, ignore=shutil.ignore_patterns(".fedfuse", "NOTICE.md"))
        n = len(simulation_site_dirs(str(data)))
        cfg = RunConfig(
            data_dir=str(data),
            out_dir=str(Path(tmp) / "runs"),
            classes="no,yes",
            num_rounds=args.rounds,
            local_epochs=1,
            batch_size=256,
            target_epsilon=args.epsilon,
            secagg=True,
            run_name="eval-sums",
        )
        t0 = time.time()
        run_dir = RunDirectory(cfg.out_dir, cfg, run_id=cfg.run_name)
        run_federation(InProcessGrid(client_app, n), cfg, run_dir=run_dir)
        final = json.loads((run_dir.path / "metrics.jsonl").read_text().splitlines()[-1])
        print(
            f"{n} PathVQA sites, {args.rounds} rounds, epsilon {args.epsilon}, SecAgg+ "
            f"({time.time() - t0:.0f} s); final global model, pooled test splits; histogram "
            f"resolution bound {final['eval-auroc-resolution']:.2e}"
        )
        print(f"{'figure':<26}{'SecAgg+ sums':>14}{'clear':>14}{'|diff|':>11}{'allowed':>10}")
        for name, a, b, tol in compare(cfg, run_dir.path):
            allowed = "-" if math.isnan(tol) else f"{tol:.1e}"
            print(f"{name:<26}{a:>14.6f}{b:>14.6f}{abs(a - b):>11.2e}{allowed:>10}")


if __name__ == "__main__":
    main()
