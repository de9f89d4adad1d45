"""What the server receives from sites: exactly the fields the README lists, no per-site
evaluation figure by default, no file path and no traceback; and the federation's evaluation
figures computed from summed vectors agree with the same figures computed in the clear."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message
from torch.utils.data import ConcatDataset

import fedfuse.client.handlers as client_handlers
from fedfuse.client.app import app as client_app
from fedfuse.client.site import SiteInfo, site_data
from fedfuse.client.wire import public_reason
from fedfuse.common.config import RunConfig
from fedfuse.common.data.dataset import manifest_for
from fedfuse.common.data.synthetic import generate
from fedfuse.common.evaluation import EvalLayout, decode_sums, eval_sums, evaluate_site
from fedfuse.common.metrics import auroc, histogram_auroc, score_bins
from fedfuse.common.models import build_model
from fedfuse.common.secagg.protocol import RECORD_KEY, Key
from fedfuse.server.app import run_federation
from fedfuse.server.rundir import RunDirectory
from fedfuse.simulations.holdout import holdout_evaluator
from fedfuse.simulations.inprocess import InProcessGrid
from tests.support.wire import EVAL_COLLECT, PATH_LIKE, REFUSAL, SECAGG_STAGES, TRAIN_COLLECT

# What a site may send, by reply kind: record name -> the keys it may hold (None: any array
# names, for the model update without SecAgg+). The README's "What crosses the wire" lists
# the same; a new field must be added to both, and to the privacy accounting or the README.
TRAIN_CLEAR = {
    "arrays": None,
    "metrics": {"num-examples", "epsilon", "delta", "ledger-seq"},
    "site": {"name"},
    "ledger": {"hash", "seq", "run-id"},
    **REFUSAL,  # a refusal is the whole reply (no model)
}
EVAL_CLEAR = {"eval-sums": {"sums"}, "site": {"name"}}
# What a held-out site releases at the end of the run (README; simulations/holdout.py), besides
# the eval-* figures the server derives from one sums vector.
HOLDOUT_RELEASE = {"site", "round", "reliability"}


def _allowed(msg: Message, secagg: bool) -> dict[str, set[str] | None]:
    rec = msg.content.config_records.get(RECORD_KEY)
    stage = rec.get(Key.STAGE) if rec is not None else None
    if stage in SECAGG_STAGES:
        return SECAGG_STAGES[str(stage)]  # type: ignore[return-value]
    if msg.metadata.message_type == "train":
        return TRAIN_COLLECT if secagg else TRAIN_CLEAR
    return EVAL_COLLECT if secagg else EVAL_CLEAR


def _check_received(received: list[Message], *, secagg: bool, site_root: Path) -> list[str]:
    """Every message against the list; returns the error reasons seen."""
    reasons = []
    for msg in received:
        if msg.has_error():
            reason = str(msg.error.reason)
            reasons.append(reason)
            assert "Traceback" not in reason and 'File "' not in reason, reason
            assert str(site_root) not in reason and not PATH_LIKE.search(reason), reason
            continue
        allowed = _allowed(msg, secagg)
        content = msg.content
        names = set(content.keys())
        assert names <= set(allowed), (msg.metadata.message_type, names - set(allowed))
        for name in names:
            keys = allowed[name]
            if keys is None:
                continue
            record = content[name]
            assert set(record.keys()) <= keys, (name, set(record.keys()) - keys)
        text = repr({k: dict(v) for k, v in content.config_records.items()})
        assert str(site_root) not in text and "Traceback" not in text
    return reasons


def _cfg(data: Path, out: Path, *, secagg: bool) -> RunConfig:
    return RunConfig(
        data_dir=str(data),
        out_dir=str(out),
        num_rounds=1,
        local_epochs=1,
        batch_size=64,
        target_epsilon=math.inf,  # the fields are the same under DP; this keeps the test fast
        secagg=secagg,
        run_name="wire",
    )


@pytest.mark.parametrize("secagg", [True, False], ids=["secagg", "clear"])
def test_the_server_receives_only_the_listed_fields(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, secagg: bool
) -> None:
    """Three sites, one of which fails with an error naming its folder: every message the
    server receives holds only the README's fields, no per-site evaluation figure, and no
    path or traceback reaches the messages or metrics.jsonl. A fourth site, held out, is sent
    nothing and releases only HOLDOUT_RELEASE at the end."""
    sites = generate(tmp_path / "data", sites=4, records=60, seed=7)
    held_out = sites[1]  # not the last folder: the others keep their partitions in order
    real_site_data = client_handlers.site_data

    def failing_site_data(site: SiteInfo, cfg: RunConfig):  # type: ignore[no-untyped-def]
        if site.name == "site-2":
            raise OSError(f"cannot read {site.data_path / 'manifest.jsonl'}: disk on fire")
        return real_site_data(site, cfg)

    monkeypatch.setattr(client_handlers, "site_data", failing_site_data)
    cfg = _cfg(tmp_path / "data", tmp_path / "runs", secagg=secagg)
    cfg = cfg.replace(holdout_site=held_out.name)
    grid = InProcessGrid(client_app, 3)
    run_dir = RunDirectory(cfg.out_dir, cfg, run_id="wire")
    run_federation(grid, cfg, run_dir=run_dir, holdout=holdout_evaluator(cfg))

    reasons = _check_received(grid.received, secagg=secagg, site_root=tmp_path)
    named = {
        str(m.content.config_records["site"]["name"])
        for m in grid.received
        if m.has_content() and "site" in m.content.config_records
    }
    assert held_out.name not in named and named <= {"site-0", "site-2", "site-3"}
    assert reasons and all("OSError: cannot read <path>: disk on fire" in r for r in reasons)
    kinds = {m.metadata.message_type for m in grid.received if not m.has_error()}
    assert kinds == {"train", "evaluate"}
    metrics_text = (run_dir.path / "metrics.jsonl").read_text()
    assert str(tmp_path) not in metrics_text and "Traceback" not in metrics_text
    (row,) = [json.loads(x) for x in metrics_text.splitlines()]
    # Federation-wide figures only; the sites' own figures stay in their local logs.
    assert 0.0 <= row["eval-auroc"] <= 1.0 and row["eval-sites"] == 2
    for name, site in row["sites"].items():
        assert not any(k.startswith("eval-") for k in site), (name, site)
        assert "noise-multiplier" not in site and "lifetime-epsilon" not in site
    for site in (sites[0], sites[3]):
        local = [json.loads(x) for x in (site / ".fedfuse" / "eval.jsonl").read_text().splitlines()]
        assert local[-1]["round"] == 1 and local[-1]["run-id"] == "wire"
        assert "eval-auroc" in local[-1]
    assert "site-2" in row.get("eval-failed", {}) and "site-2" in row["failed"]
    # The held-out site: no ledger, not among the sites, and only its listed figures.
    held = row["holdout"]
    assert held["site"] == held_out.name and held_out.name not in row["sites"]
    assert not (held_out / ".fedfuse" / "ledger.sqlite").exists()
    assert all(k in HOLDOUT_RELEASE or k.startswith("eval-") for k in held), sorted(held)
    assert held["eval-records"] == len(manifest_for(held_out, cfg).records)  # trained on none
    assert str(tmp_path) not in json.dumps(held)


def test_a_site_that_opts_in_shares_its_own_figures(tmp_path: Path) -> None:
    """``share-site-metrics = true`` in the node config: the site's own evaluation figures and
    privacy internals reach the server (and metrics.jsonl), outside any epsilon."""
    generate(tmp_path / "data", sites=2, records=60, seed=3)
    cfg = _cfg(tmp_path / "data", tmp_path / "runs", secagg=False)
    grid = InProcessGrid(client_app, 2, node_config={"share-site-metrics": "true"})
    run_dir = RunDirectory(cfg.out_dir, cfg, run_id="wire")
    run_federation(grid, cfg, run_dir=run_dir)
    (row,) = [json.loads(x) for x in (run_dir.path / "metrics.jsonl").read_text().splitlines()]
    for site in row["sites"].values():
        assert "eval-loss" in site and "lifetime-epsilon" in site and "train-loss" in site
        # The local epochs' time and device stay in the site's own log, opted in or not.
        assert "train-seconds" not in site and "device" not in site
    for log in (tmp_path / "data").glob("*/.fedfuse/train.jsonl"):
        (kept,) = [json.loads(x) for x in log.read_text().splitlines()]
        assert kept["train-seconds"] > 0 and kept["device"] in ("cpu", "cuda")


def test_pooled_figures_from_sums_agree_with_the_clear(synth_sites: list[Path]) -> None:
    """Sum of three sites' vectors, decoded, against the same figures computed on the pooled
    test records in the clear: loss to the fixed point, accuracy exactly, every AUROC within
    the histogram's resolution (``eval-auroc-resolution``)."""
    cfg = RunConfig(data_dir=str(synth_sites[0].parent), fusion="gated", seed=1)
    torch.manual_seed(1)
    model = build_model(cfg)
    layout = EvalLayout.for_config(cfg)
    cpu = torch.device("cpu")
    tests = [site_data(SiteInfo(s.name, s), cfg)[1]["test"] for s in synth_sites]
    total = sum(eval_sums(model, ds, layout=layout, device=cpu) for ds in tests)
    pooled = decode_sums(total, layout)
    clear = evaluate_site(model, ConcatDataset(tests), cfg=cfg, device=cpu)
    res = pooled["eval-auroc-resolution"]
    assert pooled["num-examples"] == clear["num-examples"] == sum(len(t) for t in tests)
    assert pooled["eval-loss"] == pytest.approx(clear["eval-loss"], abs=1e-3)
    assert pooled["eval-accuracy"] == pytest.approx(clear["eval-accuracy"], abs=1e-12)
    assert abs(pooled["eval-auroc"] - clear["eval-auroc"]) <= res + 1e-12
    for m in cfg.modality_names:
        assert abs(pooled[f"eval-auroc-without-{m}"] - clear[f"eval-auroc-without-{m}"]) <= (
            res + 1e-12
        )
        assert pooled[f"eval-weight-{m}"] == pytest.approx(clear[f"eval-weight-{m}"], abs=1e-3)


