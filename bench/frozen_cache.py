"""Frozen pretrained encoder: DP round time with and without the feature cache.

Run:  python -m bench.frozen_cache [--arch resnet18] [--records 512] [--size 64] [--rounds 3]

A randomly initialised torchvision backbone is saved to a file and loaded the way real
weights are (``image-weights`` + SHA-256), with ``image-freeze = all`` and ``image-norm =
frozen``. Each round builds a new model and loads the same weights (as a site does with the
global model) and runs one DP-SGD epoch (batch 64) with ``train_round``. Uncached, every step
runs the backbone; cached (common/models/pretrained.py, FeatureCache), the first round computes
each record's features once and later rounds train only the heads. Prints one CSV row per
(mode, round): seconds and the cache's hits and misses. Wall times depend on machine load:
compare the two modes within one run.

With ``--wire``: what one site's update puts on the wire per round for each image encoder and
``image-freeze`` (embed-dim 8, image and report): entries of the state dict (what every update
carried before the fixed parts stayed home; SecAgg+ masks each float entry as a 32-bit word)
against the entries a round sends now. No training; prints one CSV row per configuration.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import TensorDataset
from torchvision import models

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from fedfuse.client.training import PrivacyPlan, train_round  # noqa: E402
from fedfuse.common.config import RunConfig  # noqa: E402
from fedfuse.common.models import build_model  # noqa: E402
from fedfuse.common.models.pretrained import FEATURE_CACHE, wire_state  # noqa: E402
from fedfuse.common.secagg import masking  # noqa: E402

warnings.filterwarnings("ignore")


WIRE_CASES = (
    ("cnn", "none"),
    ("resnet18", "none"),
    ("resnet18", "last-block"),
    ("resnet18", "head"),
    ("resnet18", "all"),
    ("densenet121", "head"),
    ("densenet121", "all"),
)


def wire_sizes() -> None:
    """One CSV row per (encoder, freeze): state-dict entries (what a round sent before fixed
    parts stayed home) and their masked megabytes, the entries a round sends now
    (``wire_state``) and their masked kilobytes, and the entries that train. Torchvision
    backbones come from a weights file (random values, checked by SHA-256, as real ones)."""
    work = Path(tempfile.mkdtemp())
    print(
        "image_encoder,image_freeze,state_entries,masked_mb_before,sent_entries,"
        "masked_kb_now,trainable_entries"
    )
    for arch, freeze in WIRE_CASES:
        weights = {}
        if arch != "cnn":
            path = work / f"{arch}.pt"
            if not path.exists():
                torch.save(getattr(models, arch)(weights=None).state_dict(), path)
            weights = {
                "image_weights": str(path),
                "image_weights_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            }
        cfg = RunConfig(image_encoder=arch, image_freeze=freeze, image_norm="frozen", **weights)
        model = build_model(cfg)
        state = {k: v.numpy() for k, v in model.state_dict().items()}
        sent = {k: v.numpy() for k, v in wire_state(model, cfg).items()}
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(
            f"{arch},{freeze},{sum(a.size for a in state.values())},"
            f"{4 * masking.vector_length(state) / 1e6:.3f},{sum(a.size for a in sent.values())},"
            f"{4 * masking.vector_length(sent) / 1e3:.1f},{trainable}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet50", "densenet121"])
    ap.add_argument("--records", type=int, default=512)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--wire", action="store_true", help="print update sizes per freeze mode")
    args = ap.parse_args()
    if args.wire:
        wire_sizes()
        return
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp())
    weights = work / f"{args.arch}.pt"
    torch.save(getattr(models, args.arch)(weights=None).state_dict(), weights)
    cfg = RunConfig(
        modalities="image",
        image_size=args.size,
        embed_dim=8,
        batch_size=64,
        image_encoder=args.arch,
        image_weights=str(weights),
        image_weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest(),
        image_freeze="all",
        image_norm="frozen",
        local_epochs=1,
        modality_dropout=0.0,
    )
    gen = torch.Generator().manual_seed(0)
    n = args.records
    data = TensorDataset(
        torch.ones(n, 1), torch.rand(n, 1, args.size, args.size, generator=gen), torch.arange(n) % 2
    )
    steps = -(-n // cfg.batch_size)
    plan = PrivacyPlan(1.0, 1 / steps, steps, args.rounds)
    state = build_model(cfg).state_dict()
    print("mode,round,seconds,cache_hits,cache_misses")
    for cached in (False, True):
        FEATURE_CACHE.clear()
        for r in range(args.rounds):
            model = build_model(cfg)
            model.load_state_dict(state)
            if not cached:
                model.encoders["image"].feature_cache = None
            t = time.perf_counter()
            train_round(
                model, data, cfg=cfg, plan=plan, history=[], seed=r, device=torch.device("cpu")
            )
            mode = "cached" if cached else "uncached"
            print(
                f"{mode},{r + 1},{time.perf_counter() - t:.2f},"
                f"{FEATURE_CACHE.hits},{FEATURE_CACHE.misses}"
            )


if __name__ == "__main__":
    main()
