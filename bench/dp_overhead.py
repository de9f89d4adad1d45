"""DP-SGD overhead of the default fusion model on the CPU: non-private vs Opacus, side by side.

Run:  python -m bench.dp_overhead [--records 2000] [--repeats 5] [--threads 1]

Trains the default fusion model (run config defaults: cnn + hash-mean + concat, batch 256) on
one synthetic site, alternating one non-private epoch and one DP epoch of each mode so that
machine load hits all of them alike, and prints the median per-epoch wall and CPU time, the
DP/non-private ratio, and each mode's peak memory (measured in a child process each).
Modes: ``bookkeeping`` (the default, common/privacy/bookkeeping.py: per-record norms and the
clipped gradient from one backward pass), ``ghost`` (Opacus' ghost clipping: two backward
passes, per-sample-gradient hooks for layers without a norm sampler), ``hooks`` (Opacus'
per-sample gradients for every layer), and ``ghost-stock-embedding`` (ghost clipping with
Opacus' own embedding norm sampler).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from fedfuse.client.training import make_optimizer  # noqa: E402
from fedfuse.common.config import RunConfig  # noqa: E402
from fedfuse.common.data.dataset import load_site  # noqa: E402
from fedfuse.common.data.synthetic import generate  # noqa: E402
from fedfuse.common.models import build_model  # noqa: E402
from fedfuse.common.models.dp_layers import GhostEmbedding, ghost_coverage  # noqa: E402
from fedfuse.common.models.objectives import make_objective  # noqa: E402
from fedfuse.common.privacy.bookkeeping import (  # noqa: E402
    bookkeeping_coverage,
    make_private_bookkeeping,
)

warnings.filterwarnings("ignore")
MODES = ("plain", "bookkeeping", "ghost", "hooks", "ghost-stock-embedding")


def site_tensors(records: int, cfg: RunConfig, work: Path) -> TensorDataset:
    """One synthetic site's train split, decoded once into tensors (the site caches it so)."""
    site = generate(work, sites=1, records=records, seed=7)[0]
    _, ds = load_site(site, cfg)
    train = ds["train"]
    items = [train[i] for i in range(len(train))]
    return TensorDataset(*(torch.stack(col) for col in zip(*items, strict=True)))


def stock_embeddings(model: nn.Module) -> nn.Module:
    """Swap GhostEmbedding for plain nn.Embedding (Opacus' own norm sampler)."""
    for _name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, GhostEmbedding):
                plain = nn.Embedding(child.num_embeddings, child.embedding_dim)
                plain.weight = child.weight
                setattr(mod, child_name, plain)
    return model


class Trainer:
    """One model + optimizer + loader for a mode; ``epoch()`` runs one training epoch."""

    def __init__(self, mode: str, data: TensorDataset, cfg: RunConfig) -> None:
        from opacus import PrivacyEngine

        torch.manual_seed(0)
        model = build_model(cfg)
        if mode == "ghost-stock-embedding":
            model = stock_embeddings(model)
        optimizer = make_optimizer(model, cfg)
        criterion = make_objective(cfg, model)
        loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True)
        if mode == "bookkeeping":
            engine = PrivacyEngine(accountant="prv")
            model, optimizer, criterion, loader = make_private_bookkeeping(
                engine,
                module=model,
                optimizer=optimizer,
                criterion=criterion,
                data_loader=loader,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                poisson_sampling=True,
            )
        elif mode != "plain":
            engine = PrivacyEngine(accountant="prv")
            made = engine.make_private(
                module=model,
                optimizer=optimizer,
                criterion=criterion,
                data_loader=loader,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                poisson_sampling=True,
                grad_sample_mode="hooks" if mode == "hooks" else "ghost",
            )
            if mode == "hooks":
                model, optimizer, loader = made
            else:
                model, optimizer, criterion, loader = made
        self.model, self.optimizer, self.criterion, self.loader = (
            model,
            optimizer,
            criterion,
            loader,
        )

    def epoch(self) -> tuple[float, float]:
        self.model.train()
        w0, c0 = time.perf_counter(), time.process_time()
        for *inputs, y in self.loader:
            if len(y) == 0:
                continue
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.criterion(self.model(*inputs), y)
            loss.backward()
            self.optimizer.step()
        return time.perf_counter() - w0, time.process_time() - c0


