"""A site evaluates the global model once per evaluate request: its own figures (local log) and
its evaluation-sums vector (for SecAgg+) come from the same single pass over its test split."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import fedfuse.client.app as client_app
import fedfuse.client.handlers as client_handlers
from fedfuse.client.site import SiteInfo, site_data
from fedfuse.common.config import RunConfig
from fedfuse.common.evaluation import (
    EVAL_SUMS_ARRAY,
    EVAL_SUMS_KEY,
    EvalLayout,
    decode_sums,
    eval_sums,
    evaluate_site,
)
from fedfuse.common.models import build_model
from fedfuse.common.site_state import eval_log
from tests.support.sites import copy_site


def test_one_evaluate_request_is_one_pass_over_the_test_split(
    tmp_path: Path, synth_sites: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site-0"
    copy_site(synth_sites[0], site)
    cfg = RunConfig(num_rounds=1, data_dir=str(tmp_path))
    assert len(cfg.modality_names) >= 2  # hidden-modality variants exist
    batches: list[int] = []  # the number of rows of each forward call

    def counted_model(run_cfg: RunConfig) -> torch.nn.Module:  # the real model, forward counted
        model = build_model(run_cfg)
        forward = model.forward

        def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            batches.append(len(args[0]))
            return forward(*args, **kwargs)

        model.forward = spy  # type: ignore[method-assign]
        return model

    monkeypatch.setattr(client_handlers, "build_model", counted_model)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 99, 7, 1
    config = ConfigRecord({**cfg.to_mapping(), "server-round": 1, "run-uid": "u-eval"})
    msg = Message(
        RecordDict({"arrays": ArrayRecord(build_model(cfg).state_dict()), "config": config}),
        dst_node_id=7,
        message_type="evaluate",
    )
    ctxt = Context(
        run_id=99,
        node_id=7,
        node_config={"data-path": str(site)},
        state=RecordDict(),
        run_config={},
    )
    reply = client_app.evaluate(msg, ctxt)
    assert not reply.has_error(), reply.error
    _, datasets = site_data(SiteInfo(site.name, site), cfg)
    n = len(datasets["test"])
    # One forward call per batch of the test split, every variant of the batch stacked in it
    # (at most 256 rows a call, as before): each record is read and run once.
    k = 1 + len(cfg.modality_names)
    assert n > 0 and len(batches) == math.ceil(n / (256 // k)) and max(batches) <= 256
    assert sum(batches) == n * k
    # Both results come from that pass: the logged figures and the sums agree.
    sums = reply.content.array_records[EVAL_SUMS_KEY][EVAL_SUMS_ARRAY].numpy()
    logged = json.loads(eval_log(site).read_text().splitlines()[-1])
    pooled = decode_sums(sums, EvalLayout.for_config(cfg))
    assert sums[0] == logged["num-examples"] == n
    assert pooled["eval-accuracy"] == pytest.approx(logged["eval-accuracy"], abs=1e-12)
    assert pooled["eval-loss"] == pytest.approx(logged["eval-loss"], abs=1e-3)
    assert abs(pooled["eval-auroc"] - logged["eval-auroc"]) <= pooled["eval-auroc-resolution"]
    # ... and they are what the separate functions compute.
    model = build_model(cfg)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    cpu = torch.device("cpu")
    layout = EvalLayout.for_config(cfg)
    assert np.array_equal(sums, eval_sums(model, datasets["test"], layout=layout, device=cpu))
    clear = evaluate_site(model, datasets["test"], cfg=cfg, device=cpu)
    for key, value in clear.items():
        got = math.nan if logged[key] is None else logged[key]  # the log writes NaN as null
        assert got == pytest.approx(value, nan_ok=True), key
