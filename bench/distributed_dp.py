"""Distributed DP vs central client-level DP at the same epsilon, and its cost over SecAgg+.

    python -m bench.distributed_dp            # 10 sites x 5 rounds, 2 seeds (~8 min, 2 cores)
    python -m bench.distributed_dp --sites 5 --rounds 3 --seeds 1

Every run is a real federation (``fedfuse.server.app.run_federation``, the real ClientApp with its
SecAgg+ mod) over the in-process Grid, on synthetic sites, with SecAgg+ on:

- ``secagg``: no DP (target-epsilon inf), SecAgg+'s float quantisation: the time baseline;
- ``central``: ``dp-level = client``: sites clip, the server adds Gaussian noise of std z*C
  after unmasking (it sees the clean sum first);
- ``distributed``: ``dp-level = distributed``: each site adds its discrete Gaussian share
  before masking, sized for the reconstruction threshold T (a majority) of sites, so with all
  n sites present the noise is sqrt(n/T) times the central one;
- ``distributed-T=n``: the same with T = n (no dropout tolerated): the noise of ``central``.

``central`` and both ``distributed`` runs use the same clip norm and noise multiplier z, and
(with every site in every round) the same epsilon: the DDGauss noise is sized on the rounded
sensitivity, so its bound equals the Gaussian's (the printed epsilons show it). The figure of
merit is the test AUROC of the final model (mean over seeds) and the seconds per round.
It also times the mechanism alone on the model's vector: a site's privatize() against
SecAgg+'s quantisation, and the server's decode.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from fedfuse.client.app import app as client_app  # noqa: E402
from fedfuse.common.config import RunConfig  # noqa: E402
from fedfuse.common.data.synthetic import generate  # noqa: E402
from fedfuse.common.models import build_model  # noqa: E402
from fedfuse.common.secagg import distributed_dp, masking  # noqa: E402
from fedfuse.server.app import run_federation  # noqa: E402
from fedfuse.server.rundir import RunDirectory  # noqa: E402
from fedfuse.simulations.inprocess import InProcessGrid  # noqa: E402


def run(name: str, cfg: RunConfig, sites: int) -> dict:
    grid = InProcessGrid(client_app, sites, seed=cfg.seed)
    run_dir = RunDirectory(cfg.out_dir, cfg, run_id=f"{name}-{cfg.seed}")
    t0 = time.perf_counter()
    run_federation(grid, cfg, run_dir=run_dir)
    seconds = time.perf_counter() - t0
    privacy = json.loads((run_dir.path / "privacy.json").read_text())
    client = privacy.get("client_level") or {}
    last = run_dir.rounds[-1]
    return {
        "auroc": last.get("eval-auroc"),
        "epsilon": client.get("epsilon", math.inf),
        "seconds_per_round": seconds / cfg.num_rounds,
    }


def micro(cfg: RunConfig, sites: int, repeats: int = 5) -> dict:
    """The mechanism alone on the model's vector (seconds, median of ``repeats``)."""
    arrays = {k: v.numpy() for k, v in build_model(cfg).state_dict().items()}
    spec = distributed_dp.spec_from_config(cfg, arrays)
    params = cfg.secagg_settings().for_round(sites)
    rng = np.random.default_rng(0)
    delta = rng.normal(size=spec.dim) * 1e-3
    seed = distributed_dp.rotation_seed("bench", 1)

    def timeit(fn) -> float:  # noqa: ANN001
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    vec = distributed_dp.privatize(delta, spec, threshold=params.threshold, seed=seed, rng=rng)
    total = distributed_dp.to_modular(vec * sites, params.modulus_range)
    total[0] = sites
    return {
        "dim": spec.dim,
        "padded": spec.padded,
        "site_privatize": timeit(
            lambda: distributed_dp.privatize(
                delta, spec, threshold=params.threshold, seed=seed, rng=rng
            )
        ),
        "site_quantise": timeit(lambda: masking.encode(delta, 100.0, params)),
        "server_decode_ddp": timeit(
            lambda: distributed_dp.decode_sum(
                total,
                spec,
                num_sites=sites,
                threshold=params.threshold,
                modulus=params.modulus_range,
                seed=seed,
            )
        ),
        "mask_expansion": timeit(lambda: masking.prg(b"k" * 32, spec.padded + 1)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--records", type=int, default=150, help="records per synthetic site")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--noise-multiplier", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=0.5)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument(
        "--runs",
        default="secagg,central,distributed,distributed-T=n",
        help="comma-separated subset of the runs",
    )
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fedfuse-bench-ddp-"))
    generate(tmp / "data", sites=args.sites, records=args.records, seed=7)
    base = RunConfig(
        data_dir=str(tmp / "data"),
        out_dir=str(tmp / "runs"),
        num_rounds=args.rounds,
        local_epochs=2,
        batch_size=32,
        client_clip_norm=args.clip,
        client_noise_multiplier=args.noise_multiplier,
    )
    variants = {
        "secagg": dict(target_epsilon=math.inf),
        "central": dict(dp_level="client"),
        "distributed": dict(dp_level="distributed"),
        "distributed-T=n": dict(dp_level="distributed", reconstruction_threshold=args.sites),
    }
    variants = {k: v for k, v in variants.items() if k in args.runs.split(",")}
    results: dict[str, list[dict]] = {k: [] for k in variants}
    # Warm-up (imports, first-use costs) so that the first timed run is not penalised.
    run("warmup", base.replace(num_rounds=1, target_epsilon=math.inf, run_name="w"), args.sites)
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for name, extra in variants.items():
            # Client- and distributed-level runs train without DP-SGD (sites are uncapped).
            cfg = base.replace(seed=seed, **extra)
            r = run(name, cfg, args.sites)
            results[name].append(r)
            print(f"seed {seed} {name:16s} {r}", flush=True)
    print()
    print(
        f"{args.sites} sites x {args.rounds} rounds, {args.records} records/site, "
        f"clip {args.clip}, z {args.noise_multiplier}, {args.seeds} seed(s)"
    )
    print("| run | test AUROC (mean over seeds) | client-level epsilon (delta 1e-5) | s/round |")
    print("|---|---|---|---|")
    for name, rs in results.items():
        auc = statistics.mean(r["auroc"] for r in rs)
        sec = statistics.mean(r["seconds_per_round"] for r in rs)
        eps = rs[0]["epsilon"]
        print(f"| {name} | {auc:.4f} | {eps:.4g} | {sec:.2f} |")
    if "central" in results:
        for other in ("distributed", "distributed-T=n"):
            if other in results:
                gap = statistics.mean(r["auroc"] for r in results["central"]) - statistics.mean(
                    r["auroc"] for r in results[other]
                )
                print(f"AUROC central - {other}: {gap:+.4f}")
    m = micro(base, args.sites)
    print(
        f"mechanism alone on {m['dim']} parameters (padded {m['padded']}): site privatize "
        f"{m['site_privatize'] * 1e3:.1f} ms vs SecAgg+ quantise {m['site_quantise'] * 1e3:.1f} "
        f"ms; server decode {m['server_decode_ddp'] * 1e3:.1f} ms; one mask expansion "
        f"{m['mask_expansion'] * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