def test_histogram_auroc_by_hand() -> None:
    # Positives in bins 2, 3; negatives in bins 0, 2: pairs (2>0), (2=2: half), (3>0), (3>2).
    a, res = histogram_auroc(np.array([0, 0, 1, 1]), np.array([1, 0, 1, 0]))
    assert a == pytest.approx(3.5 / 4) and res == pytest.approx(1 / 8)
    assert math.isnan(histogram_auroc(np.zeros(4), np.ones(4))[0])
    # Scores in distinct bins: the histogram AUROC is the exact AUROC.
    rng = np.random.default_rng(0)
    p = rng.uniform(0.01, 0.99, 200)
    y = rng.random(200) < p
    b = score_bins(p)
    pos = np.bincount(b[y], minlength=2048)
    neg = np.bincount(b[~y], minlength=2048)
    h, r = histogram_auroc(pos, neg)
    assert abs(h - auroc(y, p)) <= r + 1e-12 and r < 0.01


def test_public_reason_keeps_no_path_and_one_line() -> None:
    text = "cannot open /srv/hospital/site-a/.fedfuse/ledger.sqlite (and/or 1/2)\nTraceback ..."
    assert public_reason(text) == "cannot open <path> (and/or 1/2)"
    assert public_reason("C:\\data\\x.csv bad") == "<path> bad"
    assert len(public_reason("x" * 1000)) == 300


def test_site_run_opts_in_only_when_asked(tmp_path: Path) -> None:
    """`fedfuse site run --share-site-metrics` puts the opt-in into the node config; without
    the flag the key is absent (the ClientApp then shares nothing more)."""
    from fedfuse.common.deploy.flower import SiteOptions, format_node_config, node_config

    base = {"superlink": "127.0.0.1:9092", "data": tmp_path, "ledger": tmp_path / "l.db"}
    plain = node_config(SiteOptions(**base, epsilon_budget=4.0))
    shared = node_config(SiteOptions(**base, epsilon_budget=4.0, share_site_metrics=True))
    assert "share-site-metrics" not in plain
    assert "share-site-metrics=true" in format_node_config(shared)