def peak_memory_child(mode: str, records: int, threads: int) -> None:
    """In a fresh process: peak RSS growth (MiB) over the RSS before the model exists, while
    building ``mode``'s trainer and running two epochs (RSS sampled every 2 ms)."""
    import gc

    from bench._procmem import PeakMemory, tree_rss_bytes

    torch.set_num_threads(threads)
    cfg = RunConfig()
    with tempfile.TemporaryDirectory() as tmp:
        data = site_tensors(records, cfg, Path(tmp))
    gc.collect()
    base = tree_rss_bytes()
    with PeakMemory(interval=0.002) as mem:
        trainer = Trainer(mode, data, cfg)
        trainer.epoch()
        trainer.epoch()
    print(f"{(mem.peak - base) / 2**20:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=2000, help="records of the synthetic site")
    ap.add_argument("--repeats", type=int, default=5, help="timed epochs per mode")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a site's share)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    ap.add_argument("--_memory-child", dest="memory_child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        peak_memory_child(args.memory_child, args.records, args.threads)
        return
    torch.set_num_threads(args.threads)
    modes = [m for m in args.modes.split(",") if m]
    if "plain" not in modes:
        modes.insert(0, "plain")
    cfg = RunConfig()
    print(
        f"default fusion model: image {cfg.image_encoder}, text {cfg.text_encoder}, fusion "
        f"{cfg.fusion}, embed-dim {cfg.embed_dim}, image {cfg.image_size}px, batch "
        f"{cfg.batch_size}; {args.threads} thread(s), torch {torch.__version__}"
    )
    print("book-keeping rules:", bookkeeping_coverage(build_model(cfg)))
    print("Opacus ghost-clipping coverage:", ghost_coverage(build_model(cfg)))
    with tempfile.TemporaryDirectory() as tmp:
        data = site_tensors(args.records, cfg, Path(tmp))
    print(f"train records: {len(data)}  ({args.records} generated; the rest are val/test)")
    trainers = {m: Trainer(m, data, cfg) for m in modes}
    for t in trainers.values():  # warm-up epoch (allocator, Opacus hooks, kernels)
        t.epoch()
    wall: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for m in modes:  # interleaved, so load from other processes hits every mode alike
            w, c = trainers[m].epoch()
            wall[m].append(w)
            cpu[m].append(c)
    memory = {}
    if not args.no_memory:
        for m in modes:
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.dp_overhead",
                    "--_memory-child",
                    m,
                    "--records",
                    str(args.records),
                    "--threads",
                    str(args.threads),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            memory[m] = out.stdout.strip().splitlines()[-1]
    base_w, base_c = statistics.median(wall["plain"]), statistics.median(cpu["plain"])
    print(
        f"\n{'mode':<24}{'epoch wall s':>13}{'ratio':>7}{'epoch CPU s':>13}{'ratio':>7}"
        f"{'peak MiB':>10}"
    )
    for m in modes:
        w, c = statistics.median(wall[m]), statistics.median(cpu[m])
        print(
            f"{m:<24}{w:>13.3f}{w / base_w:>7.2f}{c:>13.3f}{c / base_c:>7.2f}"
            f"{memory.get(m, '-'):>10}"
        )
    print(
        f"\n(medians of {args.repeats} interleaved epochs; CPU = process time of the one training"
        " thread, the figure to trust when other jobs load the machine; peak MiB = RSS growth"
        " of a fresh process while it builds the model and trains 2 epochs)"
    )


if __name__ == "__main__":
    main()
