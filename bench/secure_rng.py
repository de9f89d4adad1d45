"""Cost of secure randomness on the default model's DP epoch: keyed torch generators (simulation)
vs the ChaCha20 generator a deployed site uses (common/privacy/secure_rng.py), side by side.

    python -m bench.secure_rng [--data DIR] [--site site-0] [--repeats 5]

Trains the default fusion model (run-config defaults, classes no/yes, DP-SGD at epsilon 8) for one
local epoch through ``fedfuse.client.training.train_round``, as a site does, alternating keyed and
secure epochs so that machine load hits both alike, on one thread. Prints the median CPU and
wall time per epoch of each and the secure/keyed ratio (goal: at most 1.10), and the cost of
the noise alone per step. Default data: a copy of the real PathVQA site (its NOTICE.md asks for
a copy; the copy is deleted at the end).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from fedfuse.client.training import train_round  # noqa: E402
from fedfuse.common.config import RunConfig  # noqa: E402
from fedfuse.common.data.dataset import load_site  # noqa: E402
from fedfuse.common.models import build_model  # noqa: E402
from fedfuse.common.privacy.planning import plan_site_privacy  # noqa: E402
from fedfuse.common.privacy.secure_rng import SecureRandom  # noqa: E402

warnings.filterwarnings("ignore")
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "pathvqa-yesno"


def one_epoch(train, cfg: RunConfig, plan, *, secure: bool, seed: int) -> tuple[float, float]:  # noqa: ANN001
    torch.manual_seed(0)
    model = build_model(cfg)
    c0, w0 = time.process_time(), time.perf_counter()
    train_round(
        model,
        train,
        cfg=cfg,
        plan=plan,
        history=[],
        seed=seed,
        device=torch.device("cpu"),
        secure_rng=SecureRandom() if secure else None,
    )
    return time.process_time() - c0, time.perf_counter() - w0


def noise_cost(n_params: int, *, repeats: int = 20) -> tuple[float, float]:
    """Seconds per step to noise ``n_params`` values: torch.normal vs the secure source."""
    ref = torch.zeros(n_params)
    gen = torch.Generator().manual_seed(0)
    rng = SecureRandom()
    t0 = time.process_time()
    for _ in range(repeats):
        torch.normal(0.0, 1.0, size=ref.shape, generator=gen)
    keyed = (time.process_time() - t0) / repeats
    t0 = time.process_time()
    for _ in range(repeats):
        rng.gaussian_noise(ref, std=1.0)
    return keyed, (time.process_time() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REAL)
    ap.add_argument("--site", default="site-0")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="fedfuse-secure-rng-"))
    try:
        site = work / args.site
        shutil.copytree(args.data / args.site, site, ignore=shutil.ignore_patterns(".fedfuse"))
        cfg = RunConfig(local_epochs=1, num_rounds=1, target_epsilon=8.0, classes="no,yes")
        _, ds = load_site(site, cfg)
        train = ds["train"]
        plan = plan_site_privacy(cfg=cfg, num_train=len(train))
        n_params = sum(p.numel() for p in build_model(cfg).parameters() if p.requires_grad)
        print(
            f"site {args.site}: {len(train)} training records, batch {cfg.batch_size}, "
            f"{plan.steps_per_round} steps, noise multiplier {plan.noise_multiplier:.3f}, "
            f"{n_params} parameters, {args.threads} thread(s)",
            flush=True,
        )
        one_epoch(train, cfg, plan, secure=False, seed=0)  # warm-up (decoding, allocations)
        runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for r in range(args.repeats):
            for secure in (False, True) if r % 2 == 0 else (True, False):
                runs[secure].append(one_epoch(train, cfg, plan, secure=secure, seed=r))
        med = {
            s: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v))
            for s, v in runs.items()
        }
        keyed_step, secure_step = noise_cost(n_params)
        print("| generator | CPU s / epoch (median) | wall s / epoch (median) |")
        print("|---|---|---|")
        for s, name in ((False, "keyed torch (simulation)"), (True, "ChaCha20 (deployed)")):
            print(f"| {name} | {med[s][0]:.2f} | {med[s][1]:.2f} |")
        print(
            f"secure / keyed: CPU {med[True][0] / med[False][0]:.3f}x, "
            f"wall {med[True][1] / med[False][1]:.3f}x ({args.repeats} epochs each)"
        )
        print(
            f"noise alone per step ({n_params} values): torch.normal "
            f"{keyed_step * 1e3:.2f} ms, secure (4 draws summed) {secure_step * 1e3:.2f} ms"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
